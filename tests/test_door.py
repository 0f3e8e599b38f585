"""Bots at the door, over real sockets, against the daemon and smtpsrvr.

A client that talks before the greeting, pipelines where PIPELINING was
not offered, or sends past DATA before the 354 is refused and the session
ends; NUL octets in a message are refused at its end unless allowed.  Each
case runs against smtpd (the asyncio shell) and against smtpsrvr on a TCP
connection as inetd hands it one (the blocking shell), with the
configuration's defaults but for a short greeting pause.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol

import pytest

from mmdf_smtp.queue.spool import Spool
from test_wire import read_replies, recv_reply
from wire import PYTHON, body_of, daemon, env, queued, stored, tcp_pair, write_config

SMTPSRVR = [PYTHON, "-m", "mmdf_smtp.cli.smtpsrvr"]
GREET_PAUSE = 0.3
PREGREET = b"521 5.5.1 Protocol error: talked before the greeting\r\n"
OUT_OF_TURN = b"554 5.5.0 SMTP protocol synchronization error\r\n"
NUL_IN_DATA = b"550 5.6.0 Message refused: NUL octets are not allowed"
ENVELOPE = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n"


class Server(Protocol):
    config: Path

    def connect(self) -> socket.socket: ...

    def log_line(self, text: str) -> str:
        """The next line of the log that holds ``text`` (waiting for it)."""
        ...


def door_config(directory: Path, limits: str = "") -> Path:
    """The defaults, with a greeting pause, and ``limits`` under [limits]."""
    config = write_config(directory, f"\n[limits]\n{limits}\n" if limits else "")
    text = config.read_text()
    text = text.replace("maxconnects = 8\n", f"maxconnects = 8\ngreet_pause = {GREET_PAUSE}\n")
    config.write_text(text)
    return config


class Smtpd:
    def __init__(self, config: Path) -> None:
        self.config = config
        self._stack = daemon(config)
        self._daemon = self._stack.__enter__()

    def connect(self) -> socket.socket:
        return self._daemon.connect()

    def log_line(self, text: str) -> str:
        return self._daemon.log_lines(text, timeout=30)[0]

    def close(self) -> None:
        self._stack.__exit__(None, None, None)


class Smtpsrvr:
    """smtpsrvr started for each connection, on it, as inetd does."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._processes: list[subprocess.Popen[bytes]] = []
        self._lines: queue.Queue[str] = queue.Queue()

    def connect(self) -> socket.socket:
        client, accepted = tcp_pair(self._listener)
        with accepted:
            process = subprocess.Popen(
                [*SMTPSRVR, "-c", str(self.config), "[127.0.0.1]", "mx.test", "local"],
                stdin=accepted,
                stdout=accepted,
                stderr=subprocess.PIPE,
                env=env(),
            )
        assert process.stderr is not None
        threading.Thread(target=self._read_log, args=(process.stderr,), daemon=True).start()
        self._processes.append(process)
        return client

    def _read_log(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._lines.put(line.decode(errors="replace"))

    def log_line(self, text: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if text in line:
                return line

    def close(self) -> None:
        self._listener.close()
        for process in self._processes:
            assert process.wait(timeout=30) == 0


@contextmanager
def serving(kind: str, config: Path) -> Iterator[Smtpd | Smtpsrvr]:
    server = Smtpd(config) if kind == "smtpd" else Smtpsrvr(config)
    try:
        yield server
    finally:
        server.close()


SHELLS = ["smtpd", "smtpsrvr"]


@pytest.fixture(scope="module", params=SHELLS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(request.param, door_config(tmp_path_factory.mktemp("door"))) as s:
        yield s


@pytest.fixture(scope="module", params=SHELLS)
def allowing_nul(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = door_config(tmp_path_factory.mktemp("door-nul"), "allow_nul = true")
    with serving(request.param, config) as s:
        yield s


def until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def greeted(server: Server) -> socket.socket:
    sock = server.connect()
    assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"
    return sock


def ehlo(server: Server) -> socket.socket:
    sock = greeted(server)
    sock.sendall(b"EHLO c.test\r\n")
    assert read_replies(sock, 1) == [b"250 CHUNKING"]
    return sock


def holding(server: Server, marker: bytes) -> list[dict[str, object]]:
    """The queued messages that hold ``marker``, as checkque --json shows them."""
    spool = Spool(server.config.parent / "spool")
    ids = set()
    for message in spool.messages():
        with spool.open_message(message.id) as data:
            if marker in data.read():
                ids.add(message.id)
    return [m for m in queued(server.config) if m["id"] in ids] if ids else []


# -- Pregreet ----------------------------------------------------------------


def test_a_client_that_talks_before_the_greeting_is_refused(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"EHLO bot.test\r\nMAIL FROM:<spam@example.net>\r\n")
        assert until_closed(sock) == PREGREET  # and never a 220
    line = server.log_line("reason=pregreet")
    assert 'reply="521 5.5.1 Protocol error: talked before the greeting" reason=pregreet' in line
    assert "client=unknown[127.0.0.1] helo= " in line
    assert 'input="EHLO bot.test\\r\\nMAIL FROM:<spam@example.net>\\r\\n"' in line


def test_a_client_that_waits_for_the_paused_greeting_is_served(server: Server) -> None:
    started = time.monotonic()
    with greeted(server) as sock:
        assert time.monotonic() - started >= GREET_PAUSE
        for command, reply in [
            (b"HELO c.test\r\n", b"250 mx.test Hello c.test"),
            (b"MAIL FROM:<a@example.net>\r\n", b"250 2.1.0 Sender OK"),
            (b"RCPT TO:<alice@example.org>\r\n", b"250 2.1.5 Recipient OK"),
            (b"DATA\r\n", b"354 Start mail input; end with <CRLF>.<CRLF>"),
        ]:
            sock.sendall(command)
            assert read_replies(sock, 1) == [reply]
        sock.sendall(b"Subject: waited\r\n\r\nlock-step\r\n.\r\n")
        assert read_replies(sock, 1)[0].startswith(b"250 2.0.0 Submitted & queued")
        sock.sendall(b"QUIT\r\n")
        assert read_replies(sock, 1) == [b"221 2.0.0 mx.test closing connection"]
    [message] = holding(server, b"lock-step")
    assert body_of(stored(server.config, str(message["id"]))) == (
        b"Subject: waited\r\n\r\nlock-step\r\n"
    )


# -- Pipelining out of turn --------------------------------------------------


def test_helo_then_pipelined_mail_and_rcpt_is_refused(server: Server) -> None:
    with greeted(server) as sock:
        sock.sendall(b"HELO c.test\r\n")
        assert read_replies(sock, 1) == [b"250 mx.test Hello c.test"]
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
        assert until_closed(sock) == OUT_OF_TURN
    line = server.log_line("after=MAIL")
    assert (
        'helo=c.test reply="554 5.5.0 SMTP protocol synchronization error" reason=pipelining'
        ' after=MAIL input="RCPT TO:<alice@example.org>\\r\\n"'
    ) in line


def test_ehlo_and_pipelining_as_offered_is_served_byte_exact(server: Server) -> None:
    body = b"Subject: pipelined\r\n\r\n..dot\r\ncorrect pipelining\r\n"
    with ehlo(server) as sock:
        sock.sendall(ENVELOPE + b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert read_replies(sock, 4) == [
            b"250 2.1.0 Sender OK",
            b"250 2.1.5 Recipient OK",
            b"250 2.1.5 Recipient OK",
            b"354 Start mail input; end with <CRLF>.<CRLF>",
        ]
        # The end of the content may be followed by the next group.
        sock.sendall(body + b".\r\n" + ENVELOPE + b"BDAT 5 LAST\r\nhelloQUIT\r\n")
        replies = read_replies(sock, 5)
        assert replies[0].startswith(b"250 2.0.0 Submitted & queued")
        assert replies[1:3] == [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"]
        assert replies[3].startswith(b"250 2.0.0 Submitted & queued")
        assert replies[4] == b"221 2.0.0 mx.test closing connection"
    [message] = holding(server, b"correct pipelining")
    assert body_of(stored(server.config, str(message["id"]))) == body.replace(b"..", b".")
    assert message["recipients"] == ["alice@example.org", "bob@example.org"]


def test_octets_after_data_before_the_354_are_refused(server: Server) -> None:
    with ehlo(server) as sock:
        sock.sendall(ENVELOPE + b"DATA\r\nSubject: early\r\n\r\nnot-waited\r\n.\r\n")
        data = until_closed(sock)
    assert data == b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n" + OUT_OF_TURN
    assert " refused " in server.log_line("reason=pipelining after=DATA")
    assert holding(server, b"not-waited") == []


def test_ehlo_pipelined_with_mail_is_refused(server: Server) -> None:
    with greeted(server) as sock:
        sock.sendall(b"EHLO c.test\r\n" + ENVELOPE)
        assert until_closed(sock) == OUT_OF_TURN
    assert " refused " in server.log_line("reason=pipelining after=EHLO")


# -- NUL in content ----------------------------------------------------------


def test_nul_in_data_is_refused_and_the_session_goes_on(server: Server) -> None:
    with ehlo(server) as sock:
        sock.sendall(ENVELOPE + b"DATA\r\n")
        assert read_replies(sock, 3)[-1] == b"354 Start mail input; end with <CRLF>.<CRLF>"
        sock.sendall(b"Subject: nul-data\r\n\r\na\x00b\r\n.\r\n")
        assert read_replies(sock, 1) == [NUL_IN_DATA]
        sock.sendall(b"NOOP\r\n")
        assert read_replies(sock, 1) == [b"250 2.0.0 OK"]
    line = server.log_line("reason=nul")
    assert 'helo=c.test reply="550 5.6.0 Message refused: NUL octets are not allowed"' in line
    assert holding(server, b"nul-data") == []


def test_nul_in_bdat_is_refused_at_the_last_chunk(server: Server) -> None:
    first, last = b"Subject: nul-bdat\r\n\r\n\x00", b"rest\r\n"
    with ehlo(server) as sock:
        sock.sendall(
            ENVELOPE
            + b"BDAT %d\r\n" % len(first)
            + first
            + b"BDAT %d LAST\r\n" % len(last)
            + last
            + b"NOOP\r\n"
        )
        assert read_replies(sock, 5)[2:] == [
            b"250 2.0.0 %d octets received" % len(first),
            NUL_IN_DATA,
            b"250 2.0.0 OK",
        ]
    assert " refused " in server.log_line("reason=nul")
    assert holding(server, b"nul-bdat") == []


def test_nul_is_stored_byte_exact_when_allowed(allowing_nul: Server) -> None:
    server = allowing_nul
    data_body = b"Subject: nul-allowed\r\n\r\na\x00b\r\n\x00.\r\n"
    chunk = b"Subject: nul-allowed-bdat\r\n\r\n\x00\r\n.\x00"
    with ehlo(server) as sock:
        sock.sendall(ENVELOPE + b"DATA\r\n")
        assert read_replies(sock, 3)[-1].startswith(b"354 ")
        sock.sendall(data_body + b".\r\n")
        assert read_replies(sock, 1)[0].startswith(b"250 2.0.0 Submitted & queued")
        sock.sendall(ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        assert read_replies(sock, 3)[-1].startswith(b"250 2.0.0 Submitted & queued")
    [in_data] = holding(server, b"nul-allowed\r\n")
    assert body_of(stored(server.config, str(in_data["id"]))) == data_body
    [in_bdat] = holding(server, b"nul-allowed-bdat")
    assert body_of(stored(server.config, str(in_bdat["id"]))) == chunk
