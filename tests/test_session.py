"""The session layer's own output, apart from the wire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from mmdf_smtp.protocol import Limits
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
