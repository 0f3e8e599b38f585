"""Load: many sessions at once, random disconnects, and idle connections held open.

The soak test checks the one promise that matters under load: every
message answered 250 is in the queue exactly once, byte for byte, and no
message that was not answered 250 is.  The bounded runs go in every test
run (a minute or so); ``--soak`` makes them long, for a run by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmdf_smtp.queue.spool import Spool
from wire import Daemon, body_of, daemon, memory_of_tree, write_config


@dataclass
class Tally:
    accepted: dict[str, bytes] = field(default_factory=dict)  # marker -> body as sent, unstuffed
    refused: set[str] = field(default_factory=set)  # markers of messages never answered 250
    abandoned: int = 0  # sessions the client dropped on purpose


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply; its final line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if line[3:4] != b"-":
            return line


TEXT = bytes(b"abcdefghij .:-"[i % 14] for i in range(256))  # any octet to a text one


def make_body(rng: random.Random, marker: str) -> bytes:
    """A message of a size drawn from a mix, with lines that need dot-stuffing."""
    roll = rng.random()
    size = (
        rng.randint(200, 4_000)
        if roll < 0.75
        else rng.randint(20_000, 100_000)
        if roll < 0.98
        else rng.randint(300_000, 600_000)
    )
    lines = [f"Subject: soak {marker}".encode(), f"X-Soak-Id: {marker}".encode(), b""]
    total = 0
    while total < size:
        length = rng.choice((0, 1, 20, 76, 200, 998))
        line = rng.randbytes(length).translate(TEXT)
        if rng.random() < 0.05:
            line = b"." + line[:997]  # a leading dot: stuffed on the wire
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


def stuff(body: bytes) -> bytes:
    return b"\r\n".join(
        b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n")
    )


async def one_session(
    host: str, port: int, rng: random.Random, messages: int, tally: Tally
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert (await read_reply(reader)).startswith(b"220 ")
        writer.write(b"EHLO soak.test\r\n")
        assert (await read_reply(reader)).startswith(b"250 ")
        for _ in range(messages):
            marker = uuid.uuid4().hex
            body = make_body(rng, marker)
            fate = rng.random()
            writer.write(b"MAIL FROM:<soak@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
            codes = [(await read_reply(reader))[:3] for _ in range(3)]
            assert codes == [b"250", b"250", b"354"], codes
            wire = stuff(body)
            if fate < 0.04:  # vanish in the middle of the content
                writer.write(wire[: len(wire) // 2])
                await writer.drain()
                tally.refused.add(marker)
                tally.abandoned += 1
                return
            writer.write(wire + b".\r\n")
            reply = await read_reply(reader)
            if reply.startswith(b"250 "):
                tally.accepted[marker] = body
            else:
                tally.refused.add(marker)
            if fate < 0.08:  # vanish between messages, without QUIT
                tally.abandoned += 1
                return
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221 ")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def soak(d: Daemon, sessions: int, messages: int, concurrency: int, seed: int) -> Tally:
    tally = Tally()
    gate = asyncio.Semaphore(concurrency)
    master = random.Random(seed)

    async def run(index: int) -> None:
        async with gate:
            rng = random.Random(master.random() + index)
            await one_session(d.host, d.port, rng, rng.randint(1, 2 * messages), tally)

    await asyncio.gather(*(run(i) for i in range(sessions)))
    return tally


def queue_by_marker(spool: Spool) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for message in spool.messages():
        with spool.open_message(message.id) as stored:
            content = stored.read()
        body = body_of(content)
        marker = body.split(b"\r\n", 2)[1].removeprefix(b"X-Soak-Id: ").decode()
        found.setdefault(marker, []).append(body)
    return found


def test_soak_every_250_is_queued_once_and_nothing_else(
    tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    long = request.config.getoption("--soak")
    sessions, messages, concurrency = (20_000, 10, 400) if long else (1_000, 5, 300)
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("maxconnects = 8", "maxconnects = 256"))
    with daemon(config) as d:
        started = time.monotonic()
        tally = asyncio.run(soak(d, sessions, messages, concurrency, seed=5321))
        elapsed = time.monotonic() - started
    with capsys.disabled():
        size = sum(map(len, tally.accepted.values()))
        print(
            f"\nsoak: {sessions} sessions, {concurrency} at once: {len(tally.accepted)} messages"
            f" ({size / 2**20:.1f} MiB) queued, {len(tally.refused)} never answered 250,"
            f" {tally.abandoned} sessions dropped, in {elapsed:.1f} s"
        )
    found = queue_by_marker(Spool(tmp_path / "spool"))
    assert len(tally.accepted) > sessions  # the run really sent mail
    assert tally.abandoned > 0
    duplicated = [marker for marker, copies in found.items() if len(copies) > 1]
    assert duplicated == []
    missing = set(tally.accepted) - set(found)
    assert missing == set()
    unanswered = set(found) - set(tally.accepted)
    assert unanswered == set()
    for marker, body in tally.accepted.items():
        assert found[marker] == [body], marker
    assert not list((tmp_path / "spool" / "tmp").iterdir())  # no leftovers


async def hold_idle(d: Daemon, count: int) -> list[asyncio.StreamWriter]:
    gate = asyncio.Semaphore(100)  # the listen backlog is 128: do not overrun it

    async def one() -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.open_connection(d.host, d.port)
            assert (await read_reply(reader)).startswith(b"220 ")
            return writer

    return list(await asyncio.gather(*(one() for _ in range(count))))


def test_ten_thousand_idle_connections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    count = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1_000
    if hard < wanted:
        pytest.skip(f"the hard limit on open files is {hard}, below {wanted}")
    # Raised here, so the daemon started below inherits it too.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        config = write_config(tmp_path, scripted=True)
        config.write_text(config.read_text().replace("maxconnects = 8", f"maxconnects = {wanted}"))
        with daemon(config) as d:
            before = memory_of_tree(d.process.pid, "VmRSS")

            async def scenario() -> tuple[int, bytes]:
                writers = await hold_idle(d, count)
                held = memory_of_tree(d.process.pid, "VmRSS")
                # With all of them held, a new client is still served whole.
                reader, writer = await asyncio.open_connection(d.host, d.port)
                await read_reply(reader)
                writer.write(
                    b"HELO late.test\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                )
                for _ in range(4):
                    await read_reply(reader)
                writer.write(b"late\r\n.\r\n")
                queued = await read_reply(reader)
                for w in [*writers, writer]:
                    w.close()
                return held, queued

            held, queued = asyncio.run(scenario())
        assert queued.startswith(b"250 2.0.0 Submitted")
        per_connection = (held - before) / count
        with capsys.disabled():
            print(
                f"\n{count} idle connections: daemon RSS {before / 2**20:.1f} MiB -> "
                f"{held / 2**20:.1f} MiB ({per_connection / 1024:.1f} KiB a connection)"
            )
        assert per_connection < 64 * 1024  # a generous bound: a leak would be far past it
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
