"""A real PostgreSQL for the tests, on loopback, from Debian's packages.

Never the system's cluster: :class:`PgServer` runs ``initdb`` into a
temporary folder and starts ``postgres`` on a free port of 127.0.0.1, with
no Unix socket, fsync on.  PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the ``postgres`` user that Debian's
package creates (``runuser``), in a folder that user owns.

Fixtures: ``pg_server`` (one server for the session) and ``pg_dsn`` (a
fresh database on it for each test: ``CREATE DATABASE ... TEMPLATE
template0``, which copies a few files).  :func:`primary_and_standby` makes
a primary with a synchronous standby (``pg_basebackup -R``) for the
failover tests; :meth:`PgServer.kill` (SIGKILL, the postmaster and its
children) and :meth:`PgServer.promote` (``pg_ctl promote``) are what they
do to it.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_USER = "postgres"  # who runs the server when the tests run as root
_counter = itertools.count()


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's programs (Debian keeps them out of PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_server_user() -> list[str]:
    return ["runuser", "-u", _USER, "--"] if os.geteuid() == 0 else []


def _server_folder() -> Path:
    """A folder the server's user owns and can reach (pytest's tmp_path,
    under root's 0700 base, it cannot)."""
    folder = Path(tempfile.mkdtemp(prefix="mmdf-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(_USER)
        os.chown(folder, user.pw_uid, user.pw_gid)
    return folder


class PgServer:
    """One PostgreSQL cluster in ``folder``/``name``, on 127.0.0.1:``port``."""

    def __init__(self, folder: Path, name: str, *, settings: dict[str, str] | None = None) -> None:
        binaries = pg_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = binaries
        self.data = folder / name
        self.log = folder / f"{name}.log"
        self.port = _free_port()
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "max_wal_size": "256MB",
            # A connection a killed test left behind does not hold a lock for long.
            "idle_in_transaction_session_timeout": "60s",
            **(settings or {}),
        }

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*_as_server_user(), *command],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
        )

    def initdb(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            "postgres",
            "--auth",
            "trust",  # loopback only, and only for the tests' own server
            "--encoding",
            "UTF8",
            "--no-instructions",
        )

    def start(self) -> None:
        # pg_ctl hands -o to a shell: each value quoted for it.
        options = " ".join(f"-c {key}={shlex.quote(value)}" for key, value in self.settings.items())
        self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "--wait",
            "--timeout",
            "60",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.log),
            "-o",
            f"-p {self.port} {options}",
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run(
                str(self.bin / "pg_ctl"), "stop", "--pgdata", str(self.data), "-m", "immediate"
            )

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started: the machine died."""
        postmaster = self.pid()
        if postmaster is None:
            return
        children = [pid for pid in _all_pids() if _parent(pid) == postmaster]
        for pid in (postmaster, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in (postmaster, *children):
            _wait_gone(pid)
        # The machine died: after its reboot no process has that pid.  Here
        # a zombie nobody reaps might, and the next start would take it for
        # a server still running.
        (self.data / "postmaster.pid").unlink(missing_ok=True)

    def promote(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "promote", "--wait", "--pgdata", str(self.data))

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement.encode())


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _wait_gone(pid: int) -> None:
    """Until a killed process is no more (a zombie of init counts as gone)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.01)


def new_database(server: PgServer) -> str:
    name = f"t{os.getpid()}_{next(_counter)}"
    server.sql(f"CREATE DATABASE {name} TEMPLATE template0")
    return name


@contextlib.contextmanager
def single_server() -> Iterator[PgServer]:
    folder = _server_folder()
    server = PgServer(folder, "data")
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def primary_and_standby() -> Iterator[tuple[PgServer, PgServer]]:
    """A primary and a synchronous standby: a commit returns once the
    standby has flushed it too (``synchronous_standby_names = '*'``,
    ``synchronous_commit = on``)."""
    folder = _server_folder()
    primary = PgServer(folder, "primary", settings={"synchronous_standby_names": "*"})
    standby = PgServer(folder, "standby")
    try:
        primary.initdb()
        primary.start()
        standby._run(
            str(primary.bin / "pg_basebackup"),
            "--pgdata",
            str(standby.data),
            "--host",
            "127.0.0.1",
            "--port",
            str(primary.port),
            "--username",
            "postgres",
            "--write-recovery-conf",
            "--wal-method",
            "stream",
            "--checkpoint",
            "fast",
        )
        standby.start()
        primary.sql("SELECT 1")
        _wait_for_sync_standby(primary)
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_sync_standby(primary: PgServer) -> None:
    import time

    import psycopg

    deadline = time.monotonic() + 60
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)
    raise RuntimeError("the standby did not become synchronous")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with single_server() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    name = new_database(pg_server)
    yield pg_server.dsn(name)
    pg_server.sql(f"DROP DATABASE {name} WITH (FORCE)")
