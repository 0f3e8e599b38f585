"""Load generators: Postfix's smtp-source, a pipelining client, idle connections.

Each returns a :class:`Run`: how many messages were accepted, in how long,
and (for our own client) each message's latency.  A server that answers
anything unexpected makes the run fail with :class:`LoadError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
SENDER = b"bench@client.bench"
RECIPIENT = b"a@example.org"
RUN_TIMEOUT = 600.0


class LoadError(Exception):
    """The server did not answer as an SMTP server must."""


@dataclass
class Run:
    messages: int
    size: int
    seconds: float
    latencies: list[float] = field(default_factory=list)


def message(size: int) -> bytes:
    """A message of ``size`` octets (headers included), CRLF lines of 78 octets.

    No line starts with a dot, so the bytes sent are the bytes stored.
    """
    head = (
        b"From: <bench@client.bench>\r\nTo: <a@example.org>\r\n"
        b"Subject: benchmark\r\nMessage-ID: <bench@client.bench>\r\n\r\n"
    )
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"ABCDEF\r\n"
    body_size = max(size - len(head), 2)
    lines, rest = divmod(body_size, len(line))
    tail = b"x" * max(rest - 2, 0) + b"\r\n" if rest else b""
    return head + line * lines + tail


def smtp_source(port: int, *, size: int, count: int, sessions: int, reuse: bool) -> Run:
    """Postfix's smtp-source: ``count`` messages over ``sessions`` parallel sessions.

    Without ``reuse`` every message has its own connection; with it (``-d``)
    each session sends its messages over one connection.
    """
    program = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    argv = [program, "-s", str(sessions), "-l", str(size), "-m", str(count)]
    argv += ["-f", SENDER.decode(), "-t", RECIPIENT.decode(), "-M", "client.bench"]
    if reuse:
        argv.append("-d")
    argv.append(f"{HOST}:{port}")
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise LoadError(f"smtp-source: {result.stderr.decode(errors='replace').strip()}")
    return Run(count, size, seconds)


async def _reply(reader: asyncio.StreamReader, expected: int) -> list[bytes]:
    """One reply (all its lines); LoadError unless its code is ``expected``."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise LoadError(f"connection closed while waiting for {expected}")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    if not lines[-1][:3].isdigit() or int(lines[-1][:3]) != expected:
        raise LoadError(f"expected {expected}, got {b''.join(lines)!r}")
    return lines


class _Budget:
    """Messages left to send, shared by the client's sessions."""

    def __init__(self, count: int) -> None:
        self.left = count

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


ENVELOPE = b"MAIL FROM:<" + SENDER + b">\r\nRCPT TO:<" + RECIPIENT + b">\r\nDATA\r\n"


async def _session(
    port: int, content: bytes, budget: _Budget, latencies: list[float], *, one: bool
) -> bool:
    """One connection: messages while the budget lasts (just one when ``one``).

    With PIPELINING offered, MAIL, RCPT and DATA go in one write, and the
    next message's commands ride with the previous message's final dot
    (RFC 2920 3.1); otherwise every command waits for its reply.
    Returns False when there was no message left to take.
    """
    if not budget.take():
        return False
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 16)
    try:
        await _reply(reader, 220)
        writer.write(b"EHLO client.bench\r\n")
        pipelining = any(
            line[4:].upper().startswith(b"PIPELINING") for line in await _reply(reader, 250)
        )
        if pipelining:
            writer.write(ENVELOPE)
        while True:
            if pipelining:
                await _reply(reader, 250)
                await _reply(reader, 250)
                await _reply(reader, 354)
            else:
                for command, code in zip(ENVELOPE.splitlines(), (250, 250, 354), strict=True):
                    writer.write(command + b"\r\n")
                    await _reply(reader, code)
            more = not one and budget.take()
            writer.write(content)
            writer.write(b".\r\n" + (ENVELOPE if pipelining and more else b""))
            await writer.drain()
            await _reply(reader, 250)
            now = time.perf_counter()
            latencies.append(now - started)
            started = now
            if not more:
                break
        writer.write(b"QUIT\r\n")
        await _reply(reader, 221)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return True


async def _client(port: int, content: bytes, count: int, clients: int, reuse: bool) -> Run:
    budget = _Budget(count)
    latencies: list[float] = []

    async def worker() -> None:
        if reuse:
            await _session(port, content, budget, latencies, one=False)
        else:
            while await _session(port, content, budget, latencies, one=True):
                pass

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - start
    return Run(len(latencies), len(content), seconds, latencies)


def pipelining_client(port: int, *, size: int, count: int, clients: int, reuse: bool = True) -> Run:
    """Our own client: ``clients`` sessions, pipelining whenever the server offers it.

    A message's latency runs from its MAIL command (from the connection,
    when each message has its own) to the 250 after its data.
    """
    return _run(_client(port, message(size), count, clients, reuse))


class IdleConnections:
    """``count`` sessions opened, greeted, and then left idle until closed."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self._writers: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()

    def open(self) -> None:
        async def one(gate: asyncio.Semaphore) -> None:
            async with gate:
                reader, writer = await asyncio.open_connection(HOST, self.port)
                self._writers.append(writer)
                await _reply(reader, 220)

        async def all_of_them() -> None:
            gate = asyncio.Semaphore(100)
            await asyncio.gather(*(one(gate) for _ in range(self.count)))

        self._loop.run_until_complete(asyncio.wait_for(all_of_them(), RUN_TIMEOUT))

    def close(self) -> None:
        async def close_all() -> None:
            for writer in self._writers:
                writer.write(b"QUIT\r\n")
                writer.close()
            for writer in self._writers:
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            self._loop.run_until_complete(close_all())
        finally:
            self._loop.close()


def _run(coroutine: Coroutine[Any, Any, Run]) -> Run:
    """Run on uvloop when installed: the client's own overhead then weighs less."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(asyncio.wait_for(coroutine, RUN_TIMEOUT))
    result: Run = uvloop.run(asyncio.wait_for(coroutine, RUN_TIMEOUT))
    return result
