"""The sans-IO core: byte tables, each fed whole, in 7-octet pieces and octet by octet."""

from __future__ import annotations

from dataclasses import replace

import pytest

from driver import EHLO, ENVELOPE, SCRIPTED, Run, accept_all, session, transcript
from mmdf_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Event,
    Hello,
    Limits,
    MailFrom,
    MessageAborted,
    MessageComplete,
    OutOfTurn,
    Path,
    RcptTo,
    Refused,
    Reply,
    Reset,
    ServerConnection,
    StartData,
    StartTLS,
    State,
    replies,
)

STEPS = [None, 7, 1]


@pytest.mark.parametrize("step", STEPS)
def test_whole_transaction_pipelined(step: int | None) -> None:
    data = ENVELOPE + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    run = transcript(data, step=step)
    assert run.output.decode() == (
        "220 mx.test ready\r\n"
        "250-mx.test Hello\r\n"
        "250-PIPELINING\r\n"
        "250-SIZE 36700160\r\n"
        "250-8BITMIME\r\n"
        "250-ENHANCEDSTATUSCODES\r\n"
        "250-SMTPUTF8\r\n"
        "250-DSN\r\n"
        "250 CHUNKING\r\n"
        "250 2.1.0 Sender OK\r\n"
        "250 2.1.5 Recipient OK\r\n"
        "354 Start mail input; end with <CRLF>.<CRLF>\r\n"
        "250 2.0.0 Submitted & queued\r\n"
        "221 2.0.0 mx.test closing connection\r\n"
    )
    assert run.content == b"Subject: hi\r\n\r\nbody\r\n"
    assert run.of(MessageComplete) == [MessageComplete(size=len(b"Subject: hi\r\n\r\nbody\r\n"))]
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=True, reason="quit")]
    assert run.conn.closed


def test_replies_to_pipelined_commands_wait_for_the_input_to_drain() -> None:
    run = transcript(EHLO)
    conn = run.conn
    conn.receive_data(b"NOOP\r\nNOOP\r\nNO")
    seen = []
    while (event := conn.next_event()) is not NEED_DATA:
        seen.append(event)
    # Both replies come out together, once no more input can be used.
    assert conn.data_to_send() == b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"
    assert seen == []


def test_helo_gets_plain_reply_and_smtp_session() -> None:
    run = transcript(b"HELO client.test\r\n")
    assert run.replies[-1] == "250 mx.test Hello"
    assert run.conn.esmtp is False and run.conn.helo == "client.test"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"MAIL FROM:<a@b.c>\r\n", "503 5.5.1 Send EHLO or HELO first"),
        (EHLO + b"RCPT TO:<a@b.c>\r\n", "503 5.5.1 Need MAIL command"),
        (EHLO + b"DATA\r\n", "503 5.5.1 Need MAIL command"),
        (EHLO + b"MAIL FROM:<a@b.c>\r\nDATA\r\n", "554 5.5.1 No valid recipients"),
        (ENVELOPE + b"MAIL FROM:<a@b.c>\r\n", "503 5.5.1 Sender already specified"),
        (b"EHLO\r\n", "501 5.5.2 Syntax: EHLO hostname"),
        (b"FOO bar\r\n", "500 5.5.1 Command unrecognized"),
        (b"\r\n", "500 5.5.1 Command unrecognized"),
        (EHLO + b"RSET now\r\n", "501 5.5.4 No parameters allowed"),
        (EHLO + b"VRFY\r\n", "501 5.5.2 Syntax: VRFY address"),
        (
            EHLO + b"VRFY root\r\n",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (EHLO + b"EXPN staff\r\n", "502 5.5.1 EXPN not available"),
        (EHLO + b"NOOP anything at all\r\n", "250 2.0.0 OK"),
        (EHLO + b"STARTTLS\r\n", "502 5.5.1 Command not implemented"),
        (EHLO + b"mail from:<a@b.c>\r\n", "250 2.1.0 Sender OK"),
        (EHLO + b"MAIL FROM: <a@b.c>\r\n", "250 2.1.0 Sender OK"),
        (EHLO + b"MAIL FROM:a@b.c\r\n", "501 5.5.2 Syntax: MAIL FROM:<address> [parameters]"),
        (EHLO + b"MAIL TO:<a@b.c>\r\n", "501 5.5.2 Syntax: MAIL FROM:<address> [parameters]"),
        (ENVELOPE + b"DATA now\r\n", "501 5.5.4 No parameters allowed"),
    ],
)
@pytest.mark.parametrize("step", STEPS)
def test_sequence_and_syntax(data: bytes, reply: str, step: int | None) -> None:
    assert transcript(data, step=step).replies[-1] == reply


def test_help_is_multiline_with_enhanced_codes_on_every_line() -> None:
    run = transcript(b"HELP\r\n")
    assert run.output.decode().endswith(
        "214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP"
        " STARTTLS\r\n"
        "214 2.0.0 See RFC 5321\r\n"
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"<>", Path(local="", domain="")),
        (b"<user@example.org>", Path(local="user", domain="example.org")),
        (b"<@relay.example,@b.example:user@example.org>", Path(local="user", domain="example.org")),
        (b'<"john doe"@example.org>', Path(local='"john doe"', domain="example.org")),
        (b'<"a>b"@example.org>', Path(local='"a>b"', domain="example.org")),
        (b"<user@[192.0.2.7]>", Path(local="user", domain="[192.0.2.7]")),
        (b"<user@[IPv6:2001:db8::7]>", Path(local="user", domain="[IPv6:2001:db8::7]")),
        (
            b"<first.last+tag@sub.example.org>",
            Path(local="first.last+tag", domain="sub.example.org"),
        ),
    ],
)
def test_mail_paths(path: bytes, expected: Path) -> None:
    run = transcript(EHLO + b"MAIL FROM:" + path + b"\r\n")
    assert run.of(MailFrom)[0].sender == expected
    assert run.replies[-1] == "250 2.1.0 Sender OK"


@pytest.mark.parametrize(
    "path",
    [
        b"<user>",
        b"<@example.org>",
        b"<user@>",
        b"<user@-bad.example>",
        b"<user@[300.1.1.1]>",
        b"<user@[IPv6:zz::1]>",
        b"<us..er@example.org>",
        b"<" + b"l" * 65 + b"@example.org>",
        b"<a@" + b"d" * 64 + b"." + b"d" * 64 + b"." + b"d" * 64 + b"." + b"d" * 64 + b">",
    ],
)
def test_bad_sender_paths(path: bytes) -> None:
    run = transcript(EHLO + b"MAIL FROM:" + path + b"\r\n")
    assert run.codes[-1] in (501, 553)
    assert run.replies[-1].startswith("553 5.1.7") or run.replies[-1].startswith("501 5.5.2")
    assert run.of(MailFrom) == []


def test_recipient_paths() -> None:
    data = (
        EHLO + b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<>\r\nRCPT TO:<x@[127.0.0.1]>\r\n"
    )
    run = transcript(data)
    assert [e.recipient for e in run.of(RcptTo)] == [
        Path(local="Postmaster", domain=""),
        Path(local="x", domain="[127.0.0.1]"),
    ]
    assert run.replies[-3:] == [
        "250 2.1.5 Recipient OK",
        "553 5.1.3 Bad recipient address syntax",
        "250 2.1.5 Recipient OK",
    ]


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b" SIZE=1000", "250 2.1.0 Sender OK"),
        (b" SIZE=36700161", "552 5.3.4 Message size exceeds fixed maximum message size"),
        (b" SIZE=abc", "501 5.5.4 Invalid parameter value"),
        (b" SIZE", "501 5.5.4 Invalid parameter value"),
        (b" BODY=8BITMIME", "250 2.1.0 Sender OK"),
        (b" BODY=7bit", "250 2.1.0 Sender OK"),
        (b" BODY=BINARYMIME", "501 5.5.4 Invalid parameter value"),
        (b" SMTPUTF8", "250 2.1.0 Sender OK"),
        (b" SMTPUTF8=yes", "501 5.5.4 Invalid parameter value"),
        (b" AUTH=<>", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"),
        (b" RET=FULL", "250 2.1.0 Sender OK"),
        (b" XRET=FULL", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"),
        (b" SIZE=1 SIZE=2", "501 5.5.4 Duplicate SIZE with another value"),
        (b" SIZE=1 SIZE=1", "250 2.1.0 Sender OK"),
        # Python's smtplib send_message repeats what the caller also gave.
        (b" SMTPUTF8 BODY=8BITMIME SMTPUTF8 BODY=8BITMIME", "250 2.1.0 Sender OK"),
        (b" BODY=8bitmime BODY=8BITMIME", "250 2.1.0 Sender OK"),
        (b" BODY=7BIT BODY=8BITMIME", "501 5.5.4 Duplicate BODY with another value"),
        (b" SMTPUTF8 SMTPUTF8=x", "501 5.5.4 Duplicate SMTPUTF8 with another value"),
        (b" SMTPUTF8=x SMTPUTF8", "501 5.5.4 Duplicate SMTPUTF8 with another value"),
        (b" SIZE=10  BODY=8BITMIME", "250 2.1.0 Sender OK"),
    ],
)
def test_mail_parameters(params: bytes, reply: str) -> None:
    run = transcript(EHLO + b"MAIL FROM:<a@example.org>" + params + b"\r\n")
    assert run.replies[-1] == reply


def test_mail_parameters_reach_the_event() -> None:
    run = transcript(EHLO + b"MAIL FROM:<a@example.org> SIZE=99 BODY=8BITMIME\r\n")
    assert run.of(MailFrom) == [
        MailFrom(sender=Path(local="a", domain="example.org"), size=99, body="8BITMIME")
    ]


def test_a_repeated_parameter_counts_once() -> None:
    run = transcript(
        EHLO + b"MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=9 size=9 SMTPUTF8"
        b" body=8bitmime SMTPUTF8\r\n"
    )
    assert run.of(MailFrom) == [
        MailFrom(
            sender=Path(local="a", domain="example.org"), size=9, body="8BITMIME", smtputf8=True
        )
    ]


def test_unknown_rcpt_parameters_are_refused() -> None:
    run = transcript(EHLO + b"MAIL FROM:<>\r\nRCPT TO:<b@example.net> XNOTIFY=NEVER\r\n")
    assert run.replies[-1] == "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"


def test_utf8_addresses_need_smtputf8() -> None:
    ue = "üser@exämple.org".encode()
    run = transcript(EHLO + b"MAIL FROM:<" + ue + b">\r\n")
    assert run.replies[-1] == "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"
    run = transcript(EHLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + ue + b">\r\n")
    assert run.replies[-1] == "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"
    run = transcript(EHLO + b"MAIL FROM:<" + ue + b"> SMTPUTF8\r\nRCPT TO:<" + ue + b">\r\n")
    assert run.replies[-2:] == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]
    assert run.of(RcptTo)[0].recipient == Path(local="üser", domain="exämple.org")
    assert run.of(MailFrom)[0].smtputf8 is True


def test_invalid_utf8_in_a_command() -> None:
    run = transcript(EHLO + b"MAIL FROM:<\xff@example.org> SMTPUTF8\r\n")
    assert run.replies[-1] == "501 5.5.2 Command is not valid UTF-8"


# -- line lengths and line ends in commands ---------------------------------


def test_command_line_limit_is_512_with_crlf() -> None:
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    too_long = b"NOOP " + b"x" * (512 - 6) + b"\r\n"
    assert len(ok) == 512 and len(too_long) == 513
    assert transcript(ok).replies[-1] == "250 2.0.0 OK"
    assert transcript(too_long).replies[-1] == "500 5.5.2 Line too long"


@pytest.mark.parametrize("step", [None, 4096])
def test_endless_command_line_keeps_memory_bounded(step: int | None) -> None:
    run = session()
    run.feed(b"NOOP " + b"x" * 1_000_000, step=step)
    assert run.conn.pending_input <= 512 + 500  # RCPT's with DSN (RFC 3461 4)
    run.feed(b"\r\nNOOP\r\n")
    assert run.replies[-2:] == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"NOOP\n", "500 5.5.2 Command lines must end with <CRLF>"),
        (b"NOOP\rRSET\r\n", "500 5.5.2 Command lines must end with <CRLF>"),
        (b"NO\0OP\r\n", "500 5.5.2 NUL character in command"),
    ],
)
def test_bad_line_ends_and_nul_in_commands(data: bytes, reply: str) -> None:
    run = transcript(EHLO + data + b"NOOP\r\n")
    assert run.replies[-2:] == [reply, "250 2.0.0 OK"]


def test_error_limit_closes_with_421() -> None:
    run = transcript(b"BAD\r\n" * 3, limits=replace(SCRIPTED, errors=3))
    assert run.replies[-4:] == [
        "500 5.5.1 Command unrecognized",
        "500 5.5.1 Command unrecognized",
        "500 5.5.1 Command unrecognized",
        "421 4.7.0 Too many errors, closing transmission channel",
    ]
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="errors")]
    assert run.of(Refused) == [
        Refused(command="BAD", reply=replies.TOO_MANY_ERRORS, reason="errors")
    ]
    run.feed(b"NOOP\r\n")
    assert run.codes[-1] == 421  # nothing more is read


def test_a_size_over_the_limit_at_mail_is_reported() -> None:
    run = transcript(EHLO + b"MAIL FROM:<a@example.org> SIZE=36700161\r\nMAIL FROM:<>\r\n")
    assert run.of(Refused) == [
        Refused(
            command="MAIL", reply=replies.MESSAGE_TOO_BIG, reason="too-big", sender="a@example.org"
        )
    ]
    assert run.replies[-2:] == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.1.0 Sender OK",
    ]
    # A syntax error is the client's business: no report.
    assert transcript(EHLO + b"MAIL FROM:<a@example.org> SIZE=x\r\n").of(Refused) == []


def test_errors_past_the_soft_limit_are_held_back() -> None:
    limits = replace(SCRIPTED, errors=10, errors_before_delay=2, error_delay=1.5)
    run = session(limits=limits).feed(EHLO)
    delays = []
    for command in [b"BAD\r\n", b"BAD\r\n", b"NOOP\r\n", b"BAD\r\n" * 3, b"NOOP\r\n"]:
        run.conn.receive_data(command)
        while run.conn.next_event() is not NEED_DATA:
            pass
        delays.append(run.conn.delay)
        run.output += run.conn.data_to_send()
        assert run.conn.delay == 0.0  # owed once, for the replies it came with
    # The first two errors are free; each one after costs error_delay, and a
    # pipelined batch of them costs the sum.
    assert delays == [0.0, 0.0, 0.0, 4.5, 0.0]
    assert run.codes[-5:] == [250, 500, 500, 500, 250]


@pytest.mark.parametrize("decision", [MailFrom, RcptTo, StartData, MessageComplete])
def test_a_decision_answered_421_closes_the_session(decision: type) -> None:
    # A milter's SHUTDOWN, say: RFC 5321 4.2.2, 421 is "closing transmission channel".
    shutdown = Reply(code=421, enhanced="4.7.0", text="mx.test closing")

    def answer(event: Event) -> Reply | None:
        return shutdown if isinstance(event, decision) else accept_all(event)

    run = session().feed(ENVELOPE + b"DATA\r\nbody\r\n.\r\nNOOP\r\n", answer=answer)
    assert run.replies[-1] == "421 4.7.0 mx.test closing"
    [closed] = run.of(ConnectionClosed)
    assert closed == ConnectionClosed(reason="refused")
    assert run.conn.closed


def test_no_delay_on_the_closing_421() -> None:
    run = session(limits=replace(SCRIPTED, errors=2, errors_before_delay=0, error_delay=1.0))
    run.conn.receive_data(b"BAD\r\nBAD\r\n")
    while not isinstance(run.conn.next_event(), ConnectionClosed):
        pass
    assert run.conn.delay == 1.0  # the first error only: the 421 closes at once


# -- DATA -------------------------------------------------------------------


def data_run(body: bytes, *, step: int | None = None, limits: Limits | None = None):  # type: ignore[no-untyped-def]
    return transcript(ENVELOPE + b"DATA\r\n" + body + b"NOOP\r\n", step=step, limits=limits)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n.. \r\n..\r\n.\r\n", b"a\r\n. \r\n.\r\n"),
        (b"x.\r\n.\r\n", b"x.\r\n"),
    ],
)
def test_dot_stuffing(wire: bytes, content: bytes, step: int | None) -> None:
    run = data_run(wire, step=step)
    assert run.content == content
    assert run.replies[-2:] == ["250 2.0.0 Submitted & queued", "250 2.0.0 OK"]


SMUGGLING = [
    # Each would end the message for some parser; here none does, and the
    # message is refused for its bare line end when the real end arrives.
    b"a\n.\nMAIL FROM:<evil@x>\n",
    b"a\n.\r\nMAIL FROM:<evil@x>\r\n",
    b"a\r\n.\nMAIL FROM:<evil@x>\r\n",
    b"a\r.\rMAIL FROM:<evil@x>\r\n",
    b"a\r.\r\nMAIL FROM:<evil@x>\r\n",
    b"a\r\n.\rMAIL FROM:<evil@x>\r\n",
    b"a\n.\rMAIL FROM:<evil@x>\r\n",
    b"a\r\n\x00.\r\nMAIL FROM:<evil@x>\r\n",
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("smuggled", SMUGGLING)
def test_smuggling_never_ends_data(smuggled: bytes, step: int | None) -> None:
    run = data_run(smuggled + b"RCPT TO:<c@x>\r\n.\r\n", step=step)
    assert len(run.of(MailFrom)) == 1
    assert run.of(MessageComplete) == []
    refusal = (
        "550 5.6.0 Message refused: NUL octets are not allowed"
        if b"\x00" in smuggled
        else "550 5.6.0 Message refused: bare CR or LF; lines must end with <CRLF>"
    )
    assert run.replies[-2:] == [refusal, "250 2.0.0 OK"]
    assert len(run.of(MessageAborted)) == 1


NUL_IN_DATA = "550 5.6.0 Message refused: NUL octets are not allowed"


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    "wire", [b"a\x00b\r\n.\r\n", b"\x00\r\n.\r\n", b"ok\r\n" * 3000 + b"\x00.\r\n.\r\n"]
)
def test_nul_in_data_is_refused_at_the_end_and_the_session_goes_on(
    wire: bytes, step: int | None
) -> None:
    run = data_run(wire, step=step)
    assert run.replies[-2:] == [NUL_IN_DATA, "250 2.0.0 OK"]
    assert run.of(MessageComplete) == []
    assert run.of(MessageAborted) == [MessageAborted(reply=replies.NUL_IN_DATA, reason="nul")]
    assert b"\x00" not in run.content  # nothing past the NUL reaches the application


@pytest.mark.parametrize("step", STEPS)
def test_nul_in_data_is_content_when_allowed(step: int | None) -> None:
    run = data_run(b"a\x00b\r\n\x00.\r\n.\r\n", step=step, limits=replace(SCRIPTED, allow_nul=True))
    assert run.content == b"a\x00b\r\n\x00.\r\n"
    assert run.replies[-2:] == ["250 2.0.0 Submitted & queued", "250 2.0.0 OK"]


@pytest.mark.parametrize("step", STEPS)
def test_nul_in_a_bdat_chunk_is_refused_at_the_last_chunk(step: int | None) -> None:
    data = ENVELOPE + b"BDAT 4\r\na\x00\r\nBDAT 3 LAST\r\nb\r\nNOOP\r\n"
    run = transcript(data, step=step)
    assert run.replies[-3:] == ["250 2.0.0 4 octets received", NUL_IN_DATA, "250 2.0.0 OK"]
    assert run.of(MessageComplete) == []
    allowed = transcript(data, step=step, limits=replace(SCRIPTED, allow_nul=True))
    assert allowed.content == b"a\x00\r\nb\r\n"
    assert allowed.replies[-2:] == ["250 2.0.0 Submitted & queued", "250 2.0.0 OK"]


@pytest.mark.parametrize("step", [None, 1])
def test_text_line_limit(step: int | None) -> None:
    ok = b"x" * 998 + b"\r\n"
    run = data_run(ok + b".\r\n", step=step)
    assert run.replies[-2] == "250 2.0.0 Submitted & queued"
    run = data_run(b"x" * 999 + b"\r\n.\r\n", step=step)
    assert run.replies[-2] == (
        "550 5.6.0 Message refused: a line is longer than 1000 octets with its <CRLF>"
    )


def test_stuffed_dot_does_not_count_toward_the_line_limit() -> None:
    run = data_run(b"." + b"." + b"x" * 997 + b"\r\n.\r\n")
    assert run.replies[-2] == "250 2.0.0 Submitted & queued"


def test_endless_data_line_keeps_memory_bounded() -> None:
    run = transcript(ENVELOPE + b"DATA\r\n")
    for _ in range(100):
        run.feed(b"y" * 10_000)
        assert run.conn.pending_input <= 1001
    run.feed(b"\r\n.\r\n")
    assert run.replies[-1].startswith("550 5.6.0")


def test_message_size_limit_after_data() -> None:
    limits = replace(SCRIPTED, message_size=100)
    run = data_run(b"z" * 60 + b"\r\n" + b"z" * 60 + b"\r\n.\r\n", limits=limits)
    assert run.replies[-2:] == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert len(run.content) <= 100
    assert run.of(MessageComplete) == []
    assert run.of(MessageAborted)[0].reply == replies.MESSAGE_TOO_BIG


def test_size_exactly_at_the_limit_is_accepted() -> None:
    run = data_run(b"z" * 98 + b"\r\n.\r\n", limits=replace(SCRIPTED, message_size=100))
    assert run.of(MessageComplete) == [MessageComplete(size=100)]


def test_too_many_received_headers_is_a_loop() -> None:
    hops = b"Received: from x by y; date\r\n"
    run = data_run(hops * 101 + b"\r\nbody\r\n.\r\n")
    assert run.replies[-2] == "554 5.4.6 Too many Received headers: mail loop suspected"
    run = data_run(hops * 100 + b"\r\n" + hops * 50 + b".\r\n")
    assert run.replies[-2] == "250 2.0.0 Submitted & queued"
    run = data_run(b"RECEIVED: x\r\n" * 101 + b".\r\n", step=5)
    assert run.replies[-2].startswith("554 5.4.6")


def test_recipient_limit_gives_452_and_keeps_the_transaction() -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(5))
    run = transcript(
        EHLO + b"MAIL FROM:<>\r\n" + rcpts + b"DATA\r\n", limits=replace(SCRIPTED, recipients=3)
    )
    assert run.codes[-6:] == [250, 250, 250, 452, 452, 354]
    assert run.replies[-2] == "452 4.5.3 Too many recipients"
    assert run.conn.errors == 0


def test_refused_recipient_does_not_count() -> None:
    def refuse_b(event):  # type: ignore[no-untyped-def]
        from driver import accept_all

        if isinstance(event, RcptTo) and event.recipient.local == "b":
            return replies.RELAY_DENIED
        return accept_all(event)

    run = session().feed(ENVELOPE + b"DATA\r\n", answer=refuse_b)
    assert run.replies[-2:] == ["550 5.7.1 Relaying denied", "554 5.5.1 No valid recipients"]


def test_client_vanishing_mid_data_reports_close() -> None:
    run = transcript(ENVELOPE + b"DATA\r\npartial message\r\n").eof()
    assert run.content == b"partial message\r\n"
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="lost")]
    assert run.of(MessageComplete) == []


def test_rset_drops_the_transaction() -> None:
    run = transcript(ENVELOPE + b"RSET\r\nRCPT TO:<c@x.org>\r\n")
    assert run.replies[-2:] == ["250 2.0.0 Reset state", "503 5.5.1 Need MAIL command"]
    assert Reset() in run.events


def test_second_transaction_on_one_connection() -> None:
    one = b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\nfirst\r\n.\r\n"
    two = b"MAIL FROM:<c@x.org>\r\nRCPT TO:<d@x.org>\r\nDATA\r\nsecond\r\n.\r\n"
    run = transcript(EHLO + one + two)
    assert run.codes[-8:] == [250, 250, 354, 250, 250, 250, 354, 250]
    assert run.content == b"first\r\nsecond\r\n"


# -- BDAT (RFC 3030) ----------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_bdat_chunks(step: int | None) -> None:
    data = ENVELOPE + b"BDAT 6\r\nHello BDAT 8 LAST\r\n world\r\nNOOP\r\n"
    run = transcript(data, step=step)
    assert run.replies[-3:] == [
        "250 2.0.0 6 octets received",
        "250 2.0.0 Submitted & queued",
        "250 2.0.0 OK",
    ]
    assert run.content == b"Hello  world\r\n"
    assert run.of(StartData) == [StartData(chunking=True)]


def test_bdat_chunk_may_hold_anything_command_like() -> None:
    body = b"DATA\r\n.\r\nQUIT\r\n"
    run = transcript(ENVELOPE + b"BDAT %d LAST\r\n" % len(body) + body + b"NOOP\r\n")
    assert run.content == body
    assert run.replies[-2:] == ["250 2.0.0 Submitted & queued", "250 2.0.0 OK"]


def test_bdat_zero_last() -> None:
    run = transcript(ENVELOPE + b"BDAT 5\r\nabc\r\nBDAT 0 LAST\r\n")
    assert run.codes[-2:] == [250, 250]
    assert run.of(MessageComplete) == [MessageComplete(size=5)]


def test_bdat_out_of_sequence_still_consumes_the_chunk() -> None:
    run = transcript(EHLO + b"BDAT 12\r\nRSET\r\nNOOP\r\nNOOP\r\n")
    assert run.replies[-2:] == ["503 5.5.1 Need MAIL command", "250 2.0.0 OK"]
    assert run.of(Reset) == [Reset()]  # EHLO's only: RSET was chunk content


def test_data_after_bdat_is_refused() -> None:
    run = transcript(ENVELOPE + b"BDAT 3\r\nabcDATA\r\n")
    assert run.replies[-1] == "503 5.5.1 DATA cannot follow BDAT in one transaction"


def test_bdat_syntax_error_closes() -> None:
    run = transcript(ENVELOPE + b"BDAT many\r\nMAIL FROM:<x@y>\r\n")
    assert run.replies[-2:] == [
        "501 5.5.4 Syntax: BDAT chunk-size [LAST]",
        "421 4.3.2 Service not available, closing transmission channel",
    ]
    assert len(run.of(MailFrom)) == 1
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="protocol")]


def test_bdat_over_the_size_limit() -> None:
    run = transcript(
        ENVELOPE + b"BDAT 80\r\n" + b"q" * 80 + b"BDAT 80 LAST\r\n" + b"q" * 80,
        limits=replace(SCRIPTED, message_size=100),
    )
    assert run.replies[-2:] == [
        "250 2.0.0 80 octets received",
        "552 5.3.4 Message size exceeds fixed maximum message size",
    ]
    assert run.of(MessageAborted)


def test_bdat_refused_at_start_discards_the_chunk() -> None:
    def refuse(event):  # type: ignore[no-untyped-def]
        from driver import accept_all

        return replies.QUEUE_FULL if isinstance(event, StartData) else accept_all(event)

    run = session().feed(ENVELOPE + b"BDAT 4 LAST\r\nMAILNOOP\r\n", answer=refuse)
    assert run.replies[-2:] == ["452 4.3.1 Insufficient system storage", "250 2.0.0 OK"]


# -- STARTTLS (RFC 3207) --------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    run = transcript(EHLO + b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n", tls=True)
    assert "250-STARTTLS" not in run.output.decode()  # last keyword has a space
    assert "250 STARTTLS" in run.output.decode()
    assert run.replies[-1] == "220 2.0.0 Ready to start TLS"
    assert run.of(StartTLS) == [StartTLS()]
    assert run.conn.state is State.TLS
    assert run.conn.next_event() is PAUSED
    run.conn.receive_data(b"RCPT TO:<evil@x>\r\n")  # plaintext during the handshake
    run.conn.tls_established()
    run.feed(b"MAIL FROM:<a@b.c>\r\n" + EHLO)
    assert run.of(MailFrom) == []
    assert run.replies[-2:] == ["503 5.5.1 Send EHLO or HELO first", "250 CHUNKING"]
    assert "STARTTLS" not in run.output.decode().rsplit("220 2.0.0", 1)[1]
    run.feed(b"STARTTLS\r\n")
    assert run.replies[-1] == "503 5.5.1 TLS already active"


def test_starttls_needs_ehlo_and_no_argument() -> None:
    assert transcript(b"STARTTLS\r\n", tls=True).replies[-1] == (
        "503 5.5.1 Send EHLO or HELO first"
    )
    assert transcript(EHLO + b"STARTTLS now\r\n", tls=True).replies[-1] == (
        "501 5.5.4 No parameters allowed"
    )


def test_failed_handshake_closes() -> None:
    run = transcript(EHLO + b"STARTTLS\r\n", tls=True)
    run.conn.tls_failed()
    assert run.conn.next_event() == ConnectionClosed(clean=False, reason="tls-failed")


# -- greeting, QUIT, timers ---------------------------------------------------------


def test_refused_greeting_answers_503_until_quit() -> None:
    run = session(greeting=replies.UNKNOWN_HOST.with_text("mx.test: unknown"))
    run.feed(EHLO + b"MAIL FROM:<a@b.c>\r\nQUIT\r\n")
    assert run.replies == [
        "554 5.7.1 mx.test: unknown",
        "503 5.5.1 Service refused; send QUIT",
        "503 5.5.1 Service refused; send QUIT",
        "221 2.0.0 mx.test closing connection",
    ]
    assert run.of(Hello) == []
    # A QUIT ends it, but the log is to say the session was refused.
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=True, reason="refused")]


def test_a_refused_client_that_vanishes_was_refused() -> None:
    run = session(greeting=replies.UNKNOWN_HOST.with_text("mx.test: unknown")).eof()
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="refused")]


def test_421_greeting_closes() -> None:
    run = session(greeting=replies.CANNOT_RESOLVE)
    assert run.conn.closed
    assert run.replies == ["421 4.4.3 Cannot resolve your address, try again later"]
    assert run.conn.next_event() == ConnectionClosed(clean=False, reason="refused")


def test_quit_ignores_what_follows() -> None:
    run = transcript(b"QUIT\r\nNOOP\r\n")
    assert run.codes == [220, 221]
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=True, reason="quit")]


def test_timers() -> None:
    limits = replace(SCRIPTED, command_timeout=30, data_timeout=90)
    run = transcript(EHLO, limits=limits)
    first = run.conn.timer
    assert first is not None and first.seconds == 30
    run.feed(b"NO")
    assert run.conn.timer == first  # a partial line does not restart the clock
    run.feed(b"OP\r\n")
    second = run.conn.timer
    assert second is not None and second.generation != first.generation
    run.feed(b"MAIL FROM:<>\r\nRCPT TO:<a@b.c>\r\nDATA\r\n")
    in_data = run.conn.timer
    assert in_data is not None and in_data.seconds == 90
    run.feed(b"line\r\n" * 10)
    assert run.conn.timer == in_data  # the whole transfer shares one budget
    run.conn.time_out()
    run.pump()
    assert run.replies[-1] == "421 4.4.2 Timeout waiting for input, closing transmission channel"
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="timeout")]


def test_shut_down_says_421() -> None:
    run = transcript(EHLO)
    run.conn.shut_down()
    run.pump()
    assert run.replies[-1] == "421 4.3.2 Server shutting down, closing transmission channel"
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="shutdown")]


def test_send_without_a_pending_decision_is_an_error() -> None:
    run = transcript(EHLO)
    with pytest.raises(RuntimeError):
        run.conn.send(replies.OK)


def test_event_order_for_a_decision() -> None:
    conn = ServerConnection(hostname="mx.test")
    conn.send(replies.GREETING)
    conn.data_to_send()
    conn.receive_data(b"EHLO a\r\n")
    assert conn.next_event() == Hello(kind="EHLO", name="a")
    assert conn.next_event() is PAUSED
    conn.send(replies.HELLO)
    assert conn.next_event() == Reset()
    assert conn.next_event() is NEED_DATA


def test_shut_down_waits_for_a_decision_under_way() -> None:
    conn = ServerConnection(hostname="mx.test", limits=SCRIPTED)
    conn.send(replies.GREETING)
    conn.data_to_send()
    conn.receive_data(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
    answers = {
        Hello: replies.HELLO,
        MailFrom: replies.SENDER_OK,
        RcptTo: replies.RECIPIENT_OK,
        StartData: replies.START_DATA,
    }
    while not isinstance(event := conn.next_event(), MessageComplete):
        if event in (PAUSED, NEED_DATA):
            raise AssertionError(event)
        if type(event) in answers:
            conn.send(answers[type(event)])
    conn.shut_down()  # SIGTERM while the message is being committed
    conn.send(replies.QUEUED)
    assert (
        conn.data_to_send()
        .decode()
        .endswith(
            "250 2.0.0 Submitted & queued\r\n"
            "421 4.3.2 Server shutting down, closing transmission channel\r\n"
        )
    )
    assert isinstance(conn.next_event(), ConnectionClosed)


# -- The door: talking out of turn (RFC 5321 3.1, RFC 2920 3.1) ---------------

PREGREET = "521 5.5.1 Protocol error: talked before the greeting"
OUT_OF_TURN = "554 5.5.0 SMTP protocol synchronization error"


def unwritten(limits: Limits | None = None) -> Run:
    """A session whose greeting is made but not yet written (the greeting's pause)."""
    conn = ServerConnection(hostname="mx.test", limits=limits or Limits())
    conn.send(replies.GREETING.with_text("mx.test ready"))
    return Run(conn)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("data", [b"EHLO c\r\n", b"\r\n", b"x", b"QUIT\r\n", b"EHLO c\r\nQUIT\r\n"])
def test_pregreet_is_refused_instead_of_the_greeting(data: bytes, step: int | None) -> None:
    run = unwritten().feed(data, step=step)
    assert run.output.decode() == PREGREET + "\r\n"  # no 220 ever went out
    assert run.of(OutOfTurn) == [
        OutOfTurn(
            reason="pregreet",
            command="greeting",
            received=data[: step or None],
            reply=replies.PREGREET,
        )
    ]
    # Nothing but the refusal and the end, however often the driver asks.
    assert {type(e) for e in run.events[1:]} == {ConnectionClosed}
    assert run.events[1] == ConnectionClosed(clean=False, reason="refused")


def test_pregreet_is_refused_even_without_the_pipelining_rule() -> None:
    run = unwritten(SCRIPTED).feed(b"EHLO c\r\n")
    assert run.replies == [PREGREET]


def test_greet_pause_holds_the_greeting_and_what_comes_after_it_is_served() -> None:
    run = unwritten(Limits(greet_pause=6.0))
    assert run.conn.delay == 6.0
    assert run.conn.data_to_send() == b"220 mx.test ready\r\n"
    assert run.conn.delay == 0.0
    run.feed(b"EHLO c\r\n")
    assert run.replies[-1] == "250 CHUNKING"
    assert run.of(OutOfTurn) == []


def test_a_refusing_greeting_is_not_paused() -> None:
    run = session(limits=Limits(greet_pause=6.0), greeting=replies.NO_SERVICE)
    assert run.conn.delay == 0.0
    assert run.replies == ["554 5.7.1 No SMTP service here"]


LOCKSTEP_EHLO = [b"EHLO c\r\n"]
LOCKSTEP_HELO = [b"HELO c\r\n"]
LOCKSTEP_ENVELOPE = [
    b"EHLO c\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"RCPT TO:<b@example.net>\r\n",
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    ("before", "command", "after", "verb"),
    [
        # No PIPELINING offered: not yet (before EHLO's reply), or not at all (HELO).
        ([], b"EHLO c\r\n", b"MAIL FROM:<a@example.org>\r\n", "EHLO"),
        ([], b"NOOP\r\n", b"NOOP\r\n", "NOOP"),
        (LOCKSTEP_HELO, b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n", "MAIL"),
        (LOCKSTEP_HELO, b"RSET\r\n", b"N", "RSET"),
        (LOCKSTEP_HELO, b"BAD\r\n", b"NOOP\r\n", "BAD"),
        # Offered: EHLO, HELO and DATA still end a group (RFC 2920 3.1).
        (LOCKSTEP_EHLO, b"EHLO again\r\n", b"NOOP\r\n", "EHLO"),
        (LOCKSTEP_EHLO, b"HELO again\r\n", b"MAIL FROM:<>\r\n", "HELO"),
        (LOCKSTEP_ENVELOPE, b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", "DATA"),
        (LOCKSTEP_ENVELOPE, b"DATA\r\n", b"\r\n", "DATA"),
        # A DATA that would be refused anyway is no exception.
        (LOCKSTEP_EHLO, b"DATA\r\n", b"x\r\n.\r\n", "DATA"),
    ],
)
def test_input_past_a_reply_the_client_must_wait_for_is_refused(
    before: list[bytes], command: bytes, after: bytes, verb: str, step: int | None
) -> None:
    run = session(limits=Limits())
    for line in before:
        run.feed(line, step=step)  # each after the last reply went out
    decisions = len(run.events)
    # The command may come in pieces; its end comes with what follows it.
    run.feed(command[:-1], step=step)
    run.feed(command[-1:] + after)
    assert run.replies[-1] == OUT_OF_TURN
    assert run.of(OutOfTurn) == [
        OutOfTurn(reason="pipelining", command=verb, received=after, reply=replies.OUT_OF_TURN)
    ]
    assert run.of(ConnectionClosed) == [ConnectionClosed(clean=False, reason="refused")]
    # The command itself was not carried out.
    assert [type(e) for e in run.events[decisions:]] == [OutOfTurn, ConnectionClosed]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    ("before", "group", "codes"),
    [
        # RFC 2920: after EHLO offered PIPELINING, a group ends with DATA...
        (
            LOCKSTEP_EHLO,
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n"
            b"DATA\r\n",
            [250, 250, 250, 354],
        ),
        (LOCKSTEP_EHLO, b"RSET\r\nNOOP\r\nVRFY x\r\nBAD\r\nNOOP\r\n", [250, 250, 252, 500, 250]),
        # ...and BDAT may be followed by its chunk and more (RFC 3030 4.2).
        (
            LOCKSTEP_ENVELOPE,
            b"BDAT 3\r\nabcBDAT 2 LAST\r\ndeMAIL FROM:<>\r\nRCPT TO:<x@example.net>\r\nQUIT\r\n",
            [250, 250, 250, 250, 221],
        ),
        # Content may be followed by the next group at once.
        (
            [*LOCKSTEP_ENVELOPE, b"DATA\r\n"],
            b"x\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.net>\r\nQUIT\r\n",
            [250, 250, 250, 221],
        ),
        # QUIT is answered whatever follows it.
        (LOCKSTEP_HELO, b"QUIT\r\nNOOP\r\n", [221]),
    ],
)
def test_pipelining_that_pipelining_allows_is_served(
    before: list[bytes], group: bytes, codes: list[int], step: int | None
) -> None:
    run = session(limits=Limits())
    for line in before:
        run.feed(line, step=step)
    seen = len(run.codes)
    run.feed(group)
    assert run.codes[seen:] == codes
    assert run.of(OutOfTurn) == []


def test_lockstep_client_fed_octet_by_octet_is_served() -> None:
    run = session(limits=Limits())
    for line in [b"HELO c\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n"]:
        run.feed(line, step=1)
    run.feed(b"x\r\n.\r\n")
    run.feed(b"QUIT\r\n", step=1)
    assert run.codes == [220, 250, 250, 250, 354, 250, 221]


def test_input_while_a_reply_is_held_back_is_out_of_turn() -> None:
    # The reply is made but not yet written (the tarpit holds it): a client
    # that sends meanwhile has not read it.
    run = session(limits=Limits())
    run.feed(b"HELO c\r\n")
    conn = run.conn
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"NOOP\r\n")
    assert conn.data_to_send() == ("250 2.0.0 OK\r\n" + OUT_OF_TURN + "\r\n").encode()
    assert conn.next_event() == OutOfTurn(
        reason="pipelining", command="NOOP", received=b"NOOP\r\n", reply=replies.OUT_OF_TURN
    )
    assert conn.next_event() == ConnectionClosed(clean=False, reason="refused")


def test_content_before_the_354_is_written_is_out_of_turn() -> None:
    run = session(limits=Limits())
    for line in LOCKSTEP_ENVELOPE:
        run.feed(line)
    conn = run.conn
    conn.receive_data(b"DATA\r\n")
    assert isinstance(conn.next_event(), StartData)
    conn.send(replies.START_DATA)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x\r\n.\r\n")
    assert conn.data_to_send().decode() == (
        "354 Start mail input; end with <CRLF>.<CRLF>\r\n" + OUT_OF_TURN + "\r\n"
    )
    assert [conn.next_event(), conn.next_event()] == [
        OutOfTurn(
            reason="pipelining", command="DATA", received=b"x\r\n.\r\n", reply=replies.OUT_OF_TURN
        ),
        ConnectionClosed(clean=False, reason="refused"),
    ]


def test_pipelining_rule_off_serves_a_whole_script() -> None:
    run = session(limits=Limits(forbid_unauth_pipelining=False))
    run.feed(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    assert run.codes == [220, 250, 250, 250, 354, 250, 221]
