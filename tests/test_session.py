"""The session layer's own output, apart from the wire."""

from __future__ import annotations

import re
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.protocol import Hello, Limits, MailFrom, Reset, replies
from mmdf_smtp.protocol.grammar import is_domain_or_literal
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.session import Client, Session


def _session(tmp_path: Path) -> Session:
    return Session(
        hostname="mx.example",
        client=Client(host="[127.0.0.1]", address="127.0.0.1"),
        channel=None,
        refusal=None,
        check_recipient=lambda channel, path: None,
        queue=Spool(tmp_path),
        limits=Limits(),
        tls_available=False,
    )


def test_received_date_is_written_in_the_clocks_own_zone(tmp_path: Path) -> None:
    session = _session(tmp_path)
    moment = datetime(2026, 12, 1, 11, 0, 0, 250_000, tzinfo=UTC)
    # The same instant twice: the date made for the first must not serve the second.
    in_utc = session.received_header("q1", moment)
    in_cet = session.received_header("q2", moment.astimezone(timezone(timedelta(hours=1))))
    assert in_utc.endswith(b"; Tue, 01 Dec 2026 11:00:00 +0000\r\n")
    assert in_cet.endswith(b"; Tue, 01 Dec 2026 12:00:00 +0100\r\n")


def _received_after_helo(tmp_path: Path, helo: str, *, smtputf8: bool = False) -> bytes:
    session = _session(tmp_path)
    conn = session.connection
    conn.send(replies.GREETING)
    mail = f"MAIL FROM:<a@example.net>{' SMTPUTF8' if smtputf8 else ''}"
    for command, answer in ((f"EHLO {helo}", replies.HELLO), (mail, replies.SENDER_OK)):
        conn.data_to_send()  # the client reads each reply before its next command
        conn.receive_data(command.encode() + b"\r\n")
        event = conn.next_event()
        while isinstance(event, Reset):  # a positive EHLO resets the transaction
            event = conn.next_event()
        assert isinstance(event, (Hello, MailFrom)), event
        conn.send(answer)
    return session.received_header("q1", datetime(2026, 12, 1, tzinfo=UTC)).split(b"\r\n")[0]


@pytest.mark.parametrize(
    ("helo", "smtputf8", "first_line"),
    [
        ("client.example", False, "Received: from client.example ([127.0.0.1])"),
        ("[192.0.2.7]", False, "Received: from [192.0.2.7] ([127.0.0.1])"),
        ("[IPv6:2001:db8::7]", False, "Received: from [IPv6:2001:db8::7] ([127.0.0.1])"),
        ("bücher.example", True, "Received: from bücher.example ([127.0.0.1])"),
        # RFC 5321 4.4: neither a Domain nor an address literal.
        ("evil;by", False, "Received: from [127.0.0.1] ([127.0.0.1] HELO evil;by)"),
        ("a(b)\\c", False, "Received: from [127.0.0.1] ([127.0.0.1] HELO a\\(b\\)\\\\c)"),
        ("bücher.example", False, "Received: from [127.0.0.1] ([127.0.0.1] HELO b?cher.example)"),
        ("b\x85d;", True, "Received: from [127.0.0.1] ([127.0.0.1] HELO b?d;)"),
        ("[999.1.1.1]", False, "Received: from [127.0.0.1] ([127.0.0.1] HELO [999.1.1.1])"),
        ("-dash.example", False, "Received: from [127.0.0.1] ([127.0.0.1] HELO -dash.example)"),
    ],
)
def test_a_helo_that_is_no_domain_goes_into_a_comment(
    tmp_path: Path, helo: str, smtputf8: bool, first_line: str
) -> None:
    assert _received_after_helo(tmp_path, helo, smtputf8=smtputf8) == first_line.encode()


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="\x7f"),
        min_size=1,
    )
)
def test_any_helo_makes_a_well_formed_received_line(helo: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        line = _received_after_helo(Path(directory), helo).decode("ascii")
    head, _, comment = line.partition(" (")
    from_domain = head.removeprefix("Received: from ")
    assert is_domain_or_literal(from_domain)
    # The comment is balanced: every parenthesis and backslash of the HELO is quoted.
    assert re.fullmatch(r"(?:[^()\\]|\\.)*\)", comment), line
