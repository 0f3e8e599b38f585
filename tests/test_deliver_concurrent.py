"""deliver with deliveries side by side: a slow hop, kill -9, a long queue, kept connections."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

from mmdf_smtp.config import NextHop, load
from mmdf_smtp.delivery import nexthop
from mmdf_smtp.delivery.runner import Runner
from mmdf_smtp.queue import Envelope, Lease, QueueError
from mmdf_smtp.queue.spool import Spool
from peer import Handler, peer
from test_deliver_wire import (
    BODY,
    configure,
    deliver_command,
    maildir_messages,
    run_deliver,
    wait_for,
)
from wire import PYTHON, env, queued


def queue_to(spool: Spool, *recipients: str, marker: str = "") -> str:
    writer = spool.open(
        Envelope(
            sender="sender@example.net",
            recipients=recipients,
            channel="local",
            remote_host="client.test",
            remote_addr="127.0.0.1",
            helo="client.test",
            received=datetime.now(UTC),
        )
    )
    writer.write(BODY + f"message {marker}\r\n".encode())
    writer.commit()
    return writer.id


class Events(logging.Handler):
    """deliver's log lines, each setting the event waited for with its text."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._waited: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def expect(self, text: str) -> threading.Event:
        with self._lock:
            event = self._waited[text] = threading.Event()
            if any(text in line for line in self.lines):
                event.set()
            return event

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        with self._lock:
            self.lines.append(line)
            for text, event in self._waited.items():
                if text in line:
                    event.set()


@contextmanager
def log_events() -> Iterator[Events]:
    events = Events()
    logger = logging.getLogger("mmdf_smtp.deliver")
    logger.addHandler(events)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield events
    finally:
        logger.removeHandler(events)
        logger.setLevel(level)


def test_a_slow_next_hop_does_not_hold_up_local_delivery(tmp_path: Path) -> None:
    """The hop holds its reply to the first message; the local one queued
    after it is delivered meanwhile, its Maildir file there while the hop
    still holds."""
    handler = Handler(lmtp=True, release=threading.Event())
    with peer(handler) as (_, port), log_events() as events:
        path = configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n')
        config = load(str(path))
        spool = Spool(config.spool)
        remote = queue_to(spool, "far@relay.test", marker="remote")
        local = queue_to(spool, "alice@example.org", marker="local")
        delivered = events.expect(f"id={local} to=<alice@example.org> relay=maildir")
        runner = Runner(config, spool)
        finished = threading.Thread(target=runner.run)
        finished.start()
        try:
            assert handler.arrived.wait(30)
            assert delivered.wait(30)
            # Both while the hop holds its reply.
            assert not handler.release.is_set()
            [(name, message)] = maildir_messages(tmp_path, "alice").items()
            assert local in name and message.endswith(b"\nmessage local\n")
            assert handler.messages == []
        finally:
            assert handler.release is not None
            handler.release.set()
            finished.join(60)
            runner.close()
        assert not finished.is_alive()
        [received] = handler.messages
        assert received.recipients == ["far@relay.test"]
        assert received.content.endswith(b"message remote\r\n")
        assert f"id={remote} removed: every recipient is done" in events.lines
        assert queued(path) == []


def test_kill_9_while_delivering_side_by_side_and_a_restart(tmp_path: Path) -> None:
    """Local and LMTP deliveries under way at once when deliver is killed:
    after a restart each Maildir copy is there once, each LMTP recipient
    got the message at least once, and the queue is empty."""
    handler = Handler(lmtp=True)
    with peer(handler) as (_, port):
        config = configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n')
        spool = Spool(tmp_path / "spool")
        ids = [
            queue_to(spool, "alice@example.org", f"r{n}@relay.test", marker=str(n))
            for n in range(150)
        ]
        process = subprocess.Popen(
            deliver_command(config, "--once"), stderr=subprocess.PIPE, env=env()
        )
        wait_for(process, "status=delivered", count=40)
        process.kill()
        process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()
        assert queued(config), "deliver finished before it was killed"
        again = run_deliver(config, "--once")
        assert again.returncode == 0, again.stderr.decode()
    assert queued(config) == []
    copies = sorted(name.split(".")[1][1:27] for name in maildir_messages(tmp_path, "alice"))
    assert copies == sorted(ids)
    got = {r for received in handler.messages for r in received.recipients}
    assert got == {f"r{n}@relay.test" for n in range(150)}


def peak_memory_of_deliver(tmp_path: Path, count: int) -> int:
    """deliver --once over ``count`` queued messages to the next hop: its peak RSS, in KiB."""
    sink = Sink(lmtp=True)
    directory = tmp_path / str(count)
    directory.mkdir()
    try:
        config = configure(directory, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{sink.port}"\n')
        spool = Spool(directory / "spool")
        writers = []
        for n in range(count):
            writer = spool.open(
                Envelope(
                    sender="sender@example.net",
                    recipients=("far@relay.test",),
                    channel="local",
                    remote_host="client.test",
                    remote_addr="127.0.0.1",
                    helo="client.test",
                    received=datetime.now(UTC),
                )
            )
            writer.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
            writers.append(writer)
            if len(writers) == 500:
                assert spool.commit_all(writers) == [None] * len(writers)
                writers = []
        # The peak of a process of its own's one child: not this one's others.
        measure = (
            "import resource, subprocess, sys;"
            "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        result = subprocess.run(
            [PYTHON, "-c", measure, *deliver_command(config, "--once")],
            capture_output=True,
            env=env(),
            timeout=300,
            check=True,
        )
    finally:
        sink.close()
    assert sum(said.count(b"<data>\r\n") for said in sink.sessions) == count
    assert spool.ids() == []
    return int(result.stdout)


def test_a_long_queue_is_worked_off_in_bounded_memory(tmp_path: Path) -> None:
    """Ten times the messages, about the same memory: no envelope list, no
    state of each message held at once."""
    small = peak_memory_of_deliver(tmp_path, 1_000)
    large = peak_memory_of_deliver(tmp_path, 10_000)
    assert large < small + 8 * 1024, (small, large)


@pytest.mark.soak
def test_a_queue_of_100000_is_worked_off_in_bounded_memory(tmp_path: Path) -> None:
    small = peak_memory_of_deliver(tmp_path, 1_000)
    large = peak_memory_of_deliver(tmp_path, 100_000)
    assert large < small + 8 * 1024, (small, large)


# -- kept connections ------------------------------------------------------------------


class Sink:
    """A next hop of a few lines that writes down what each connection said."""

    def __init__(self, *, lmtp: bool, refuse_mail: int | None = None) -> None:
        self.lmtp = lmtp
        self.refuse_mail = refuse_mail  # the MAIL (counted from 1) answered 421
        self.sessions: list[list[bytes]] = []
        self._mails = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            said: list[bytes] = []
            self.sessions.append(said)
            thread = threading.Thread(target=self._serve, args=(connection, said), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, connection: socket.socket, said: list[bytes]) -> None:
        with connection, connection.makefile("rb") as lines:
            connection.sendall(b"220 sink\r\n")
            recipients = 0
            for line in lines:
                command = line[:4].upper()
                said.append(line)
                if command in (b"LHLO", b"EHLO"):
                    connection.sendall(b"250 sink\r\n")
                elif command == b"MAIL":
                    self._mails += 1
                    if self._mails == self.refuse_mail:
                        connection.sendall(b"421 4.3.2 going down\r\n")
                        return
                    recipients = 0
                    connection.sendall(b"250 2.1.0 ok\r\n")
                elif command == b"RCPT":
                    recipients += 1
                    connection.sendall(b"250 2.1.5 ok\r\n")
                elif command == b"RSET":
                    connection.sendall(b"250 2.0.0 ok\r\n")
                elif command == b"DATA":
                    connection.sendall(b"354 go on\r\n")
                    for data in lines:
                        if data == b".\r\n":
                            break
                    said.append(b"<data>\r\n")
                    connection.sendall(b"250 2.0.0 stored\r\n" * (recipients if self.lmtp else 1))
                elif command == b"QUIT":
                    connection.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:
                    connection.sendall(b"500 5.5.1 what\r\n")

    def close(self) -> None:
        # Wakes the accept() the other thread is blocked in; close() alone
        # would leave that thread blocked for the rest of the test run.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(10)


def transaction(recipient: str) -> list[bytes]:
    return [
        b"MAIL FROM:<sender@example.net>\r\n",
        f"RCPT TO:<{recipient}>\r\n".encode(),
        b"DATA\r\n",
        b"<data>\r\n",
    ]


@pytest.mark.parametrize("protocol", ["lmtp", "smtp"])
def test_messages_share_a_connection_up_to_the_reuse_limit(protocol: str) -> None:
    sink = Sink(lmtp=protocol == "lmtp")
    hop = NextHop(protocol=protocol, host="127.0.0.1", port=sink.port)
    connections = nexthop.Connections(idle=60, reuse=3)
    try:
        for n in range(4):
            outcomes = connections.send(
                hop,
                hostname="mx.test",
                sender="sender@example.net",
                recipients=[f"r{n}@relay.test"],
                message=BytesIO(b"Subject: x\r\n\r\nbody\r\n"),
            )
            assert [str(o) for o in outcomes] == ["250 2.0.0 stored"]
        assert connections.idle() == 1
        connections.close()
        assert connections.idle() == 0
    finally:
        sink.close()
    # smtplib says its hellos and QUIT in lower case.
    hello = b"lhlo mx.test\r\n" if protocol == "lmtp" else b"ehlo mx.test\r\n"
    first, second = sink.sessions
    assert first == [
        hello,
        *transaction("r0@relay.test"),
        b"RSET\r\n",
        *transaction("r1@relay.test"),
        b"RSET\r\n",
        *transaction("r2@relay.test"),
        b"quit\r\n",
    ]
    assert second == [hello, *transaction("r3@relay.test"), b"quit\r\n"]
    assert connections.opened == 2


def test_a_connection_idle_too_long_or_that_erred_is_not_used_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = Sink(lmtp=True, refuse_mail=2)
    hop = NextHop(protocol="lmtp", host="127.0.0.1", port=sink.port)
    clock = [1000.0]
    monkeypatch.setattr(nexthop.time, "monotonic", lambda: clock[0])
    connections = nexthop.Connections(idle=2, reuse=100)

    def send(n: int) -> str:
        outcomes = connections.send(
            hop,
            hostname="mx.test",
            sender="sender@example.net",
            recipients=[f"r{n}@relay.test"],
            message=BytesIO(b"Subject: x\r\n\r\nbody\r\n"),
        )
        return " / ".join(str(o) for o in outcomes)

    try:
        assert send(0) == "250 2.0.0 stored"
        clock[0] += 2.5  # longer than the idle limit: closed, a new one opened
        assert send(1).startswith("421 4.3.2 going down")  # and that one dropped
        assert send(2) == "250 2.0.0 stored"
        connections.close()
    finally:
        sink.close()
    hello = b"lhlo mx.test\r\n"
    assert sink.sessions == [
        [hello, *transaction("r0@relay.test"), b"quit\r\n"],
        [hello, b"MAIL FROM:<sender@example.net>\r\n"],
        [hello, *transaction("r2@relay.test"), b"quit\r\n"],
    ]


class BrokenOff(BytesIO):
    """A message whose reading fails after its first line (a database gone mid-read)."""

    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell() > 0:
            raise OSError(5, "cannot read the message: the queue went away")
        return self.readline()


def test_a_transaction_cut_short_in_the_data_closes_without_quit() -> None:
    """A QUIT in the middle of the data would be taken for a line of the
    message, and its reply waited for until the timeout."""
    sink = Sink(lmtp=True)
    hop = NextHop(protocol="lmtp", host="127.0.0.1", port=sink.port)
    connections = nexthop.Connections(idle=60, reuse=100)
    started = time.monotonic()
    try:
        outcomes = connections.send(
            hop,
            hostname="mx.test",
            sender="sender@example.net",
            recipients=["r@relay.test"],
            message=BrokenOff(b"Subject: x\r\n\r\nbody\r\n"),
            timeout=30,
        )
    finally:
        sink.close()
    assert time.monotonic() - started < 15  # not the 30 s of the timeout
    [outcome] = outcomes
    assert outcome.code == 451
    assert connections.idle() == 0
    [session] = sink.sessions
    assert session == [b"lhlo mx.test\r\n", *transaction("r@relay.test")]


class UnreachableAtFirst(Spool):
    """A queue whose first ``failures`` claims and reads fail, as a database
    does between its primary's death and its standby's promotion."""

    def __init__(self, directory: Path, failures: int) -> None:
        super().__init__(directory)
        self.failures = failures

    def _fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise QueueError("cannot reach the queue: the primary is gone")

    def claim(self, *args: Any, **kwargs: Any) -> list[Lease]:
        self._fail()
        return super().claim(*args, **kwargs)

    def next_due(self) -> datetime | None:
        self._fail()
        return super().next_due()


def test_deliver_goes_on_after_the_queue_could_not_be_reached(tmp_path: Path) -> None:
    with log_events() as events:
        config = load(str(configure(tmp_path)))
        spool = UnreachableAtFirst(config.spool, failures=3)
        queue_id = queue_to(spool, "alice@example.org")
        delivered = events.expect(f"id={queue_id} to=<alice@example.org> relay=maildir")
        wakeups = spool.start_delivering()
        stopping = threading.Event()
        runner = Runner(config, spool, stopping=stopping.is_set)
        running = threading.Thread(target=runner.run, kwargs={"wakeups": wakeups})
        running.start()
        try:
            assert delivered.wait(30)
        finally:
            stopping.set()
            spool.poke()  # the runner looks at ``stopping`` when it wakes
            running.join(30)
            runner.close()
            wakeups.close()
    assert not running.is_alive()
    assert spool.failures == 0
    assert any("trying again: cannot reach the queue" in line for line in events.lines)
