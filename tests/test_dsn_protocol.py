"""DSN (RFC 3461) in pieces: the sans-IO core (EHLO, MAIL's RET and ENVID, RCPT's
NOTIFY and ORCPT), the configuration, and deliver's choice of notices."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path as PathLib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver import EHLO, transcript
from mmdf_smtp.config import ConfigError, parse
from mmdf_smtp.delivery.dsn import Action, Asked, Report, action_for, delay_due, grouped
from mmdf_smtp.protocol import MailFrom, Path, RcptTo
from mmdf_smtp.protocol.dsnparams import (
    decode_xtext,
    encode_xtext,
    orcpt_parameter,
    parse_envid,
    parse_notify,
    parse_orcpt,
)

SENDER = Path(local="a", domain="example.org")
RECIPIENT = Path(local="b", domain="example.net")
BAD = "501 5.5.4 Invalid parameter: "


def test_ehlo_offers_dsn() -> None:
    run = transcript(EHLO)
    assert "250-DSN" in run.output.decode().split("\r\n")


@pytest.mark.parametrize(
    ("params", "ret", "envid"),
    [
        (b" RET=FULL", "FULL", None),
        (b" RET=hdrs", "HDRS", None),
        (b" ENVID=QQ314159", None, "QQ314159"),
        (b" ENVID=a+2Bb+3Dc+20d", None, "a+b=c d"),
        (b" RET=HDRS ENVID=x ret=hdrs ENVID=x", "HDRS", "x"),
        (b" ENVID=" + b"e" * 100, None, "e" * 100),
    ],
)
def test_mail_dsn_parameters_reach_the_event(
    params: bytes, ret: str | None, envid: str | None
) -> None:
    run = transcript(EHLO + b"MAIL FROM:<a@example.org>" + params + b"\r\n")
    assert run.replies[-1] == "250 2.1.0 Sender OK"
    assert run.of(MailFrom) == [MailFrom(sender=SENDER, ret=ret, envid=envid)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b" RET=ALL", BAD + "RET takes FULL or HDRS"),
        (b" RET", BAD + "RET takes FULL or HDRS"),
        (b" ENVID", BAD + "ENVID takes a value"),
        (b" ENVID=" + b"e" * 101, BAD + "ENVID longer than 100 characters"),
        (b" ENVID=a+2b", BAD + "not xtext"),  # hexchar digits are upper case
        (b" ENVID=a+2", BAD + "not xtext"),
        (b" ENVID=a+0A", BAD + "ENVID is not printable US-ASCII"),
        (b" ENVID=a+C3+A4", BAD + "ENVID is not printable US-ASCII"),
        (b" RET=FULL RET=HDRS", "501 5.5.4 Duplicate RET with another value"),
        (b" ENVID=x ENVID=X", "501 5.5.4 Duplicate ENVID with another value"),
        (b" XENVID=x", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"),
    ],
)
def test_malformed_mail_dsn_parameters(params: bytes, reply: str) -> None:
    run = transcript(EHLO + b"MAIL FROM:<a@example.org>" + params + b"\r\n")
    assert run.replies[-1] == reply
    assert run.of(MailFrom) == []


@pytest.mark.parametrize(
    ("params", "notify", "orcpt"),
    [
        (b" NOTIFY=NEVER", ("NEVER",), None),
        (b" NOTIFY=never", ("NEVER",), None),
        (b" NOTIFY=SUCCESS", ("SUCCESS",), None),
        (b" NOTIFY=DELAY,FAILURE", ("FAILURE", "DELAY"), None),
        (b" NOTIFY=delay,success,failure", ("SUCCESS", "FAILURE", "DELAY"), None),
        (b" NOTIFY=SUCCESS,SUCCESS", ("SUCCESS",), None),
        (b" ORCPT=rfc822;b@example.net", None, "rfc822;b@example.net"),
        (b" ORCPT=rfc822;b+2Bx@example.net", None, "rfc822;b+x@example.net"),
        (b" NOTIFY=FAILURE ORCPT=rfc822;c@example.org", ("FAILURE",), "rfc822;c@example.org"),
        (b" ORCPT=rfc822;" + b"o" * 493, None, "rfc822;" + "o" * 493),
    ],
)
def test_rcpt_dsn_parameters_reach_the_event(
    params: bytes, notify: tuple[str, ...] | None, orcpt: str | None
) -> None:
    run = transcript(
        EHLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>" + params + b"\r\n"
    )
    assert run.replies[-1] == "250 2.1.5 Recipient OK"
    assert run.of(RcptTo) == [RcptTo(recipient=RECIPIENT, notify=notify, orcpt=orcpt)]


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b" NOTIFY=NEVER,FAILURE", BAD + "NOTIFY=NEVER must stand alone"),
        (b" NOTIFY=SUCCESS,NEVER", BAD + "NOTIFY=NEVER must stand alone"),
        (b" NOTIFY=ALWAYS", BAD + "NOTIFY takes NEVER or a list of SUCCESS, FAILURE and DELAY"),
        (b" NOTIFY=SUCCESS,", BAD + "NOTIFY takes NEVER or a list of SUCCESS, FAILURE and DELAY"),
        (b" NOTIFY", BAD + "NOTIFY takes a value"),
        (b" ORCPT=b@example.net", BAD + "ORCPT takes addr-type;xtext"),
        (b" ORCPT=;b@example.net", BAD + "ORCPT takes addr-type;xtext"),
        (b" ORCPT=rfc822;", BAD + "ORCPT's address is not printable US-ASCII"),
        (b" ORCPT=rfc822;b+@example.net", BAD + "not xtext"),
        (b" ORCPT=rfc822;" + b"o" * 494, BAD + "ORCPT longer than 500 characters"),
        (b" NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4 Duplicate NOTIFY with another value"),
        (b" XORCPT=x", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"),
        (b" RET=FULL", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"),
    ],
)
def test_malformed_rcpt_dsn_parameters(params: bytes, reply: str) -> None:
    run = transcript(
        EHLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>" + params + b"\r\n"
    )
    assert run.replies[-1] == reply
    assert run.of(RcptTo) == []


def test_mail_parameters_are_not_rcpt_parameters() -> None:
    run = transcript(EHLO + b"MAIL FROM:<a@example.org> NOTIFY=NEVER\r\n")
    assert run.replies[-1] == "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized"


# -- properties ------------------------------------------------------------------

printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
any_text = st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=60)
conditions = st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, max_size=5)


@given(any_text)
def test_xtext_round_trips(text: str) -> None:
    encoded = encode_xtext(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert decode_xtext(encoded) == text


@given(st.text(max_size=40))
def test_xtext_decoding_takes_xtext_only(text: str) -> None:
    try:
        decoded = decode_xtext(text)
    except ValueError:
        return
    # Whatever decodes was xtext: encoding it again gives the canonical form,
    # which decodes alike.
    assert decode_xtext(encode_xtext(decoded)) == decoded
    assert "=" not in text and " " not in text and text.isascii()


@given(printable.filter(bool))
def test_an_envid_comes_back_as_sent(envid: str) -> None:
    encoded = encode_xtext(envid)
    if len(encoded) > 100:
        with pytest.raises(ValueError, match="longer than 100"):
            parse_envid(encoded)
    else:
        assert parse_envid(encoded) == envid


@given(printable.filter(bool), st.sampled_from(["rfc822", "RFC822", "x-local"]))
def test_an_orcpt_is_handed_on_as_received(address: str, addr_type: str) -> None:
    value = f"{addr_type};{encode_xtext(address)}"
    if len(value) > 500:
        return
    assert parse_orcpt(value) == f"{addr_type};{address}"
    assert orcpt_parameter(parse_orcpt(value)) == value


@given(conditions)
def test_notify_lists_come_out_in_canonical_order(words: list[str]) -> None:
    asked = parse_notify(",".join(w.lower() if i % 2 else w for i, w in enumerate(words)))
    assert set(asked) == set(words)
    assert list(asked) == sorted(asked, key=["SUCCESS", "FAILURE", "DELAY"].index)


@given(conditions)
def test_never_with_anything_else_is_refused(words: list[str]) -> None:
    with pytest.raises(ValueError, match="NEVER must stand alone"):
        parse_notify(",".join([*words, "NEVER"]))


@given(
    st.lists(
        st.sampled_from(
            [" NOTIFY=NEVER", " NOTIFY=SUCCESS,DELAY", " ORCPT=rfc822;x+2By@z", " NOTIFY=bogus"]
        ),
        max_size=3,
    )
)
def test_rcpt_parameters_decide_as_each_would(params: list[str]) -> None:
    line = "RCPT TO:<b@example.net>" + "".join(params)
    run = transcript(EHLO + b"MAIL FROM:<a@example.org>\r\n" + line.encode() + b"\r\n")
    distinct_notify = {p for p in params if p.startswith(" NOTIFY")}
    if " NOTIFY=bogus" in params and len(distinct_notify) == 1:
        assert run.replies[-1].startswith(BAD)
    elif len(distinct_notify) > 1:
        assert run.replies[-1] == "501 5.5.4 Duplicate NOTIFY with another value"
    else:
        assert run.replies[-1] == "250 2.1.5 Recipient OK"
        [event] = run.of(RcptTo)
        assert isinstance(event, RcptTo)
        assert (event.notify is not None) == bool(distinct_notify)
        assert (event.orcpt == "rfc822;x+y@z") == (" ORCPT=rfc822;x+2By@z" in params)


def test_rcpt_and_mail_lines_grow_by_what_dsn_adds() -> None:
    # RFC 3461 4: MAIL by 110 characters, RCPT by 500; other commands keep 512.
    mail = b"MAIL FROM:<a@example.org> ENVID=" + b"e" * 100
    mail += b" X" * ((512 + 110 - len(mail) - 2) // 2)
    rcpt = b"RCPT TO:<b@example.net> ORCPT=rfc822;" + b"o" * 493
    rcpt += b" X" * ((512 + 500 - len(rcpt) - 2) // 2)
    noop = b"NOOP " + b"x" * (512 - 6)
    run = transcript(EHLO + mail + b"\r\n" + noop + b"\r\n")
    assert run.replies[-2:] == [
        "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized",  # read whole, then judged
        "500 5.5.2 Line too long",
    ]
    run = transcript(EHLO + b"MAIL FROM:<a@example.org>\r\n" + rcpt + b"\r\n" + rcpt + b"X\r\n")
    assert run.replies[-2:] == [
        "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized",
        "500 5.5.2 Line too long",
    ]


# -- configuration ------------------------------------------------------------------


def test_dsn_and_delimiter_keys() -> None:
    default = parse("", "f.toml", base=PathLib("/")).deliver
    assert (default.recipient_delimiter, default.delay_warning) == ("+", 0)
    text = '[deliver]\nrecipient_delimiter = "-+"\ndelay_warning = 14400\n'
    deliver = parse(text, "f.toml", base=PathLib("/")).deliver
    assert (deliver.recipient_delimiter, deliver.delay_warning) == ("-+", 14400)
    off = parse('[deliver]\nrecipient_delimiter = ""\n', "f.toml", base=PathLib("/"))
    assert off.deliver.recipient_delimiter == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[deliver]\nrecipient_delimiter = "@"\n',
            "f.toml:2: deliver.recipient_delimiter: must be printable ASCII",
        ),
        (
            '[deliver]\nrecipient_delimiter = "+ "\n',
            "f.toml:2: deliver.recipient_delimiter: must be printable ASCII",
        ),
        ("[deliver]\nrecipient_delimiter = 1\n", "f.toml:2: deliver.recipient_delimiter: must be"),
        ("[deliver]\ndelay_warning = -1\n", "f.toml:2: deliver.delay_warning: must be at least 0"),
    ],
)
def test_dsn_and_delimiter_keys_are_checked(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.toml", base=PathLib("/"))
    assert str(caught.value).startswith(message)


# -- which notice (delivery/dsn.py) ---------------------------------------------------

NOTIFY_VALUES = [None, ("NEVER",), ("SUCCESS",), ("FAILURE",), ("DELAY",), ("SUCCESS", "DELAY")]


@pytest.mark.parametrize("notify", NOTIFY_VALUES)
def test_which_notice_a_new_state_calls_for(notify: tuple[str, ...] | None) -> None:
    asked = Asked(notify)
    wants = set(notify or ())
    failed = notify is None or "FAILURE" in wants
    assert action_for(asked, "bounced", local=True) == ("failed" if failed else None)
    assert action_for(asked, "deferred", local=True) is None
    delayed = notify is None or "DELAY" in wants
    assert action_for(asked, "deferred", local=False, delay_due=True) == (
        "delayed" if delayed else None
    )
    success = "SUCCESS" in wants
    assert action_for(asked, "delivered", local=True) == ("delivered" if success else None)
    assert action_for(asked, "delivered", local=False) == ("relayed" if success else None)
    assert action_for(asked, "delivered", local=False, hop_offers_dsn=True) is None


ARRIVAL = datetime(2026, 1, 1, tzinfo=UTC)


@given(
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=12),
    st.integers(min_value=0, max_value=20000),
)
def test_a_delay_is_due_once_whatever_the_retries(gaps: list[int], warning: int) -> None:
    tries = list(itertools.accumulate(gaps))
    previous = [None, *tries[:-1]]
    due = [
        delay_due(
            ARRIVAL,
            ARRIVAL + timedelta(seconds=p) if p is not None else None,
            ARRIVAL + timedelta(seconds=t),
            warning,
        )
        for p, t in zip(previous, tries, strict=True)
    ]
    if warning == 0 or tries[-1] < warning:
        assert not any(due)
    else:
        # The first try at or after the warning time, and no other.
        assert due.index(True) == next(i for i, t in enumerate(tries) if t >= warning)
        assert due.count(True) == 1


def test_grouped_makes_one_notice_per_kind() -> None:
    def report(action: Action, address: str) -> Report:
        return Report(address, address, "250 2.0.0 OK", action=action)

    reports = [
        report("relayed", "a@x"),
        report("failed", "b@x"),
        report("delivered", "c@x"),
        report("delayed", "d@x"),
        report("failed", "e@x"),
    ]
    assert [[r.address for r in group] for group in grouped(reports)] == [
        ["b@x", "e@x"],
        ["d@x"],
        ["a@x", "c@x"],
    ]


@given(
    st.lists(
        st.sampled_from([" RET=FULL", " RET=hdrs", " ENVID=a+2Bb", " RET=bogus", " SIZE=10"]),
        max_size=3,
    )
)
def test_mail_parameters_decide_as_each_would(params: list[str]) -> None:
    run = transcript(EHLO + ("MAIL FROM:<a@example.org>" + "".join(params) + "\r\n").encode())
    rets = {p.upper() for p in params if p.startswith(" RET")}
    if len(rets) > 1:
        assert run.replies[-1] == "501 5.5.4 Duplicate RET with another value"
    elif rets == {" RET=BOGUS"}:
        assert run.replies[-1] == BAD + "RET takes FULL or HDRS"
    else:
        assert run.replies[-1] == "250 2.1.0 Sender OK"
        [event] = run.of(MailFrom)
        assert isinstance(event, MailFrom)
        assert event.ret == (rets.pop()[5:] if rets else None)
        assert event.envid == ("a+b" if " ENVID=a+2Bb" in params else None)
        assert event.size == (10 if " SIZE=10" in params else None)
