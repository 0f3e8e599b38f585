"""Attacks of the field against the daemon, over real sockets.

SMTP smuggling in every end-of-data variant, NUL and 8-bit octets in
commands, over-long lines in every state, recipient and header floods,
slow clients and clients that never read their replies.  Each test asserts
the exact replies and what the queue holds afterwards: nothing refused is
stored, and what is answered 250 is stored once, byte for byte.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mmdf_smtp.queue.spool import Spool
from test_wire import read_replies, recv_reply
from wire import Daemon, certificate, daemon, queued, write_config

CLOSING = b"221 2.0.0 mx.test closing connection"
QUEUED = b"250 2.0.0 Submitted & queued (msg."
BARE_LINE_END = b"550 5.6.0 Message refused: bare CR or LF; lines must end with <CRLF>"
LINE_TOO_LONG = b"500 5.5.2 Line too long"
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("hostile")
    config = write_config(directory, tls=certificate(ca, directory))
    with daemon(config) as d:
        yield d


def holding(server: Daemon, marker: bytes) -> list[str]:
    """Ids of the queued messages that hold ``marker``."""
    spool = Spool(server.config.parent / "spool")
    found = []
    for message in spool.messages():
        with spool.open_message(message.id) as data:
            if marker in data.read():
                found.append(message.id)
    return found


def finals(data: bytes) -> list[bytes]:
    """Each reply's last line."""
    return [line for line in data.split(b"\r\n") if len(line) > 3 and line[3:4] == b" "]


def until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def open_data(server: Daemon) -> socket.socket:
    """A connection with a transaction open: DATA answered 354."""
    sock = server.connect()
    recv_reply(sock)
    sock.sendall(ENVELOPE + b"DATA\r\n")
    assert read_replies(sock, 4)[-1] == b"354 Start mail input; end with <CRLF>.<CRLF>"
    return sock


def worker_rss(server: Daemon) -> int:
    """Resident memory of the processes that serve sessions, in bytes."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for serving in children or [str(pid)]:
        for line in Path(f"/proc/{serving}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def test_rcpt_between_bdat_chunks_is_refused_not_lost(server: Daemon) -> None:
    first, last = b"Subject: bdat-rcpt\r\n", b"\r\nbody\r\n"
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(
            ENVELOPE + b"BDAT %d\r\n" % len(first) + first + b"RCPT TO:<bob@example.org>\r\n"
            b"BDAT %d LAST\r\n" % len(last) + last + b"QUIT\r\n"
        )
        replies = finals(until_closed(sock))
    assert replies[3:5] == [
        b"250 2.0.0 20 octets received",
        b"503 5.5.1 RCPT cannot follow BDAT in one transaction",
    ]
    assert replies[5].startswith(QUEUED)
    [queue_id] = holding(server, b"bdat-rcpt")
    [entry] = [m for m in queued(server.config) if m["id"] == queue_id]
    assert entry["recipients"] == ["alice@example.org"]


# -- octets in commands ------------------------------------------------------


def test_nul_and_8bit_octets_in_commands(server: Daemon) -> None:
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(
            b"EHLO c\x00\r\n"
            b"\x00\x00\x00\r\n"
            b"EHLO \xff\xfe\r\n"
            b"EHLO c\r\n"
            b"NOOP\x80\r\n"
            b"MAIL FROM:<\xc3\xa4@example.org>\r\n"
            b"MA\xc4\xb1L FROM:<a@example.net>\r\n"  # a dotless i: "MAIL" only to str.upper()
            b"\xef\xbc\xadAIL FROM:<a@example.net>\r\n"  # a fullwidth M
            b"MAIL FROM:<\xc3\xa4@example.org> SMTPUTF8\r\n"
            b"QUIT\r\n"
        )
        assert finals(until_closed(sock)) == [
            b"500 5.5.2 NUL character in command",
            b"500 5.5.2 NUL character in command",
            b"501 5.5.2 Command is not valid UTF-8",
            b"250 STARTTLS",
            b"501 5.5.2 Command is not valid UTF-8",
            b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
            b"500 5.5.1 Command unrecognized",
            b"500 5.5.1 Command unrecognized",
            b"250 2.1.0 Sender OK",
            CLOSING,
        ]
