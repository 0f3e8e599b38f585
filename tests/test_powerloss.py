"""Power loss: the spool and the Maildirs on a file system that drops what was not fsynced.

kill -9 leaves the page cache alone, so it cannot show a missing fsync.
LazyFS can (``../shared/tools/lazyfs/``, beside the repository): a FUSE
file system that keeps written data in its own cache until fsync and drops
whatever is unsynced on command, as Jepsen uses it.  A power cut here:
the writer's processes frozen (SIGSTOP, and waited for until every thread
is stopped), LazyFS's cache cleared, the processes killed, LazyFS
unmounted and mounted again, the writer restarted on what is left.

The LazyFS built here carries a patch (``tests/lazyfs/``): without it, a
lookup of an item's lock races with another FUSE thread's insert, and the
daemon dies of a null mutex now and then (more often on a busy machine);
every access to the mount then fails with ENOTCONN.  A daemon that dies
all the same fails the test with its last output.

LazyFS passes renames and other metadata straight to its backing folder,
so it cannot show a missing fsync of a directory: the strace test at the
end checks that the fsync of ``queue/`` comes before the 250.

The CI run makes a few cuts at points drawn from fixed seeds; ``--soak``
makes many more.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from mmdf_smtp.queue.spool import Spool, read_envelope
from wire import PYTHON, Daemon, body_of, daemon, env, write_config

# The first test to run builds LazyFS (about a minute, more on a busy machine).
pytestmark = pytest.mark.timeout(600)

REPOSITORY = Path(__file__).resolve().parent.parent
# CI clones the repository with shared/ beside it.
SHARED_LAZYFS = REPOSITORY.parent / "shared" / "tools" / "lazyfs"
PATCHES = sorted((Path(__file__).parent / "lazyfs").glob("*.patch"))
# The patched copy of shared/'s LazyFS (script and sources) and its build,
# kept across runs under a name that changes with the patches and the script.
_KEY = hashlib.sha256(
    b"".join(path.read_bytes() for path in [*PATCHES, SHARED_LAZYFS / "lazyfs.sh"])
    if (SHARED_LAZYFS / "lazyfs.sh").exists()
    else b""
).hexdigest()[:12]
PATCHED = Path(tempfile.gettempdir()) / f"lazyfs-patched-{_KEY}"
LAZYFS = PATCHED / "tool" / "lazyfs.sh"
SENDER = "sender@example.net"
RECIPIENTS = ["alice@example.org", "bob@example.org"]
CLIENTS = 4


def lazyfs(*args: str | Path, timeout: float = 60) -> str:
    result = subprocess.run(
        ["bash", str(LAZYFS), *map(str, args)],
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LAZYFS_OUT": str(PATCHED / "build")},
    )
    assert result.returncode == 0, f"lazyfs.sh {args[0]}: {result.stderr.decode()}"
    return result.stdout.decode()


@pytest.fixture(scope="session")
def lazyfs_built() -> None:
    """LazyFS, built once (cached under /tmp across runs).  Missing FUSE fails:
    a machine that cannot run these tests must not pass them."""
    if not Path("/dev/fuse").exists():
        pytest.fail("/dev/fuse is missing: the power-loss tests need FUSE (a container: --device)")
    if not (SHARED_LAZYFS / "lazyfs.sh").exists():
        pytest.fail(f"{SHARED_LAZYFS} is missing: shared/ must lie beside the repository")
    PATCHED.mkdir(exist_ok=True)
    # Two test runs at once would build in the same folder, each removing
    # what the other is compiling: one builds, the other waits for it.
    with open(PATCHED / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not LAZYFS.exists():
            patch_lazyfs()
        lazyfs("build", timeout=900)


def patch_lazyfs() -> None:
    """shared/'s LazyFS copied to PATCHED/tool with tests/lazyfs/*.patch applied."""
    work = Path(tempfile.mkdtemp(dir=PATCHED, prefix="tool."))
    shutil.copytree(SHARED_LAZYFS, work, dirs_exist_ok=True, symlinks=True)
    for patch in PATCHES:
        applied = subprocess.run(
            ["git", "apply", "--whitespace=nowarn", str(patch)],
            cwd=work / "vendor" / "lazyfs-src",
            # Outside any repository: git apply patches plain files then.
            env={**os.environ, "GIT_CEILING_DIRECTORIES": str(PATCHED)},
            capture_output=True,
            check=False,
        )
        assert applied.returncode == 0, f"{patch.name}: {applied.stderr.decode()}"
    work.rename(PATCHED / "tool")


def rounds(request: pytest.FixtureRequest, short: int, soak: int) -> int:
    return soak if request.config.getoption("--soak") else short


class Disk:
    """A folder on LazyFS, and the power cut."""

    def __init__(self, root: Path) -> None:
        self.root = root / "fs"
        self.backing = root / "backing"
        self.fifo = root / "lazyfs" / "faults"
        self.backing.mkdir(mode=0o755)
        self.root.mkdir(mode=0o755)

    def mount(self) -> None:
        lazyfs("mount", self.root, self.backing, self.fifo)

    def unmount(self) -> None:
        """Unmount; then fail, with its last output, if LazyFS had ended
        while mounted (a crash: the mount answers ENOTCONN to everything)."""
        pid = int(Path(f"{self.fifo}.pid").read_text())
        died = all(s in "ZX" for s in _states(pid))
        lazyfs("umount", self.root)
        if died:
            output = Path(f"{self.fifo}.out").read_text(errors="replace").splitlines()
            raise AssertionError(
                f"LazyFS (pid {pid}) died while mounted; its last output:\n"
                + "\n".join(output[-15:])
            )

    def cut(self, pid: int) -> None:
        """The power cut under a running process tree: frozen, unsynced data
        dropped, killed, and the file system mounted afresh."""
        frozen = freeze(pid)
        lazyfs("clear", self.fifo)
        for member in frozen:
            with suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        for member in frozen:
            wait_until_dead(member)
        self.unmount()
        self.mount()


def tree(pid: int) -> list[int]:
    """A process and all its descendants (smtpd's supervisor, workers, commit processes)."""
    found, todo = [], [pid]
    while todo:
        member = todo.pop()
        found.append(member)
        try:
            for task in Path(f"/proc/{member}/task").iterdir():
                todo += map(int, (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _states(pid: int) -> list[str]:
    """The scheduler state of each thread of a process ([] once it is gone)."""
    states = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return []
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended since the listing (ESRCH while its entry goes)
        states.append(stat[stat.rindex(")") + 2])
    return states


def _poll(condition: str, done: object, timeout: float = 30) -> None:
    """Wait for a state of the kernel that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not callable(done) or not done():
        assert time.monotonic() < deadline, f"not {condition} within {timeout} s"
        time.sleep(0.005)


def freeze(pid: int) -> list[int]:
    """SIGSTOP a process tree, and return once every thread of it is stopped:
    a thread still inside a write or an fsync on LazyFS finishes it first."""
    frozen: list[int] = []
    while new := [member for member in tree(pid) if member not in frozen]:
        for member in new:
            with suppress(ProcessLookupError):
                os.kill(member, signal.SIGSTOP)
            frozen.append(member)
    for member in frozen:
        _poll("stopped", lambda m=member: all(s in "tTZX" for s in _states(m)))
    return frozen


def wait_until_dead(pid: int) -> None:
    _poll("dead", lambda: all(s in "ZX" for s in _states(pid)))


# -- the traffic ------------------------------------------------------------------

_PRINTABLE = bytes(range(33, 127))
_TO_PRINTABLE = bytes.maketrans(bytes(range(256)), (_PRINTABLE * 3)[:256])


def make_message(rng: random.Random, token: str) -> bytes:
    """A message of a random size (some past what smtpd holds in memory), with
    lines that start with a dot, CRLF line ends."""
    size = rng.choice([300, 300, 300, 3000, 3000, 20_000, 90_000, 250_000])
    lines = [f"Message-ID: <{token}@power.test>".encode(), f"Subject: {token}".encode(), b""]
    text = rng.randbytes(size).translate(_TO_PRINTABLE)
    at = 0
    while at < len(text):
        width = rng.randint(0, 120)
        line = text[at : at + width]
        at += width
        lines.append(b"." + line if rng.random() < 0.05 else line)
    return b"\r\n".join(lines) + b"\r\n"


class Traffic:
    """Clients streaming messages to smtpd, each on its own connection, until it dies."""

    def __init__(self, port: int, seed: int, sent: dict[str, bytes]) -> None:
        self.port = port
        self.sent = sent  # every message a client sent whole (its final dot included)
        self.acknowledged: list[str] = []
        self.ended: list[str] = []  # how each client that stopped stopped
        self.stop = threading.Event()  # for a clean end: each client quits after its message
        self._changed = threading.Condition()
        self._threads = [
            threading.Thread(target=self._stream, args=(seed * 100 + i, f"s{seed}c{i}"))
            for i in range(CLIENTS)
        ]
        for thread in self._threads:
            thread.start()

    def _stream(self, seed: int, tag: str) -> None:
        rng = random.Random(seed)
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
            smtp.ehlo("power.test")
            for n in range(1_000_000):
                if self.stop.is_set():
                    smtp.quit()
                    return
                token = f"{tag}m{n}"
                message = make_message(rng, token)
                with self._changed:
                    self.sent[token] = message
                smtp.sendmail(SENDER, RECIPIENTS, message)  # raises unless 250
                with self._changed:
                    self.acknowledged.append(token)
                    self._changed.notify_all()
        except (OSError, smtplib.SMTPException) as exc:
            with self._changed:
                self.ended.append(f"{tag}: {exc!r}")
            return  # the daemon was killed
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, count: int) -> None:
        """Until ``count`` messages are acknowledged; a failure at once when
        every client has stopped, or when none was answered for a minute."""
        with self._changed:
            while len(self.acknowledged) < count:
                assert any(thread.is_alive() for thread in self._threads), (
                    f"every client stopped after {len(self.acknowledged)} messages: {self.ended}"
                )
                before = len(self.acknowledged)
                self._changed.wait(timeout=60)
                assert len(self.acknowledged) > before or not all(
                    thread.is_alive() for thread in self._threads
                ), f"no message acknowledged for 60 s, {before} in all"

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=60)
            assert not thread.is_alive()


def configure(tmp_path: Path, disk: Disk, *, at_commit: bool = False) -> Path:
    """smtpd's and deliver's configuration; the spool and the Maildirs on LazyFS.
    ``at_commit``: smtpd delivers local mail itself (otherwise all is queued)."""
    config = write_config(tmp_path)
    text = config.read_text()
    replaced = text.replace(f'spool = "{tmp_path / "spool"}"', f'spool = "{disk.root / "spool"}"')
    users = 'users = ["alice", "bob"]\n'
    replaced = replaced.replace(
        users,
        f'{users}maildir = "{disk.root}/mail/{{user}}/Maildir"\n'
        f"deliver_at_commit = {'true' if at_commit else 'false'}\n",
    )
    assert replaced.count(str(disk.root)) == 2, text
    config.write_text(replaced)
    return config


def check_queue(spool: Spool, sent: dict[str, bytes], acknowledged: list[str]) -> dict[str, str]:
    """Every acknowledged message queued once, whole and byte-exact; nothing
    else but whole messages that were sent whole; nothing set aside, nothing
    left in tmp/ or half-committed.  Returns the queue ids by token."""
    assert not spool.corrupt.exists() or os.listdir(spool.corrupt) == [], (
        "files set aside as not whole: " + repr(spool.set_aside())
    )
    assert os.listdir(spool.tmp) == []
    names = sorted(os.listdir(spool.queue))
    assert names == spool.ids(), "files in queue/ still in their committing mode"
    found: dict[str, str] = {}
    for queue_id in names:
        with open(spool.queue / queue_id, "rb") as file:
            try:
                read_envelope(file)
            except ValueError as exc:
                raise AssertionError(f"queue file {queue_id} is not whole: {exc}") from None
        with spool.open_message(queue_id) as stored:
            content = body_of(stored.read())
        token = re.match(rb"Message-ID: <([a-z0-9]+)@power\.test>", content)
        assert token is not None, f"queue file {queue_id}: {content[:80]!r}"
        name = token.group(1).decode()
        assert name not in found, f"{name} queued twice: {found[name]} and {queue_id}"
        assert content == sent[name], f"queue file {queue_id} ({name}) differs from what was sent"
        found[name] = queue_id
    lost = [token for token in acknowledged if token not in found]
    assert not lost, f"{len(lost)} messages answered 250 are not in the queue: {lost[:5]}"
    return found


def test_power_cut_while_smtpd_commits(
    tmp_path: Path, lazyfs_built: None, request: pytest.FixtureRequest
) -> None:
    disk = Disk(tmp_path)
    disk.mount()
    try:
        config = configure(tmp_path, disk)
        spool = Spool(disk.root / "spool")
        sent: dict[str, bytes] = {}
        acknowledged: list[str] = []
        for seed in range(rounds(request, 4, 40)):
            rng = random.Random(seed)
            with daemon(config) as server:
                traffic = Traffic(server.port, seed, sent)
                traffic.wait_for(rng.randint(3, 40))
                time.sleep(rng.uniform(0, 0.2))  # the cut falls anywhere in a commit
                disk.cut(server.process.pid)
                traffic.join()
            acknowledged += traffic.acknowledged
            # The restarted daemon's recovery runs before it listens.
            with daemon(config):
                check_queue(spool, sent, acknowledged)
        # deliver starts cleanly on what the cuts left, and delivers all of it.
        deliver = run_deliver(config, "--once")
        assert deliver.returncode == 0, deliver.stderr.decode()
        assert "Traceback" not in deliver.stderr.decode()
        assert spool.ids() == []
        for user in ("alice", "bob"):
            copies = maildir(disk.root, user)
            assert len(copies) == len(set(copies)) >= len(acknowledged)
    finally:
        disk.unmount()


def check_copies(root: Path, sent: dict[str, bytes], acknowledged: list[str]) -> None:
    """Every acknowledged message in each Maildir exactly once, whole and
    byte-exact; nothing else but whole copies of messages sent whole, once."""
    for user in RECIPIENTS:
        mailbox = user.split("@")[0]
        head = f"Return-Path: <{SENDER}>\nDelivered-To: {user}\n".encode()
        found: dict[str, str] = {}
        for name in maildir(root, mailbox):
            copy = (root / "mail" / mailbox / "Maildir" / "new" / name).read_bytes()
            assert copy.startswith(head + b"Received: from "), f"{name}: {copy[:120]!r}"
            lines = copy[len(head) :].split(b"\n")
            i = 1
            while lines[i].startswith(b"\t"):
                i += 1
            content = b"\n".join(lines[i:])
            token = re.match(rb"Message-ID: <([a-z0-9]+)@power\.test>", content)
            assert token is not None, f"{name}: {content[:80]!r}"
            key = token.group(1).decode()
            assert key not in found, f"{key} delivered twice to {mailbox}: {found[key]}, {name}"
            assert content == sent[key].replace(b"\r\n", b"\n"), f"{mailbox}'s {name} is torn"
            found[key] = name
        lost = [token for token in acknowledged if token not in found]
        assert not lost, f"{len(lost)} messages answered 250 are not in {mailbox}'s: {lost[:5]}"


def test_power_cut_while_smtpd_delivers_at_commit(
    tmp_path: Path, lazyfs_built: None, request: pytest.FixtureRequest
) -> None:
    """Local mail written into the Maildirs by smtpd's commit processes: a
    250 means a whole copy in each, which survives the cut, exactly once."""
    disk = Disk(tmp_path)
    disk.mount()
    try:
        config = configure(tmp_path, disk, at_commit=True)
        spool = Spool(disk.root / "spool")
        sent: dict[str, bytes] = {}
        acknowledged: list[str] = []
        for seed in range(rounds(request, 4, 40)):
            rng = random.Random(seed)
            with daemon(config) as server:
                traffic = Traffic(server.port, 500 + seed, sent)
                traffic.wait_for(rng.randint(3, 40))
                time.sleep(rng.uniform(0, 0.2))  # the cut falls anywhere in a commit
                disk.cut(server.process.pid)
                traffic.join()
            acknowledged += traffic.acknowledged
            with daemon(config):
                check_copies(disk.root, sent, acknowledged)
                assert spool.ids() == []  # nothing for deliver: all of it was local
    finally:
        disk.unmount()


# -- deliver ----------------------------------------------------------------------


def run_deliver(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.deliver", "-c", str(config), *args],
        capture_output=True,
        env=env(),
        timeout=120,
        check=False,
    )


def maildir(root: Path, user: str) -> list[str]:
    """The names of the messages in a user's Maildir (new/ and cur/), flags taken off."""
    box = root / "mail" / user / "Maildir"
    return [
        name.split(":")[0]
        for folder in ("new", "cur")
        if (box / folder).exists()
        for name in os.listdir(box / folder)
    ]


def check_maildirs(root: Path, expected: dict[tuple[str, str], bytes], *, finished: bool) -> None:
    """Every Maildir copy whole, of a known message and recipient, and there
    once; with ``finished``, every one there."""
    seen: set[tuple[str, str]] = set()
    for user in ("alice", "bob"):
        folder = root / "mail" / user / "Maildir" / "new"
        for name in os.listdir(folder) if folder.exists() else []:
            match = re.fullmatch(r"\d+\.M([0-9a-f]{26})R(\d+)\.mx\.test", name)
            assert match is not None, name
            key = (match.group(1), user)
            assert int(match.group(2)) == RECIPIENTS.index(f"{user}@example.org")
            assert key not in seen, f"{name}: delivered twice"
            assert (folder / name).read_bytes() == expected[key], f"{user}'s {name} is not whole"
            seen.add(key)
    if finished:
        assert seen == set(expected)


def test_power_cut_while_deliver_writes_maildirs_and_states(
    tmp_path: Path, lazyfs_built: None, request: pytest.FixtureRequest
) -> None:
    disk = Disk(tmp_path)
    disk.mount()
    try:
        config = configure(tmp_path, disk)
        spool = Spool(disk.root / "spool")
        sent: dict[str, bytes] = {}
        with daemon(config) as server:
            traffic = Traffic(server.port, 1000, sent)
            traffic.wait_for(rounds(request, 60, 400))
            traffic.stop.set()
            traffic.join()
        expected: dict[tuple[str, str], bytes] = {}
        for queue_id in spool.ids():
            with spool.open_message(queue_id) as stored:
                message = stored.read().replace(b"\r\n", b"\n")
            for address in RECIPIENTS:
                header = f"Return-Path: <{SENDER}>\nDelivered-To: {address}\n".encode()
                expected[(queue_id, address.split("@")[0])] = header + message
        rng = random.Random(7)
        drained = False  # a pass found too little left to cut it short
        for _ in range(rounds(request, 3, 30)):
            # One pass (--once): deliver's service binds a socket in the
            # spool, a call LazyFS does not implement (ENOSYS).
            process = subprocess.Popen(
                [PYTHON, "-m", "mmdf_smtp.cli.deliver", "-c", str(config), "--once"],
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env(),
            )
            assert process.stderr is not None
            target = rng.randint(1, 20)  # of 120 deliveries (800 with --soak): it stops short
            delivered = 0
            said: list[str] = []  # deliver's log, for the message of a failure
            while delivered < target:
                line = process.stderr.readline().decode()
                said.append(line)
                if not line:
                    # Each cut comes after the target and a pause in which
                    # more deliveries finish, so the long runs can use the
                    # queue up: a pass that ends by itself must have ended
                    # well, and the checks below find whether it was all.
                    assert process.wait() == 0, f"deliver failed: {said[-5:]}"
                    drained = True
                    break
                assert "Traceback" not in line, line
                delivered += "status=delivered" in line
            if drained:
                process.stderr.close()
                break
            time.sleep(rng.uniform(0, 0.05))
            disk.cut(process.pid)
            process.wait()
            process.stderr.close()
            check_maildirs(disk.root, expected, finished=False)
            for queue_id in spool.ids():
                spool.read_state(queue_id)  # a torn state raises
        finished = run_deliver(config, "--once")
        assert finished.returncode == 0, finished.stderr.decode()
        assert "Traceback" not in finished.stderr.decode()
        assert spool.ids() == [] and not os.listdir(spool.state)
        check_maildirs(disk.root, expected, finished=True)
    finally:
        disk.unmount()


# -- the directory fsync ----------------------------------------------------------


class Trace:
    """smtpd's system calls (strace) while one message is sent to alice."""

    def __init__(self, tmp_path: Path, config: Path) -> None:
        strace = shutil.which("strace")
        if strace is None:
            pytest.fail("strace is missing (Debian: strace)")
        trace = tmp_path / "trace"
        process = subprocess.Popen(
            [
                strace, "-f", "-y", "-s", "48", "-o", str(trace),
                "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,write,sendto,sendmsg",
                PYTHON, "-m", "mmdf_smtp.cli.smtpd", "-c", str(config), "smtpsrvr", "local",
            ],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env(),
        )  # fmt: skip
        server = Daemon(process, config)
        try:
            message = b"Subject: traced\r\n\r\n" + b"x" * 100 + b"\r\n"
            with smtplib.SMTP(server.host, server.port, timeout=60) as smtp:
                smtp.sendmail(SENDER, ["alice@example.org"], message)
        finally:
            # strace passes no signal on: smtpd itself is stopped, strace ends with it.
            for smtpd_pid in tree(process.pid)[1:2]:
                os.kill(smtpd_pid, signal.SIGTERM)
            server.stop()
        self.lines = trace.read_text().splitlines()

    def first(self, pattern: str) -> int:
        for i, line in enumerate(self.lines):
            if re.search(pattern, line):
                return i
        raise AssertionError(f"no {pattern!r} in the trace:\n" + "\n".join(self.lines[-60:]))

    def fsynced(self, path: Path) -> int:
        """The line where the first fsync of ``path`` returned 0."""
        start = self.first(rf"fsync\(\d+<{re.escape(str(path))}>")
        done = start
        if "<unfinished ...>" in self.lines[start]:
            # Another process's call came between: the end is on a line of its own.
            pid = self.lines[start].split()[0]
            done = next(
                i
                for i in range(start + 1, len(self.lines))
                if re.search(rf"^{pid} +<\.\.\. fsync resumed>\)", self.lines[i])
            )
        assert self.lines[done].rstrip().endswith("= 0"), self.lines[done]
        return done

    def answered(self) -> int:
        return self.first(r"(write|sendto)\(\d+<(TCP|socket)[^>]*>, \"[^\"]*250 2\.0\.0 Submitted")

    def in_order(self, *steps: int) -> None:
        assert list(steps) == sorted(steps), json.dumps([self.lines[i] for i in steps], indent=1)


def test_strace_shows_queue_fsynced_before_the_250(tmp_path: Path) -> None:
    """What LazyFS cannot show: the rename into queue/ made durable before the
    250, and the file's fsync before that rename."""
    config = write_config(tmp_path, "deliver_at_commit = false\n")  # under [local]
    trace = Trace(tmp_path, config)
    [queue_id] = os.listdir(tmp_path / "spool" / "queue")
    synced = trace.first(rf"fsync\(\d+<[^>]*/tmp/{queue_id}>")
    renamed = trace.first(rf"rename(at2?)?\(.*/tmp/{queue_id}\".*/queue/{queue_id}\"")
    dir_synced = trace.fsynced(tmp_path / "spool" / "queue")
    trace.in_order(synced, renamed, dir_synced, trace.answered())


def test_strace_shows_maildir_copy_and_new_fsynced_before_the_250(tmp_path: Path) -> None:
    """The same for a copy written at commit time: the copy's fsync, its
    rename into new/, and new/'s fsync, all before the 250."""
    config = write_config(tmp_path, f'maildir = "{tmp_path}/mail/{{user}}/Maildir"\n')
    trace = Trace(tmp_path, config)
    assert os.listdir(tmp_path / "spool" / "queue") == []
    box = tmp_path / "mail" / "alice" / "Maildir"
    [name] = os.listdir(box / "new")
    synced = trace.fsynced(box / "tmp" / name)
    moved = trace.first(rf"rename(at2?)?\(.*/tmp/{re.escape(name)}\".*/new/{re.escape(name)}\"")
    new_synced = trace.fsynced(box / "new")
    trace.in_order(synced, moved, new_synced, trace.answered())
