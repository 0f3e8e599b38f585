"""Commit-time delivery in-process, against a deliver that starts in the middle of a commit.

A message some of whose copies the commit wrote, and some not, gets a
delivery state before its queue file reaches queue/.  A deliver starting
in between (its recovery, its clean-up of states without a message, its
first pass) must leave that state alone: without it, deliver takes the
message for a new one and writes every copy, the commit's again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pytest

from mmdf_smtp.config import Config, load
from mmdf_smtp.delivery.atcommit import CommitDelivery, Report
from mmdf_smtp.delivery.local import LocalRecipients
from mmdf_smtp.delivery.runner import Runner
from mmdf_smtp.queue import (
    DELIVERED,
    PENDING,
    DeliveryState,
    Envelope,
    MessageWriter,
    QueuedMessage,
    QueueError,
)
from mmdf_smtp.queue.spool import IN_MEMORY, Spool, SpoolWakeups
from queue_contract import envelope as queued_envelope
from test_deliver_wire import configure

SMALL = b"Subject: test\r\n\r\na message held in memory until its commit\r\n"
# Bigger than a session holds in memory: its file is in tmp/ before the commit.
BIG = b"Subject: test\r\n\r\n" + b"a line of a message that has its file already\r\n" * 2000
assert len(BIG) > IN_MEMORY


def writer_id(spool: Spool, pid: int) -> str:
    """A queue id as the process ``pid`` makes it."""
    return spool.new_id()[:14] + f"{pid:07x}" + "00000"


def live_writer_id(spool: Spool) -> str:
    """A queue id as an smtpd worker that is still running makes it: the
    pid in it is a live process's (init's), not this one's, which the
    recovery of a deliver in this process would take for a crashed writer."""
    return writer_id(spool, 1)


def dead_pid() -> int:
    """The pid of a process that has ended."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def envelope(*recipients: str) -> Envelope:
    return queued_envelope(*recipients, received=datetime.now(UTC))


class Deliverer:
    """A deliver on the same spool, in this process: started as deliver's
    main starts it (its lock and doorbell, the recovery, the clean-up of
    states), then run a pass at a time."""

    def __init__(self, config: Config) -> None:
        self.spool = Spool(config.spool)
        self.config = config
        self.wakeups: SpoolWakeups | None = None
        self.runner: Runner | None = None

    def start(self) -> None:
        self.wakeups = self.spool.start_delivering()
        self.spool.recover()
        self.spool.forget_orphans()
        self.runner = Runner(self.config, self.spool)
        self.runner.run()  # the first pass: nothing is queued yet

    def run(self) -> None:
        assert self.wakeups is not None and self.runner is not None
        assert self.wakeups.drain().new_mail  # the commit's poke
        self.runner.run()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self.wakeups is not None:
            self.wakeups.close()


class RacingSpool(Spool):
    """A spool whose commit first runs ``before_commit``: what happens
    between a message's state and its queue file."""

    before_commit: Callable[[], None] = staticmethod(lambda: None)

    def commit_all(self, writers: Sequence[MessageWriter]) -> list[QueueError | None]:
        self.before_commit()
        return super().commit_all(writers)


def copies(tmp_path: Path, user: str, folder: str = "new") -> list[str]:
    return sorted(p.name for p in (tmp_path / "mail" / user / "Maildir" / folder).iterdir())


@pytest.mark.parametrize("message", [SMALL, BIG], ids=["in-memory", "in-a-file"])
def test_a_deliver_starting_between_a_commits_state_and_its_queue_file_writes_no_copy_twice(
    tmp_path: Path, message: bytes
) -> None:
    config = load(str(configure(tmp_path, at_commit=True)))
    # alice's Maildir cannot take a copy at commit time: its tmp/ is a file.
    alice = tmp_path / "mail/alice/Maildir"
    alice.mkdir(parents=True)
    (alice / "tmp").write_bytes(b"")
    spool = RacingSpool(config.spool, in_memory=IN_MEMORY)
    deliverer = Deliverer(config)
    spool.before_commit = deliverer.start
    try:
        writer = spool.open(
            envelope("alice@example.org", "bob@example.org"), queue_id=live_writer_id(spool)
        )
        writer.write(message)
        [result] = CommitDelivery(LocalRecipients(config), spool).commit_all([writer])
        assert isinstance(result, Report) and result.copies == 1, result
        [bob] = copies(tmp_path, "bob")
        assert f".M{writer.id}R1." in bob
        assert spool.ids() == [writer.id]
        state = spool.read_state(writer.id)
        # bob's mail reader has seen it: in cur/, where the name of a new
        # copy in new/ no longer guards against a second one.
        read = f"{bob}:2,S"
        (tmp_path / "mail/bob/Maildir/new" / bob).rename(tmp_path / "mail/bob/Maildir/cur" / read)
        (alice / "tmp").unlink()
        (alice / "tmp").mkdir()
        deliverer.run()
    finally:
        deliverer.close()
    assert copies(tmp_path, "bob") == [], "bob's copy written twice"
    assert copies(tmp_path, "bob", "cur") == [read]
    # Kept for deliver: the state the commit wrote, bob's copy in it.
    assert state is not None
    assert [r.status for r in state.recipients] == [PENDING, DELIVERED]
    [alice_copy] = copies(tmp_path, "alice")
    assert f".M{writer.id}R0." in alice_copy
    assert (alice / "new" / alice_copy).read_bytes().endswith(message.replace(b"\r\n", b"\n"))
    assert spool.ids() == [] and os.listdir(spool.state) == []


def test_a_message_adopted_keeps_its_state_from_a_deliver_starting_before_its_file(
    tmp_path: Path,
) -> None:
    # checkque's move into the spool: the state first, then the file.
    config = load(str(configure(tmp_path)))
    spool = RacingSpool(config.spool, in_memory=IN_MEMORY)
    queue_id = live_writer_id(spool)
    message = envelope("alice@example.org", "bob@example.org")
    state = LocalRecipients(config).expand(message)
    state.recipients[0].status = DELIVERED  # the old queue delivered alice's copy
    deliverer = Deliverer(config)
    spool.before_commit = deliverer.start
    try:
        queued = QueuedMessage(queue_id, message, len(SMALL), held=False)
        assert spool.adopt(queued, BytesIO(SMALL), state)
        deliverer.run()
    finally:
        deliverer.close()
    assert not (tmp_path / "mail/alice").exists(), "alice's copy written again"
    [bob] = copies(tmp_path, "bob")
    assert f".M{queue_id}R1." in bob
    assert spool.ids() == [] and os.listdir(spool.state) == []


def test_a_commit_cut_short_between_its_state_and_its_queue_file_leaves_nothing(
    tmp_path: Path,
) -> None:
    """The crash story: the process whose file is in tmp/ is gone (a kill,
    a power cut), so no commit is under way; the next deliver's start
    removes its file and its state.  One whose process lives keeps both."""
    spool = Spool(tmp_path / "spool", in_memory=IN_MEMORY)
    state = DeliveryState.from_bytes(b'{"recipients": []}')
    ids = {}
    for name, pid in (("crashed", dead_pid()), ("under way", 1)):
        writer = spool.open(envelope("alice@example.org"), queue_id=writer_id(spool, pid))
        writer.write(SMALL)
        writer.create_file()
        spool.write_state(writer.id, state)
        ids[name] = writer.id
    deliverer = Spool(tmp_path / "spool")
    assert deliverer.recover() == [ids["crashed"]]
    assert deliverer.forget_orphans() == [ids["crashed"]]
    assert os.listdir(spool.tmp) == os.listdir(spool.state) == [ids["under way"]]


def test_a_temporary_state_goes_only_with_its_writer(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    queue_id = spool.new_id()
    crashed = f".{queue_id}.{dead_pid()}.1"
    being_written = f".{queue_id}.1.1"  # a live process's: write_state is under way
    for name in (crashed, being_written, ".not-a-temporary-state"):
        (spool.state / name).write_bytes(b"{")
    assert sorted(spool.forget_orphans()) == sorted([crashed, ".not-a-temporary-state"])
    assert os.listdir(spool.state) == [being_written]
