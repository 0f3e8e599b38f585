"""Behind HAProxy, into the database: the address the PROXY header carries
is the one stored with the message on the PostgreSQL backend, in its
Received header and in ``checkque --json``; a connection without the
header is closed before a word."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_proxy_wire import (
    BODY,
    CHANNELS,
    GREETING,
    HAPROXY,
    PROXIED,
    closed_without_a_word,
    haproxy,
    proxied_config,
    queued_with,
    send_message,
)
from test_wire import recv_reply
from wire import Daemon, daemon, queued, stored

pytest_plugins = ["pgcluster"]

pytestmark = pytest.mark.skipif(
    not Path(HAPROXY).exists(), reason="haproxy is not installed (Debian: haproxy)"
)


@pytest.fixture
def smtpd(tmp_path: Path, pg_dsn: str) -> Iterator[Daemon]:
    config = proxied_config(tmp_path, PROXIED)
    config.write_text(config.read_text() + f'\n[queue]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\n')
    with daemon(config, channels=CHANNELS) as d:
        yield d


def test_the_balancers_client_is_stored_in_the_database(smtpd: Daemon, tmp_path: Path) -> None:
    with haproxy(tmp_path, smtpd.port) as balancer:
        for frontend, source in (("v2", "127.0.0.2"), ("v1", "127.0.0.3")):
            helo = f"client-{frontend}.example"
            with balancer.connect(frontend, source) as sock:
                assert recv_reply(sock) == GREETING
                answers = send_message(sock, helo.encode(), b"alice@example.org")
            assert re.fullmatch(rb"250 2\.0\.0 Submitted & queued \([0-9a-f]{26}\)", answers[4])
            entry = queued_with(smtpd.config, helo)
            assert (entry["remote_addr"], entry["remote_host"]) == (source, f"[{source}]")
            message = stored(smtpd.config, str(entry["id"]))
            received, rest = message.split(b"\r\n\tby mx.test (mmdf-smtp)\r\n", 1)
            assert received == f"Received: from {helo} ([{source}])".encode()
            assert rest.split(b"\r\n", 2)[2] == BODY
    # Straight to smtpd, without the header: closed, nothing stored.
    with smtpd.connect() as sock:
        sock.sendall(b"EHLO straight.example\r\n")
        closed_without_a_word(sock)
    smtpd.log_lines("closed end=proxy-invalid")
    helos = sorted(str(entry["helo"]) for entry in queued(smtpd.config))
    assert helos == ["client-v1.example", "client-v2.example"]
