"""The worker's commit process: what the sessions are told when it dies mid-commit.

A real commit process is forked on a spool that stops at a chosen step of
the commit, and is killed there; the worker's side must then answer each
message as the spool's files say: 250 if the commit was done, else a
temporary error with nothing of the message left behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mmdf_smtp.queue import Envelope, QueueError
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.shells import committer
from mmdf_smtp.shells.committer import CommitProcess

ENVELOPE = Envelope(
    sender="a@example.net",
    recipients=("b@example.org",),
    channel="smtp",
    remote_host="client.example.net",
    remote_addr="192.0.2.7",
    helo="client.example.net",
    received=datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC),
)


class StoppingSpool(Spool):
    """A spool whose commit stops for good at ``step`` once ``switch`` exists,
    in the commit process only (the worker's side pokes deliver too)."""

    def __init__(self, directory: Path, step: str) -> None:
        super().__init__(directory, in_memory=64 * 1024)
        self.step = step
        self.switch = directory.parent / "stop"
        self.worker = os.getpid()

    def _stop_here(self, step: str) -> None:
        if step == self.step and os.getpid() != self.worker and self.switch.exists():
            time.sleep(60)  # killed meanwhile

    def sync_queue(self) -> None:  # after the renames and the files' fsyncs
        self._stop_here("sync_queue")
        super().sync_queue()

    def poke(self, *, flush: bool = False) -> bool:  # after the queued mode is given
        self._stop_here("poke")
        return super().poke(flush=flush)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop: asyncio.AbstractEventLoop, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        loop.run_until_complete(asyncio.sleep(0.02))


def commit_and_kill(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, step: str, reached: Callable[[Path], bool]
) -> tuple[Spool, str, list[Exception | None]]:
    """Commit one message, kill the commit process once ``reached`` holds for
    the message's path in queue/, and return what the session was told."""
    spool = StoppingSpool(tmp_path / "spool", step)
    spool.prepare()
    process = CommitProcess(loop, spool)
    warm = spool.open(ENVELOPE)
    warm.write(b"before the switch\r\n")
    results: list[Exception | None] = []
    process.submit(warm, 19, results.append)
    run_until(loop, lambda: results == [None])
    spool.switch.touch()
    writer = spool.open(ENVELOPE)
    writer.write(b"Subject: cut short\r\n\r\nbody\r\n")
    process.submit(writer, 30, results.append)
    path = spool.queue / writer.id
    run_until(loop, lambda: reached(path))
    os.kill(process.pid, signal.SIGKILL)
    run_until(loop, lambda: len(results) == 2)
    assert not process.alive
    with pytest.raises(ChildProcessError):
        os.waitpid(process.pid, os.WNOHANG)  # collected
    return spool, writer.id, results


def committing(path: Path) -> bool:
    return path.exists() and not path.stat().st_mode & stat.S_IRUSR


def queued(path: Path) -> bool:
    return path.exists() and bool(path.stat().st_mode & stat.S_IRUSR)


def test_a_message_whose_commit_was_cut_short_is_refused_and_removed(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="mmdf_smtp.smtpd"):
        spool, queue_id, results = commit_and_kill(tmp_path, loop, "sync_queue", committing)
    error = results[1]
    assert isinstance(error, QueueError) and str(error) == "the commit process stopped"
    # Renamed into queue/, but queue/ never synced: not told 250, so not kept,
    # or the client's next try would be delivered twice.
    assert not (spool.queue / queue_id).exists()
    assert os.listdir(spool.tmp) == []
    assert len(spool.ids()) == 1  # the message before the switch
    assert "with 1 messages: 0 committed, the rest not" in caplog.text


def test_a_message_committed_before_the_commit_process_died_gets_its_250(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="mmdf_smtp.smtpd"):
        spool, queue_id, results = commit_and_kill(tmp_path, loop, "poke", queued)
    assert results == [None, None]
    assert queue_id in spool.ids()
    with spool.open_message(queue_id) as stored:
        assert stored.read() == b"Subject: cut short\r\n\r\nbody\r\n"
    assert "with 1 messages: 1 committed, the rest not" in caplog.text


def test_a_commit_process_that_does_not_exit_leaves_its_messages_to_recovery(
    tmp_path: Path,
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its socket broke, but it lives on (stopped here): nothing is taken back
    under it; after EXIT_WAIT the session hears of a temporary error."""
    monkeypatch.setattr(committer, "EXIT_WAIT", 0.3)
    spool = StoppingSpool(tmp_path / "spool", "sync_queue")
    spool.prepare()
    process = CommitProcess(loop, spool)
    spool.switch.touch()
    writer = spool.open(ENVELOPE)
    writer.write(b"stuck\r\n")
    results: list[Exception | None] = []
    process.submit(writer, 7, results.append)
    path = spool.queue / writer.id
    run_until(loop, lambda: committing(path))
    os.kill(process.pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.ERROR, logger="mmdf_smtp.smtpd"):
            process._broken(OSError("broken pipe"))
            run_until(loop, lambda: len(results) == 1)
        assert isinstance(results[0], QueueError)
        assert committing(path)  # left alone: the process may still finish it
        assert "it had not exited after 0.3 s, so none is taken back" in caplog.text
    finally:
        os.kill(process.pid, signal.SIGKILL)
        os.kill(process.pid, signal.SIGCONT)
    run_until(loop, lambda: not os.path.exists(f"/proc/{process.pid}"))
