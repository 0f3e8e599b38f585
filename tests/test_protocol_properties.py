"""Property tests for the grammar and the connection (hypothesis).

The bounded runs here go in every test run; ``--soak`` raises the example
counts for a long run by hand.
"""

from __future__ import annotations

import re
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver import EHLO, ENVELOPE, SCRIPTED, session
from mmdf_smtp.protocol import (
    ConnectionClosed,
    Limits,
    MessageComplete,
    OutOfTurn,
    Path,
    State,
    replies,
)
from mmdf_smtp.protocol.content import ContentChecker, DotReader
from mmdf_smtp.protocol.grammar import (
    GrammarError,
    parse_mail,
    parse_parameters,
    parse_path,
    parse_rcpt,
    split_command,
)

ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)
atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
dot_string = st.lists(atom, min_size=1, max_size=4).map(".".join)
quoted = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=12
).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
local_part = st.one_of(dot_string, quoted).filter(lambda s: len(s) <= 64)
ipv4 = st.ip_addresses(v=4).map(lambda a: f"[{a}]")
ipv6 = st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]")
mail_domain = st.one_of(domain, ipv4, ipv6)

REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][^\r\n]*\r\n")


@given(local_part, mail_domain)
def test_valid_paths_parse_back_to_their_parts(local: str, dom: str) -> None:
    path = parse_path(f"<{local}@{dom}>", bad=replies.BAD_SENDER_ADDRESS, allow_null=False)
    assert path == Path(local=local, domain=dom)


@given(st.lists(domain, min_size=1, max_size=3), dot_string, domain)
def test_source_routes_are_ignored(route: list[str], local: str, dom: str) -> None:
    adl = ",".join("@" + r for r in route)
    path = parse_path(f"<{adl}:{local}@{dom}>", bad=replies.BAD_SENDER_ADDRESS, allow_null=True)
    assert path == Path(local=local, domain=dom)


parameter = st.tuples(
    st.sampled_from(["SIZE", "size", "BODY", "Body", "SMTPUTF8", "X-A"]),
    st.one_of(st.none(), st.sampled_from(["1", "12", "7BIT", "7bit", "8BITMIME", "v"])),
)


@given(st.lists(parameter, max_size=6))
def test_repeated_parameters_pass_alike_and_fail_when_they_differ(
    given_params: list[tuple[str, str | None]],
) -> None:
    text = " ".join(k if v is None else f"{k}={v}" for k, v in given_params)

    def meaning(keyword: str, value: str | None) -> str | None:
        # BODY's values are keywords, case-blind; SIZE's and unknown
        # parameters' are compared as sent.
        return value.upper() if value is not None and keyword == "BODY" else value

    values: dict[str, set[str | None]] = {}
    for keyword, value in given_params:
        values.setdefault(keyword.upper(), set()).add(meaning(keyword.upper(), value))
    try:
        parsed = parse_parameters(text)
    except GrammarError as exc:
        assert exc.reply.code == 501
        assert any(len(seen) > 1 for seen in values.values())
    else:
        assert all(len(seen) == 1 for seen in values.values())
        assert {k: meaning(k, v) for k, v in parsed.items()} == {
            k: next(iter(seen)) for k, seen in values.items()
        }


@given(st.text(max_size=300))
def test_mail_and_rcpt_parsers_only_raise_grammar_errors(text: str) -> None:
    for parse in (parse_mail, parse_rcpt):
        try:
            parsed = parse(text)
        except GrammarError as exc:
            assert exc.reply.code in (501, 553)
        else:
            assert text[:3].upper() in ("FRO", "TO:")
            del parsed


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
)


@given(lines, st.lists(st.integers(min_value=0), max_size=10))
def test_dot_reader_undoes_any_stuffing_at_any_split(body: list[bytes], cuts: list[int]) -> None:
    message = b"".join(line + b"\r\n" for line in body)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body)
    reader = DotReader(Limits())
    buffer = bytearray()
    out, ended = [], False
    for piece in [*_split(stuffed + b".\r\nNEXT", cuts)]:
        buffer += piece
        while not ended:
            block, ended = reader.read(buffer)
            out.append(block)
            if not block and not ended:
                break
    assert ended
    assert b"".join(out) == message
    assert bytes(buffer) == b"NEXT"[: len(buffer)]


def _problems_of_whole(content: bytes, limit: int, *, allow_nul: bool = True) -> set[bytes]:
    """The problems the content has, worked out from all of it at once, line by line."""
    if not allow_nul and b"\0" in content:
        # A NUL is found in the block that holds it, but a line end or a
        # line's length (a NUL counts as any octet) may be found wrong first.
        return {
            replies.NUL_IN_DATA.to_bytes(),
            *_problems_of_whole(content.replace(b"\0", b"a"), limit),
        }
    unpaired = content.replace(b"\r\n", b"")
    if b"\r" in unpaired or b"\n" in unpaired:
        # Which lines are too long then depends on where a line is taken to
        # end; the checker may meet either problem first.
        return {replies.BARE_LINE_END_IN_DATA.to_bytes(), replies.DATA_LINE_TOO_LONG.to_bytes()}
    *ended, last = content.split(b"\r\n")
    if any(len(line) + 2 > limit for line in ended) or len(last) > limit:
        return {replies.DATA_LINE_TOO_LONG.to_bytes()}  # the last line, still open (BDAT)
    return set()


@settings(max_examples=500)
@given(
    st.lists(st.sampled_from([b"a", b"a" * 5, b"\r\n", b"\r", b"\n", b"\0"]), max_size=40),
    st.integers(min_value=2, max_value=12),
    st.lists(st.integers(min_value=0), max_size=8),
    st.booleans(),
)
def test_content_checker_finds_at_any_split_what_the_whole_shows(
    parts: list[bytes], limit: int, cuts: list[int], allow_nul: bool
) -> None:
    content = b"".join(parts)
    checker = ContentChecker(Limits(text_line=limit, allow_nul=allow_nul))
    for piece in _split(content, cuts):
        checker.feed(piece)
    checker.finish()
    problems = _problems_of_whole(content, limit, allow_nul=allow_nul)
    if checker.problem is None:
        assert not problems
    else:
        assert checker.problem.to_bytes() in problems


_HEADER_LINES = [
    *(b"Received: from x", b"RECEIVED:y", b"received:", b"Receive", b"Subject: s"),
    *(b"\tReceived: folded", b"X-Received: z", b"", b"body"),
]


def _received_in_header_section(content: bytes) -> int:
    """RFC 5322's header section, line by line: the Received fields in it."""
    count = 0
    for line in content.split(b"\r\n")[:-1]:  # the last, unended, is not a field yet
        if not line:
            break
        count += line[:9].lower() == b"received:"
    return count


@settings(max_examples=500)
@given(
    st.lists(
        st.sampled_from(_HEADER_LINES),
        max_size=30,
    ),
    st.integers(min_value=0, max_value=6),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_received_fields_are_counted_at_any_split(
    lines: list[bytes], limit: int, cuts: list[int]
) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    checker = ContentChecker(Limits(received_headers=limit))
    for piece in _split(content, cuts):
        checker.feed(piece)
    checker.finish()
    too_many = _received_in_header_section(content) > limit
    assert checker.problem == (replies.TOO_MANY_HOPS if too_many else None)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=8))
def test_any_input_gives_well_formed_replies_and_bounded_buffers(
    data: bytes, cuts: list[int]
) -> None:
    run = session(limits=replace(SCRIPTED, errors=1000))
    for piece in _split(EHLO + data, cuts):
        run.feed(piece)
        assert run.conn.pending_input <= 70_000
    run.eof()
    out = bytes(run.output)
    assert REPLY_LINE.sub(b"", out) == b""
    assert isinstance(run.events[-1], ConnectionClosed)


commands = st.sampled_from(
    [
        b"EHLO x\r\n",
        b"HELO y\r\n",
        b"MAIL FROM:<a@b.c>\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<d@e.f>\r\n",
        b"DATA\r\n",
        b"hello\r\n",
        b".\r\n",
        b"BDAT 3\r\nabc",
        b"BDAT 0 LAST\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"VRFY x\r\n",
        b"STARTTLS\r\n",
        b"\r\n",
        b"\n",
        b"x" * 600 + b"\r\n",
    ]
)


@settings(max_examples=300)
@given(st.lists(commands, max_size=30))
def test_command_sequences_keep_the_state_consistent(script: list[bytes]) -> None:
    run = session(limits=replace(SCRIPTED, errors=1000))
    run.feed(b"".join(script))
    conn = run.conn
    if conn.mail is None:
        assert conn.recipients == 0
    completed = run.of(MessageComplete)
    assert len(completed) <= script.count(b".\r\n") + script.count(b"BDAT 0 LAST\r\n")
    assert REPLY_LINE.sub(b"", bytes(run.output)) == b""


def test_whole_envelope_fed_octet_by_octet_matches_whole() -> None:
    data = ENVELOPE + b"DATA\r\nabc\r\n.\r\nQUIT\r\n"
    whole = session().feed(data)
    bytewise = session().feed(data, step=1)
    assert whole.output == bytewise.output
    assert whole.content == bytewise.content


lockstep_commands = st.sampled_from(
    [
        b"HELO y\r\n",
        b"MAIL FROM:<a@b.c>\r\n",
        b"RCPT TO:<d@e.f>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"VRFY x\r\n",
        b"HELP\r\n",
        b"BAD\r\n",
        b"\r\n",
    ]
)


@settings(max_examples=300)
@given(st.lists(lockstep_commands, min_size=1, max_size=12), st.lists(st.integers(0), max_size=6))
def test_a_client_that_waits_for_each_reply_is_never_out_of_turn(
    script: list[bytes], cuts: list[int]
) -> None:
    run = session(limits=Limits(errors=1000))
    for command in [b"HELO x\r\n", *script]:
        for piece in _split(command, cuts):
            run.feed(piece)
        if run.conn.state is State.DATA:
            run.feed(b"content\r\n.\r\n")
    assert run.of(OutOfTurn) == []
    assert not run.conn.closed


@settings(max_examples=300)
@given(
    st.sampled_from([b"EHLO x\r\n", b"HELO x\r\n"]),
    st.lists(lockstep_commands, min_size=1, max_size=12),
    st.binary(min_size=1, max_size=20),
    st.lists(st.integers(0), max_size=6),
)
def test_without_pipelining_offered_a_second_command_in_a_piece_is_refused(
    hello: bytes, script: list[bytes], trailing: bytes, cuts: list[int]
) -> None:
    run = session(limits=Limits(errors=1000))
    if hello.startswith(b"HELO"):
        run.feed(hello)  # a HELO session: PIPELINING is never offered
        commands = script
    else:
        commands = [hello, *script]  # before EHLO's reply it is not offered yet
    first, rest = commands[0], b"".join(commands[1:]) + trailing
    *pieces, last = _split(first, cuts)
    for piece in pieces:
        run.feed(piece)
    run.feed(last + rest)  # the command's end and what follows, together
    assert run.of(OutOfTurn) == [
        OutOfTurn(
            reason="pipelining",
            command=split_command(first[:-2].decode()).verb,
            received=rest[:64],
            reply=replies.OUT_OF_TURN,
        )
    ]
    assert run.replies[-1] == "554 5.5.0 SMTP protocol synchronization error"
    assert run.conn.closed
