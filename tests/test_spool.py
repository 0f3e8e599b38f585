"""The spool: round trips, unique ids, errors, crashes at any point, and checkque."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mmdf_smtp.cli import checkque
from mmdf_smtp.config import load
from mmdf_smtp.queue import Envelope, QueueError
from mmdf_smtp.queue import spool as spool_module
from mmdf_smtp.queue.spool import IN_MEMORY, Spool
from wire import PYTHON, env, write_config

ENVELOPE = Envelope(
    sender="a@example.net",
    recipients=("b@example.org", "c@example.org"),
    channel="smtp",
    remote_host="client.example.net",
    remote_addr="192.0.2.7",
    helo="client.example.net",
    received=datetime(2026, 11, 24, 3, 30, 0, tzinfo=UTC),
    tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384",
    smtputf8=False,
    body="8BITMIME",
)


def test_round_trip_in_small_chunks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    message = bytes(range(256)) * 1000
    writer = spool.open(ENVELOPE)
    for i in range(0, len(message), 7):
        writer.write(message[i : i + 7])
    writer.commit()
    [queued] = list(spool.messages())
    assert queued.id == writer.id
    assert queued.envelope == ENVELOPE
    assert queued.size == len(message)
    with spool.open_message(writer.id) as stored:
        assert stored.read() == message
    assert os.listdir(spool.tmp) == []


def test_an_uncommitted_message_is_not_queued(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = spool.open(ENVELOPE)
    writer.write(b"half")
    assert list(spool.messages()) == []
    writer.abort()
    writer.abort()
    assert os.listdir(spool.tmp) == []


def test_ids_are_unique_and_ordered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = [spool.new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def _write_many(directory: str, count: int) -> None:
    spool = Spool(Path(directory))
    for i in range(count):
        writer = spool.open(ENVELOPE)
        writer.write(f"message {i} from {os.getpid()}\r\n".encode())
        writer.commit()


def test_processes_sharing_a_spool(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), 200)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    spool = Spool(tmp_path)
    ids = spool.ids()
    assert len(ids) == 600 == len(set(ids))


def test_full_disk_is_a_temporary_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    writer = spool.open(ENVELOPE)
    writer.write(b"x" * 1000)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(QueueError) as caught:
        writer.commit()
    assert caught.value.full is True
    assert os.listdir(spool.tmp) == [] and spool.ids() == []


def test_a_small_message_touches_the_disk_only_at_its_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path, in_memory=4096)
    small = spool.open(ENVELOPE)
    small.write(b"x" * 1000)
    assert os.listdir(spool.tmp) == []
    large = spool.open(ENVELOPE)
    large.write(b"y" * 3000)
    assert os.listdir(spool.tmp) == []
    large.write(b"y" * 3000)  # past in_memory: from here on it goes to its file
    assert os.listdir(spool.tmp) == [large.id]
    large.write(b"y" * 3000)
    small.commit()
    large.commit()
    assert os.listdir(spool.tmp) == [] and spool.ids() == sorted([small.id, large.id])
    with spool.open_message(small.id) as stored:
        assert stored.read() == b"x" * 1000
    with spool.open_message(large.id) as stored:
        assert stored.read() == b"y" * 9000
    aborted = spool.open(ENVELOPE)
    aborted.write(b"z")
    aborted.abort()
    assert os.listdir(spool.tmp) == [] and len(spool.ids()) == 2


def test_full_disk_when_a_small_message_is_stored_is_a_temporary_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, in_memory=IN_MEMORY)
    writer = spool.open(ENVELOPE)
    writer.write(b"x" * 1000)

    def full(path: Path, flags: int, mode: int = 0o777) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "open", full)
        with pytest.raises(QueueError) as caught:
            writer.commit()
    assert caught.value.full is True
    assert os.listdir(spool.tmp) == [] and spool.ids() == []


def test_unwritable_spool_is_a_queue_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(QueueError) as caught:
        Spool(blocker / "spool").open(ENVELOPE)
    assert caught.value.full is False


CRASHER = """
import os, sys, time
from datetime import UTC, datetime
from pathlib import Path
from mmdf_smtp.queue import Envelope
from mmdf_smtp.queue.spool import IN_MEMORY, Spool
spool = Spool(Path(sys.argv[1]), in_memory=64 * 1024)
envelope = Envelope(sender="", recipients=("r@x",), channel="c", remote_host="h",
                    remote_addr="", helo="h", received=datetime.now(UTC))
size = int(sys.argv[2])
for n in range(1000000):
    body = (b"%08d" % n) * (size // 8)
    writer = spool.open(envelope)
    writer.write(body[:10000])
    writer.write(body[10000:])
    writer.commit()
    sys.stdout.write(writer.id + "\\n")
    sys.stdout.flush()
"""


# 32 KiB messages are held in memory and written whole at the commit;
# 128 KiB ones go to their file in tmp/ as they are written.
@pytest.mark.parametrize("size", [32 * 1024, 128 * 1024])
def test_kill_9_at_random_points_leaves_messages_whole_or_absent(tmp_path: Path, size: int) -> None:
    rng = random.Random(1234)
    acknowledged: list[str] = []
    for _ in range(20):
        process = subprocess.Popen(
            [PYTHON, "-c", CRASHER, str(tmp_path), str(size)], stdout=subprocess.PIPE, env=env()
        )
        assert process.stdout is not None
        for _ in range(rng.randint(1, 5)):
            acknowledged.append(process.stdout.readline().decode().strip())
        # Let it run on for a random moment, then kill it mid-write.
        for _ in range(rng.randint(0, 3)):
            process.stdout.readline()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    spool = Spool(tmp_path)
    spool.recover()
    assert os.listdir(spool.tmp) == []
    queued = set(spool.ids())
    assert set(acknowledged) <= queued  # every acknowledged commit survived
    for queue_id in queued:
        with spool.open_message(queue_id) as stored:
            data = stored.read()
        assert len(data) == size
        assert data == data[:8] * (size // 8)


def test_recover_keeps_files_of_live_writers(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = spool.open(ENVELOPE)
    # A file of another, live process (pid 1) and of a dead one.
    live = "0" * 14 + "0000001" + "00000"
    dead = "0" * 14 + f"{2**22 + 12345:07x}" + "00000"
    (spool.tmp / live).write_bytes(b"")
    (spool.tmp / dead).write_bytes(b"")
    removed = spool.recover()
    assert sorted(removed) == sorted([writer.id, dead])
    assert os.listdir(spool.tmp) == [live]


def test_open_message_refuses_non_ids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for bad in ["../../etc/passwd", "", "0" * 26 + "/x", "zz" * 13]:
        with pytest.raises(KeyError):
            spool.open_message(bad)


# -- checkque -------------------------------------------------------------------


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, list[str]]:
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    ids = []
    for body in (b"first\r\n", b"second message\r\n"):
        writer = spool.open(ENVELOPE)
        writer.write(body)
        writer.commit()
        ids.append(writer.id)
    return config, ids


def test_checkque_json(filled: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    config, ids = filled
    assert checkque.main(["-c", str(config), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ids
    assert lines[0] == {
        "id": ids[0],
        "sender": "a@example.net",
        "recipients": ["b@example.org", "c@example.org"],
        "channel": "smtp",
        "remote_host": "client.example.net",
        "remote_addr": "192.0.2.7",
        "helo": "client.example.net",
        "size": 7,
        "received": "2026-11-24T03:30:00Z",
        "tls": "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384",
        "smtputf8": False,
        "body": "8BITMIME",
        "submitter": None,
        "submitter_uid": None,
        "quarantine": None,
        "needs": [],
        "states": [
            {
                "recipient": r,
                "address": r,
                "status": "pending",
                "attempts": 0,
                "last_reply": "",
                "last_try": None,
                "next_try": None,
            }
            for r in ("b@example.org", "c@example.org")
        ],
        "state": "queued",
    }


def test_a_damaged_queue_file_does_not_hide_the_others(
    filled: tuple[Path, list[str]],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, ids = filled
    damaged = Spool(config.parent / "spool").queue / ids[0]
    damaged.write_bytes(b'{"sender": "a@example.net"\r\nbody\r\n')
    assert checkque.main(["-c", str(config), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ids[1:]
    assert f"queue file {damaged}: not an envelope" in caplog.text


def test_checkque_table(filled: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    config, ids = filled
    assert checkque.main(["-c", str(config)]) == 0
    row = "{}  {:>4}  2026-11-24 03:30:00  smtp     queued  <a@example.net>  b@example.org (+1)"
    assert capsys.readouterr().out.splitlines() == [
        "id                          size  received (UTC)       channel  state   from"
        + "             to",
        row.format(ids[0], 7),
        "    pending    b@example.org",
        "    pending    c@example.org",
        row.format(ids[1], 16),
        "    pending    b@example.org",
        "    pending    c@example.org",
        "2 messages, 23 bytes",
    ]


def test_checkque_empty_and_cat(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.checkque", "-c", str(config)],
        capture_output=True,
        env=env(),
        check=False,
    )
    spool_path = tmp_path / "spool"
    assert (result.returncode, result.stdout) == (0, f"queue {spool_path} is empty\n".encode())
    spool = Spool(tmp_path / "spool")
    writer = spool.open(ENVELOPE)
    writer.write(b"exact \x00\xff bytes\r\n")
    writer.commit()
    result = subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.checkque", "-c", str(config), "--cat", writer.id],
        capture_output=True,
        env=env(),
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, b"exact \x00\xff bytes\r\n")


def test_checkque_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert checkque.main(["-c", str(config), "--cat", "0" * 26]) == 69
    assert "no such message" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("spool = 5\n")
    with pytest.raises(SystemExit) as caught:
        checkque.main(["-c", str(bad)])
    assert caught.value.code == 78
    assert f"{bad}:1: spool: must be a string" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        checkque.main(["--bogus"])
    assert caught.value.code == 64


class _WatchedCondition(threading.Condition):
    """Tells when ``waiters`` threads have gone to wait on it."""

    def __init__(self, waiters: int) -> None:
        super().__init__()
        self._waits = 0
        self._expected = waiters
        self.all_waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self._waits += 1
        if self._waits == self._expected:
            self.all_waiting.set()
        return super().wait(timeout)


def test_commits_at_once_share_one_directory_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    writers = [spool.open(ENVELOPE) for _ in range(4)]
    watched = _WatchedCondition(waiters=3)
    monkeypatch.setattr(spool, "_sync", watched)
    seen: list[set[str]] = []  # what queue/ held as each directory sync began
    first_started, release = threading.Event(), threading.Event()

    def fsync_directory(path: Path) -> None:
        seen.append(set(os.listdir(path)))
        if len(seen) == 1:
            first_started.set()
            assert release.wait(10)

    monkeypatch.setattr(spool_module, "_fsync_directory", fsync_directory)
    first = threading.Thread(target=writers[0].commit)
    first.start()
    assert first_started.wait(10)
    # The others rename while the first sync runs: it may not cover them.
    others = [threading.Thread(target=writer.commit) for writer in writers[1:]]
    for thread in others:
        thread.start()
    assert watched.all_waiting.wait(10)
    assert all(thread.is_alive() for thread in others)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert seen == [{writers[0].id}, {writer.id for writer in writers}]
    assert spool.ids() == sorted(writer.id for writer in writers)


def test_a_failed_directory_sync_fails_its_commit_and_the_next_one_syncs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    calls: list[Path] = []

    def failing_once(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module, "_fsync_directory", failing_once)
    failed = spool.open(ENVELOPE)
    with pytest.raises(QueueError):
        failed.commit()
    committed = spool.open(ENVELOPE)
    committed.commit()
    assert calls == [spool.queue, spool.queue]
    assert spool.ids() == [committed.id] and os.listdir(spool.tmp) == []


def test_commit_all_isolates_a_failing_message_and_syncs_queue_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, in_memory=IN_MEMORY)
    writers = [spool.open(ENVELOPE) for _ in range(3)]
    for i, writer in enumerate(writers):
        writer.write(b"message %d\r\n" % i)
    doomed = writers[1].id
    real_fsync = os.fsync
    events: list[str] = []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1]
        events.append(f"fsync {name}")
        if name == doomed:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    def fsync_directory(path: Path) -> None:
        events.append(f"sync {path.name}")

    def start_writeback(fd: int) -> None:
        events.append("write-out " + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1])

    real_rename = os.rename

    def rename(source: Path, target: Path) -> None:
        events.append(f"rename {Path(target).name}")
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(spool_module, "_fsync_directory", fsync_directory)
    monkeypatch.setattr(spool_module, "begin_writeback", start_writeback)
    monkeypatch.setattr(os, "rename", rename)
    results = spool.commit_all(writers)

    assert results[0] is None and results[2] is None
    assert isinstance(results[1], QueueError) and results[1].full is True
    ids = [writer.id for writer in writers]
    # Every file on its way to the disk before the first fsync (one journal
    # commit for all); each fsynced before any is renamed into queue/, so a
    # name there never stands for unsynced octets; one directory sync.
    assert events == [
        *(f"write-out {i}" for i in ids),
        *(f"fsync {i}" for i in ids),
        *(f"rename {i}" for i in (ids[0], ids[2])),
        "sync queue",
    ]
    assert spool.ids() == sorted([ids[0], ids[2]]) and os.listdir(spool.tmp) == []
    for i in (0, 2):
        with spool.open_message(ids[i]) as stored:
            assert stored.read() == b"message %d\r\n" % i
    writers[0].abort()  # once queued, a message is not the writer's to take back
    assert spool.ids() == sorted([ids[0], ids[2]])


def test_commit_all_takes_every_message_back_out_when_the_directory_sync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    writers = [spool.open(ENVELOPE) for _ in range(2)]

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module, "_fsync_directory", failing)
    results = spool.commit_all(writers)
    assert all(isinstance(result, QueueError) and not result.full for result in results)
    assert spool.ids() == [] and os.listdir(spool.tmp) == []


def test_a_message_still_being_committed_is_not_queued_until_recovery(tmp_path: Path) -> None:
    """A crash between the rename into queue/ and the queued mode: whole, so kept."""
    spool = Spool(tmp_path)
    spool.prepare()
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    written = spool.open(ENVELOPE)
    written.write(b"Subject: cut short\r\n\r\nwhole\r\n")
    written.commit()
    # The same file as a writer of a dead process leaves it after the rename.
    data = (spool.queue / written.id).read_bytes()
    os.unlink(spool.queue / written.id)
    orphan = written.id[:14] + f"{dead.pid & 0xFFFFFFF:07x}" + written.id[21:]
    live = written.id[:14] + f"{os.getppid() & 0xFFFFFFF:07x}" + written.id[21:]
    for name in (orphan, live):
        (spool.queue / name).write_bytes(data)
        os.chmod(spool.queue / name, spool_module.COMMITTING)
    assert spool.ids() == [] and list(spool.messages()) == []
    with pytest.raises(KeyError):
        spool.open_message(orphan)
    assert spool.recover() == []
    assert spool.ids() == [orphan]  # the live writer's is still its own
    [message] = list(spool.messages())
    assert message.envelope == ENVELOPE
    with spool.open_message(orphan) as stored:
        assert stored.read() == b"Subject: cut short\r\n\r\nwhole\r\n"


def test_a_message_handed_over_is_committed_by_the_taker_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path, in_memory=4096)
    small = spool.open(ENVELOPE)
    small.write(b"held in memory\r\n")
    large = spool.open(ENVELOPE)
    large.write(b"y" * 5000)  # past in_memory: in its file
    large.write(b"tail\r\n")  # held again, until the hand-over writes it out
    tokens = [spool.hand_over(small), spool.hand_over(large)]
    assert tokens[0].startswith(b"M" + small.id.encode())
    assert tokens[1] == b"F" + large.id.encode()
    small.abort()  # the giver is done with them: this touches nothing
    large.abort()
    assert os.listdir(spool.tmp) == [large.id]
    with pytest.raises(QueueError, match="already closed"):
        small.write(b"more")
    taker = Spool(tmp_path, in_memory=4096)  # as the commit process has it
    writers = [taker.take_over(token) for token in tokens]
    assert [writer.id for writer in writers] == [small.id, large.id]
    assert taker.commit_all(writers) == [None, None]
    assert os.listdir(spool.tmp) == [] and spool.ids() == sorted([small.id, large.id])
    with spool.open_message(small.id) as stored:
        assert stored.read() == b"held in memory\r\n"
    with spool.open_message(large.id) as stored:
        assert stored.read() == b"y" * 5000 + b"tail\r\n"


def test_a_message_taken_back_is_queued_only_if_its_commit_was_done(tmp_path: Path) -> None:
    """The taker died: the state of each file tells what it had done, and only that."""
    spool = Spool(tmp_path, in_memory=4096)
    taker = Spool(tmp_path, in_memory=4096)
    writers = []
    for content in (b"never taken\r\n", b"z" * 5000, b"renamed\r\n", b"committed\r\n"):
        writer = spool.open(ENVELOPE)
        writer.write(content)
        writers.append((writer, spool.hand_over(writer)))
    _, (in_tmp, _), (renamed, renamed_token), (committed, committed_token) = writers
    assert os.listdir(spool.tmp) == [in_tmp.id]  # 5000 octets: in its file already
    # Cut short after the rename into queue/, before the sync of queue/.
    cut = taker.take_over(renamed_token)
    assert isinstance(cut, spool_module.SpoolWriter)
    cut._write_out(start_writeback=False)
    cut._sync()
    cut._move_to_queue()
    assert taker.commit_all([taker.take_over(committed_token)]) == [None]
    assert sorted(os.listdir(spool.queue)) == sorted([renamed.id, committed.id])
    assert spool.ids() == [committed.id]

    assert [spool.take_back(writer) for writer, _ in writers] == [False, False, False, True]
    assert os.listdir(spool.tmp) == [] and os.listdir(spool.queue) == [committed.id]
    with spool.open_message(committed.id) as stored:
        assert stored.read() == b"committed\r\n"
    assert spool.take_back(committed) is True  # asking again changes nothing
    assert spool.ids() == [committed.id]


@pytest.mark.parametrize("token", [b"", b"X" + b"0" * 26, b"M" + b"not an id at all!!!!!!!!!!"])
def test_what_is_not_a_message_handed_over_is_refused(tmp_path: Path, token: bytes) -> None:
    with pytest.raises(QueueError, match="not a message handed over"):
        Spool(tmp_path).take_over(token)


def test_a_message_whose_file_is_gone_cannot_be_taken_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = spool.open(ENVELOPE)  # in_memory 0: its file at once
    token = spool.hand_over(writer)
    os.unlink(spool.tmp / writer.id)
    with pytest.raises(QueueError, match="cannot open a queue file handed over"):
        spool.take_over(token)
    assert spool.ids() == []


# -- what proves a queue file whole ------------------------------------------------


def declared_size(path: Path) -> int:
    first = path.read_bytes().split(b"\n", 1)[0]
    assert first.startswith(b'{"file_size":')
    return int(json.loads(first)["file_size"])


@pytest.mark.parametrize("size", [10, 5000, 300 * 1024])
def test_each_queue_file_declares_its_own_size(tmp_path: Path, size: int) -> None:
    """Held in memory, written as it came, or handed over to another process: sealed alike."""
    spool = Spool(tmp_path, in_memory=4096)
    content = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    direct = spool.open(ENVELOPE)
    direct.write(content)
    direct.commit()
    handed = spool.open(ENVELOPE)
    handed.write(content)
    taker = Spool(tmp_path, in_memory=4096)
    assert taker.commit_all([taker.take_over(spool.hand_over(handed))]) == [None]
    for queue_id in (direct.id, handed.id):
        path = spool.queue / queue_id
        assert declared_size(path) == path.stat().st_size
        with spool.open_message(queue_id) as stored:
            assert stored.read() == content  # the size changes nothing a reader sees
    assert [m.size for m in spool.messages()] == [size, size]


def _cut_short(spool: Spool, data: bytes) -> str:
    """A file a writer of a dead process left in queue/ in its committing mode."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    queue_id = spool.new_id()
    queue_id = queue_id[:14] + f"{dead.pid & 0xFFFFFFF:07x}" + queue_id[21:]
    (spool.queue / queue_id).write_bytes(data)
    os.chmod(spool.queue / queue_id, spool_module.COMMITTING)
    return queue_id


def test_recovery_sets_aside_what_it_cannot_read_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    writer = spool.open(ENVELOPE)
    writer.write(b"Subject: whole\r\n\r\nbody\r\n")
    writer.commit()
    whole = (spool.queue / writer.id).read_bytes()
    os.unlink(spool.queue / writer.id)
    kept = _cut_short(spool, whole)
    empty = _cut_short(spool, b"")  # what a power cut did to the old commit order
    truncated = _cut_short(spool, whole[:-3])
    unsealed = _cut_short(spool, whole[:13] + b" " * 20 + whole[33:])
    caplog.set_level(logging.WARNING, logger="mmdf_smtp.queue")
    assert spool.recover() == []
    assert spool.ids() == [kept]
    assert sorted(os.listdir(spool.corrupt)) == sorted([empty, truncated, unsealed])
    warnings = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert "not an envelope: the file is empty" in warnings[f"id={empty}"]
    size = len(whole)
    assert (
        f"incomplete: {size - 3} octets where its envelope says {size}"
        in (warnings[f"id={truncated}"])
    )
    assert "not an envelope" in warnings[f"id={unsealed}"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)

    assert checkque.main(["-c", str(config), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["id"], line["state"]) for line in lines] == [
        (kept, "queued"),
        *sorted((i, "corrupt") for i in (empty, truncated, unsealed)),
    ]
    by_id = {line["id"]: line for line in lines}
    assert by_id[truncated] == {
        "id": truncated,
        "state": "corrupt",
        "size": size - 3,
        "reason": f"incomplete: {size - 3} octets where its envelope says {size}",
        "path": str(spool.corrupt / truncated),
    }
    assert checkque.main(["-c", str(config)]) == 0
    table = capsys.readouterr().out
    assert f"set aside in {spool.corrupt}" in table
    assert f"{empty}          0  not an envelope: the file is empty" in table
    # --cat gives a file set aside as it is, envelope line and all.
    assert checkque.main(["-c", str(config), "--cat", truncated]) == 0
    assert capsys.readouterr().out.encode() == whole[:-3]


def test_deliver_sets_aside_a_queued_file_that_is_not_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Storage that lied about a flush: deliver never hands on what is left."""
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    ids = []
    for _ in range(2):
        writer = spool.open(ENVELOPE)
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        writer.commit()
        ids.append(writer.id)
    torn = spool.queue / ids[0]
    torn.write_bytes(torn.read_bytes()[:-5])
    caplog.set_level(logging.WARNING)
    # What deliver claims: the torn one is set aside, never handed out.
    leases = Spool(load(str(config)).spool).claim(10, datetime.now(UTC))
    assert [lease.id for lease in leases] == [ids[1]]
    leases[0].end()
    assert os.listdir(spool.corrupt) == [ids[0]] and spool.ids() == [ids[1]]
    assert f"id={ids[0]}: incomplete:" in caplog.text
