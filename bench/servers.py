"""The three servers under test, each started on a free loopback port and stopped.

Every server gives the same promise: ``250`` to the end of data only once
the message is on stable storage.  mmdf-smtp and aiosmtpd spool each
message into a directory and fsync it; Postfix's cleanup fsyncs its queue
file before smtpd answers, and the queue manager then hands the message to
the discard transport.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0


def free_port() -> int:
    """A loopback port nobody listens on (Postfix's master binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ext2/3/4's inode flags (linux/fs.h): chattr +T.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(directory: Path) -> bool:
    """Have ext4 place each new subdirectory of ``directory`` in block groups of its own.

    ext4 allocates a file's inode in the first block group of its
    directory's flex group that has a free one, and, without a journal,
    scans past every inode there freed in the last minutes
    (``recently_deleted`` in fs/ext4/ialloc.c): about a microsecond each,
    on every create.  Subdirectories of one directory share a flex group, so
    one server's unlinks (Postfix's discard delivery), or an earlier run's,
    would cost the other servers' creates a millisecond or more.  With the
    flag (the one ext4 sets on top-level directories) the servers'
    directories are spread to fresh groups, as if each had a disk of its own.
    The group is looked for from a hash of the new directory's name: give
    each run's directories names of their own (:func:`unique_name`), or a
    run would land where the last one's clean-up just freed its inodes.
    False where the filesystem does not take the flag.
    """
    flags = bytearray(8)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags[:4], sys.byteorder) | _FS_TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, value.to_bytes(4, sys.byteorder) + bytes(4))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def unique_name(name: str) -> str:
    """``name`` with a suffix of its own: see :func:`spread_subdirectories`."""
    return f"{name}-{secrets.token_hex(4)}"


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/<pid>/task/<tid>/children."""
    found = [root]
    i = 0
    while i < len(found):
        pid = found[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as file:
                    found.extend(int(child) for child in file.read().split())
            except OSError:
                continue
    return found


def _wait_for_line(stream: IO[bytes], marker: bytes, log: Path, what: str) -> bytes:
    """Read ``stream`` until a line holds ``marker``; then copy the rest into ``log``.

    The copy runs in a thread so that the server never blocks on a full pipe.
    """
    seen: list[bytes] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            sink = log.open("ab")
            sink.writelines(seen)
            threading.Thread(target=_drain, args=(stream, sink), daemon=True).start()
            return line
    raise RuntimeError(f"{what} did not start:\n" + b"".join(seen).decode(errors="replace"))


def _drain(stream: IO[bytes], sink: IO[bytes]) -> None:
    with sink:
        shutil.copyfileobj(stream, sink)


def _clear(directory: Path, trash: Path) -> None:
    """Empty a spool directory between runs, as delivery would.

    The directory is moved into ``trash`` (removed with the bench's working
    directory at the end) and made again, empty.  Unlinking its thousands of
    files here, between runs, was work for the filesystem that the next
    server paid for: on ext4 without a journal (this machine's root), every
    file created in the next minutes scans past the inodes freed meanwhile
    (``recently_deleted`` in fs/ext4/ialloc.c), up to a millisecond of CPU
    for each.
    """
    if not directory.is_dir():
        return
    status = directory.stat()
    trash.mkdir(exist_ok=True)
    os.rename(directory, trash / f"{directory.name}.{len(os.listdir(trash))}")
    directory.mkdir(mode=stat.S_IMODE(status.st_mode))
    os.chown(directory, status.st_uid, status.st_gid)


class Server:
    """A server under test: its name, address, processes and spool."""

    name = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def root_pid(self) -> int:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return process_tree(self.root_pid())

    @property
    def ports(self) -> list[int]:
        """Where the clients connect: a server of several nodes has a port for each."""
        return [self.port]

    def settle(self) -> None:
        """After a run: let queued work finish so that it does not slow the next run."""

    def alive(self) -> bool:
        try:
            os.kill(self.root_pid(), 0)
        except OSError:
            return False
        return True


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _OneProcess(Server):
    """A server that is one process (and its children) with a spool of ours."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.process: subprocess.Popen[bytes] | None = None
        self.spool = directory / "spool"

    def root_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def settle(self) -> None:
        _clear(self.spool / "queue", self.directory / "trash")

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)


class Mmdf(_OneProcess):
    """mmdf-smtp's smtpd on its fast path: sessions in-process, one worker per core."""

    name = "mmdf-smtp"

    def __init__(
        self,
        directory: Path,
        maxconnects: int,
        *,
        src: Path = SRC,
        extra: str = "",
        name: str = "mmdf-smtp",
        metrics: bool = False,
        uvloop: bool = True,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper``: a command that runs smtpd (valgrind, say)."""
        super().__init__(directory)
        self.config = directory / "mmdf.toml"
        self.wrapper = list(wrapper)
        self.uvloop = uvloop  # False: asyncio's own loop, as `pip install .` without [fast]
        self.maxconnects = maxconnects
        self.src = src
        self.extra = extra  # configuration appended: [[milters]], [auth], ...
        self.name = name
        self.metrics = metrics  # [metrics] listen: counting on, to see what it costs
        if metrics:
            self.name = "mmdf-smtp+metrics"

    def config_text(self) -> str:
        """mmdf-smtp.toml(5) for this server: local mail for a@example.org, kept in the queue."""
        # Started as root, smtpd serves sessions as `user` (never as root).
        return f"""\
user = "nobody"
hostname = "mx.bench"
spool = "{self.spool}"
local_domains = ["example.org"]

[smtpd]
listen = ["127.0.0.1:0"]
maxconnects = {self.maxconnects}

[limits]
message_size = 52428800

[channels.local]
hosts = ["127.0.0.0/8"]
relay = true

[local]
users = ["a"]
deliver_at_commit = false
{self.extra}""" + ('\n[metrics]\nlisten = "127.0.0.1:0"\n' if self.metrics else "")

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.src) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("MMDF_CONFIG", None)
        if not self.uvloop:
            env["MMDF_NO_UVLOOP"] = "1"
        return env

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = self.directory / "mmdf.toml"
        self.config.write_text(self.config_text())
        self.process = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "mmdf_smtp.cli.smtpd",
                "-c",
                str(self.config),
                "smtpsrvr",
                "local",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.environment(),
        )
        assert self.process.stderr is not None
        line = _wait_for_line(
            self.process.stderr, b"listening on", self.directory / "smtpd.log", self.name
        )
        # "listening on 127.0.0.1:PORT, maxconnects N, W workers"
        address = line.split(b"listening on ", 1)[1].split(b",", 1)[0]
        self.port = int(address.rsplit(b":", 1)[1])


class Aiosmtpd(_OneProcess):
    """aiosmtpd with a handler that writes and fsyncs each message (aiosmtpd_spool.py)."""

    name = "aiosmtpd"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "aiosmtpd_spool.py"), "127.0.0.1", "0", str(self.spool)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        line = _wait_for_line(
            self.process.stdout, b"listening on", self.directory / "aiosmtpd.log", self.name
        )
        self.port = int(line.strip().rsplit(b":", 1)[1])


MASTER_CF = """\
{port} inet  n       -       n       -       {maxproc} smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
showq     unix  n       -       n       -       -       showq
"""


class Postfix(Server):
    """A private Postfix instance: its own config, queue and data directories.

    chroot off, loopback only, no DNS, every recipient accepted from
    127.0.0.0/8 and delivered to the discard transport.  The system's
    /etc/postfix is never read or written.

    ``milters`` (Postfix's socket syntax, ``inet:127.0.0.1:PORT``) become
    smtpd_milters, with milter_default_action = tempfail: a milter that is
    down or breaks the protocol costs a 4xx, never an unfiltered 250.
    ``relay_port`` sends every message on to 127.0.0.1:PORT over SMTP
    instead of discarding it, so that a test can see what Postfix queued.
    ``transport`` (Postfix's "transport:nexthop") takes every message
    instead; ``extra`` is appended to main.cf (virtual(8)'s maps, say).
    """

    name = "postfix"

    def __init__(
        self,
        directory: Path,
        maxproc: int,
        *,
        milters: Sequence[str] = (),
        relay_port: int | None = None,
        name: str = "postfix",
        transport: str | None = None,
        extra: str = "",
    ) -> None:
        super().__init__(directory)
        self.transport = transport
        self.extra = extra
        self.maxproc = maxproc
        self.milters = list(milters)
        self.relay_port = relay_port
        self.name = name
        self.started = False

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["postfix", "-c", str(self.directory), *args],
            capture_output=True,
            timeout=STOP_TIMEOUT,
            check=False,
        )

    def start(self) -> None:
        # Postfix's daemons run as the postfix user: the tree must be reachable.
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        for parent in self.directory.parents:
            if parent == Path("/"):
                break
            if parent.stat().st_mode & 0o005 != 0o005:
                raise RuntimeError(f"{parent} is not reachable by the postfix user")
        (self.directory / "queue").mkdir(exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        shutil.chown(self.directory / "data", "postfix")
        self.port = free_port()
        transport = "discard" if self.relay_port is None else "smtp"
        transport = self.transport or transport
        main_cf = f"""\
compatibility_level = 3.6
queue_directory = {self.directory}/queue
data_directory = {self.directory}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = pf.bench
myorigin = pf.bench
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
default_transport = {transport}
relay_transport = {transport}
local_transport = {transport}
virtual_transport = {transport}
local_recipient_maps =
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtp_host_lookup = native
disable_dns_lookups = yes
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = {self.maxproc}
message_size_limit = 52428800
maillog_file = {self.directory}/maillog
maillog_file_prefixes = {self.directory}
{self.extra}"""
        if self.milters:
            main_cf += f"""\
smtpd_milters = {" ".join(self.milters)}
milter_default_action = tempfail
milter_protocol = 6
"""
        if self.relay_port is not None:
            main_cf += f"""\
relayhost = [127.0.0.1]:{self.relay_port}
smtp_tls_security_level = none
"""
        (self.directory / "main.cf").write_text(main_cf)
        (self.directory / "master.cf").write_text(
            MASTER_CF.format(port=f"127.0.0.1:{self.port}", maxproc=self.maxproc)
        )
        for step in ("check", "start"):
            result = self._postfix(step)
            if result.returncode != 0:
                log = self.directory / "maillog"
                said = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(
                    f"postfix {step} failed:\n{result.stderr.decode()}{result.stdout.decode()}"
                    f"{said}"
                )
        self.started = True
        self._wait_listening()

    def _wait_listening(self) -> None:
        """``postfix start`` returns before master has bound the port."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("postfix did not start listening")

    def root_pid(self) -> int:
        text = (self.directory / "queue" / "pid" / "master.pid").read_text()
        return int(text.split()[0])

    def settle(self) -> None:
        """Wait (bounded) until the queue manager has discarded everything queued."""
        queue = self.directory / "queue"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not any(
                files
                for name in ("maildrop", "incoming", "active")
                for _, _, files in os.walk(queue / name)
            ):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if not self.started:
            return
        pids: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            pids = self.pids()
        self._postfix("stop")
        # Leftovers (a smtpd still holding a connection): end them by pid.
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid in pids:
            while time.monotonic() < deadline and _exists(pid):
                time.sleep(0.05)
            if _exists(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.started = False


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pg_bin() -> Path | None:
    """The newest installed PostgreSQL's programs (Debian keeps them out of PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name),
    )
    return found[-1].parent if found else None


class Postgres:
    """A PostgreSQL server for the queue, its data on the run's file system.

    ``fsync`` and ``synchronous_commit`` on (PostgreSQL's defaults): a
    COMMIT returns once its WAL is flushed, the promise a 250 gives.  No
    standby: the bench measures one machine.  Run as the ``postgres`` user
    when the bench runs as root (PostgreSQL refuses root).
    """

    USER = "postgres"

    def __init__(self, directory: Path, *, statements: bool = False) -> None:
        binaries = _pg_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: postgresql)")
        self.bin = binaries
        self.directory = directory
        self.data = directory / "data"
        self.port = 0
        self.statements = statements  # pg_stat_statements on: counts() counts them

    def _as_user(self) -> list[str]:
        return ["runuser", "-u", self.USER, "--"] if os.geteuid() == 0 else []

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as_user(), *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, self.USER, self.USER)
        self._run(
            str(self.bin / "initdb"),
            *("--pgdata", str(self.data), "--username", "postgres"),
            *("--auth", "trust", "--encoding", "UTF8", "--no-instructions"),
        )
        self.port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "max_wal_size": "1GB",
        }
        if self.statements:
            settings["shared_preload_libraries"] = "pg_stat_statements"
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        self._run(
            str(self.bin / "pg_ctl"),
            *("start", "--wait", "--timeout", "60", "--pgdata", str(self.data)),
            *("--log", str(self.directory / "postgres.log"), "-o", f"-p {self.port} {options}"),
        )
        if self.statements:
            import psycopg

            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def root_pid(self) -> int:
        """The postmaster's: its children are the backends and the WAL writer."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def counts(self) -> tuple[int, int]:
        """Transactions that wrote (transaction ids handed out) and
        statements run so far (with ``statements``, else 0)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            xids = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchone()
            calls = (
                conn.execute(
                    "SELECT sum(calls) FROM pg_stat_statements WHERE query NOT LIKE '%pg_s%'"
                ).fetchone()
                if self.statements
                else None
            )
        return int(str(xids[0])) if xids else 0, int(calls[0] or 0) if calls else 0

    def empty(self) -> None:
        """Forget the messages a case queued (the bench runs no deliverer)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('mmdf_message')").fetchone()
            if exists and exists[0]:
                conn.execute("TRUNCATE mmdf_message, mmdf_recipient, mmdf_chunk")
                conn.execute("CHECKPOINT")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run(str(self.bin / "pg_ctl"), "stop", "--pgdata", str(self.data), "-m", "fast")


class MmdfPostgres(Mmdf):
    """mmdf-smtp's smtpd nodes (``nodes`` of them, each a daemon) on one PostgreSQL queue."""

    def __init__(
        self,
        directory: Path,
        maxconnects: int,
        database: Postgres,
        nodes: int,
        *,
        src: Path = SRC,
    ) -> None:
        super().__init__(
            directory,
            maxconnects,
            src=src,
            name="mmdf-smtp+pg" + (f"x{nodes}" if nodes > 1 else ""),
        )
        self.database = database
        self.nodes = [
            Mmdf(directory / f"node{number}", maxconnects, src=src) for number in range(1, nodes)
        ]

    def config_text(self) -> str:
        return super().config_text() + (
            f'\n[queue]\nbackend = "postgresql"\ndsn = "{self.database.dsn}"\n'
        )

    @property
    def ports(self) -> list[int]:
        return [self.port, *(node.port for node in self.nodes)]

    def start(self) -> None:
        for node in self.nodes:
            node.extra = f'\n[queue]\nbackend = "postgresql"\ndsn = "{self.database.dsn}"\n'
            node.start()
        super().start()

    def pids(self) -> list[int]:
        return [pid for node in (self, *self.nodes) for pid in process_tree(node.root_pid())]

    def settle(self) -> None:
        self.database.empty()

    def stop(self) -> None:
        super().stop()
        for node in self.nodes:
            node.stop()
