"""[queue]: which backend holds the queue, and the one factory every command gets it from."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pytest

from mmdf_smtp.cli import checkque, smtpsrvr
from mmdf_smtp.config import ConfigError, QueueConfig, parse
from mmdf_smtp.queue import (
    DeliveryState,
    Envelope,
    MessageBusy,
    QueuedMessage,
    SetAside,
    open_backend,
)
from mmdf_smtp.queue.spool import IN_MEMORY, Spool
from wire import reachable_by_anyone

DSN = "postgresql://mmdf@127.0.0.1:5432/mmdf"
DATABASE_MODULE = "mmdf_smtp.queue.postgres"


def test_the_spool_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Other test modules import the database backend when collected: forget
    # it here, to see whether opening the spool imports it again.
    monkeypatch.delitem(sys.modules, DATABASE_MODULE, raising=False)
    config = parse('spool = "q"\n', "f.toml", base=tmp_path)
    assert config.queue == QueueConfig(backend="spool", dsn=None)
    backend = open_backend(config, in_memory=IN_MEMORY)
    assert isinstance(backend, Spool)
    assert (backend.directory, backend.in_memory) == (tmp_path / "q", IN_MEMORY)


def test_a_site_on_the_spool_never_loads_the_database_driver(tmp_path: Path) -> None:
    # In a process of its own: other tests of this run load the module.
    program = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mmdf_smtp.config import parse\n"
        "from mmdf_smtp.queue import open_backend\n"
        f"open_backend(parse('spool = \"q\"\\n', 'f.toml', base=Path({str(tmp_path)!r})))\n"
        f"print({DATABASE_MODULE!r} in sys.modules, 'psycopg' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "False False\n"


def test_a_dsn_beside_the_spool_is_kept_for_later(tmp_path: Path) -> None:
    """As the documented example has it: switching backends is one word."""
    config = parse(f'[queue]\nbackend = "spool"\ndsn = "{DSN}"\n', "f.toml", base=tmp_path)
    assert config.queue == QueueConfig(backend="spool", dsn=DSN)
    assert isinstance(open_backend(config), Spool)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[queue]\nbackend = "mysql"\n',
            'f.toml:2: queue.backend: must be "spool" or "postgresql"',
        ),
        ("[queue]\nbackend = 1\n", "f.toml:2: queue.backend: must be a string"),
        (
            '\n[queue]\nbackend = "postgresql"\n',
            'f.toml:3: queue.backend: "postgresql" needs queue.dsn, the database\'s connection'
            ' string (e.g. "postgresql://mmdf@127.0.0.1:5432/mmdf")',
        ),
        (
            '[queue]\nbackend = "postgresql"\ndsn = " "\n',
            "f.toml:3: queue.dsn: must not be empty",
        ),
        ("[queue]\ndsn = 5432\n", "f.toml:2: queue.dsn: must be a string"),
        ("[queue]\nhost = 'db'\n", "f.toml:2: queue.host: unknown key"),
        ("[queue]\nlease_seconds = 0\n", "f.toml:2: queue.lease_seconds: must be at least 1"),
        ('queue = "postgresql"\n', "f.toml:1: queue: must be a table"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.toml", base=tmp_path)
    assert str(caught.value) == message


def database_config(tmp_path: Path) -> Path:
    path = tmp_path / "mmdf.toml"
    path.write_text(
        f'spool = "spool"\nlocal_domains = ["example.org"]\n'
        f'[queue]\nbackend = "postgresql"\ndsn = "{DSN}"\n'
        '[channels.local]\nhosts = ["127.0.0.0/8"]\nrelay = true\n'
        '[local]\nusers = ["alice"]\n'
    )
    return path


class FakeDatabaseQueue:
    def __init__(self, dsn: str, *, staging: Path, lease_seconds: float) -> None:
        self.dsn = dsn
        self.staging = staging
        self.lease_seconds = lease_seconds


def test_the_database_backend_is_imported_when_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType(DATABASE_MODULE)
    module.PostgresQueue = FakeDatabaseQueue  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, DATABASE_MODULE, module)
    config = parse(database_config(tmp_path).read_text(), "f.toml", base=tmp_path)
    backend = open_backend(config)
    assert isinstance(backend, FakeDatabaseQueue)
    # Messages being received are staged in the node's own spool folder.
    assert (backend.dsn, backend.staging) == (DSN, tmp_path / "spool")
    assert backend.lease_seconds == 300


def test_the_lease_is_configured_for_every_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType(DATABASE_MODULE)
    module.PostgresQueue = FakeDatabaseQueue  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, DATABASE_MODULE, module)
    text = (
        database_config(tmp_path).read_text().replace("[channels", "lease_seconds = 20\n[channels")
    )
    config = parse(text, "f.toml", base=tmp_path)
    assert config.queue.lease_seconds == 20
    backend = open_backend(config)
    assert isinstance(backend, FakeDatabaseQueue)
    assert backend.lease_seconds == 20


def test_a_database_backend_not_installed_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, DATABASE_MODULE, None)  # import fails as if absent
    config = parse(database_config(tmp_path).read_text(), "f.toml", base=tmp_path)
    with pytest.raises(ConfigError) as caught:
        open_backend(config)
    assert str(caught.value) == (
        'f.toml: queue.backend: "postgresql" cannot be used: it is not part of this installation'
    )


def test_a_missing_driver_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def without_driver(name: str, package: str | None = None) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")

    monkeypatch.setattr("mmdf_smtp.queue.importlib.import_module", without_driver)
    config = parse(database_config(tmp_path).read_text(), "f.toml", base=tmp_path)
    with pytest.raises(ConfigError, match=r'"postgresql" cannot be used: it needs psycopg$'):
        open_backend(config)


@pytest.mark.parametrize(
    ("program", "run"),
    [
        ("checkque", lambda config: checkque.main(["-c", config])),
        ("checkque", lambda config: checkque.main(["-c", config, "--delete", "ALL"])),
        ("smtpsrvr", lambda config: smtpsrvr.main(["-c", config, "[127.0.0.2]", "-", "local"])),
    ],
)
def test_every_command_says_so_and_exits_78(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    program: str,
    run: object,
) -> None:
    """Before it touches a client or reads a message: nothing is lost."""
    monkeypatch.setitem(sys.modules, DATABASE_MODULE, None)
    monkeypatch.setattr(sys, "stdin", None)  # never read
    monkeypatch.setattr(sys, "argv", [program])
    config = str(database_config(tmp_path))
    assert callable(run)
    try:
        status = run(config)
    except SystemExit as exc:
        status = exc.code
    assert status == 78
    err = capsys.readouterr().err
    assert err.startswith(f"{program}: {config}: queue.backend: ")
    assert err.endswith('"postgresql" cannot be used: it is not part of this installation\n')
    assert not (tmp_path / "spool" / "queue").exists()


def test_submit_says_so_before_it_reads_the_message(tmp_path: Path) -> None:
    """In a process of its own: as root, submit becomes the mail system's user first."""
    config = database_config(tmp_path)
    if os.geteuid() == 0:
        config.write_text('user = "daemon"\n' + config.read_text())
        reachable_by_anyone(tmp_path)
    blocked = (
        f"import sys; sys.modules[{DATABASE_MODULE!r}] = None;"
        "arguments, sys.argv = sys.argv[1:], ['submit'];"
        "from mmdf_smtp.cli.submit import main; raise SystemExit(main(arguments))"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, "-c", str(config), "alice@example.org"],
        input=b"Subject: never read\n\nbody\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert result.stderr.decode() == (
        f"submit: {config}: queue.backend: "
        '"postgresql" cannot be used: it is not part of this installation\n'
    )
    assert not (tmp_path / "spool" / "queue").exists()


class MemoryQueue:
    """The administrator's face of a backend that is not the spool: what
    checkque may use, and nothing of a spool's."""

    def __init__(self, dsn: str, *, staging: Path) -> None:
        self.name = "postgresql://mmdf@127.0.0.1:5432/mmdf"
        self.set_aside_place = "the set_aside table"
        self.doorbell = "channel mmdf_queue"
        self.queued = {MESSAGE.id: MESSAGE}
        self.states: dict[str, DeliveryState] = {}
        self.flushed: list[str | None] = []

    def messages(self, *, held: bool = False) -> Iterator[QueuedMessage]:
        return iter([m for m in self.queued.values() if m.held == held])

    def read_state(self, queue_id: str) -> DeliveryState | None:
        if queue_id not in self.queued:
            raise KeyError(queue_id)
        return self.states.get(queue_id)

    def open_message(self, queue_id: str) -> BinaryIO:
        if queue_id not in self.queued:
            raise KeyError(queue_id)
        return io.BytesIO(b"Subject: hi\r\n\r\nbody\r\n")

    def set_aside(self) -> list[SetAside]:
        return [SetAside("0661f57b4f69aa000511300000", 7, "chunks missing")]

    def open_set_aside(self, name: str) -> BinaryIO:
        raise KeyError(name)

    def delete_set_aside(self, name: str) -> bool:
        return False

    def hold(self, queue_id: str, *, wait: float) -> bool:
        message = self.queued[queue_id]
        self.queued[queue_id] = replace(message, held=True)
        return not message.held

    def release(self, queue_id: str, *, wait: float) -> bool:
        raise MessageBusy(queue_id)

    def delete(self, queue_id: str, *, wait: float) -> None:
        del self.queued[queue_id]

    def flush(self, queue_id: str | None = None) -> bool:
        self.flushed.append(queue_id)
        return True


MESSAGE = QueuedMessage(
    "0661f57b4f69aa000511300001",
    Envelope(
        sender="bob@example.net",
        recipients=("alice@example.org",),
        channel="smtp",
        remote_host="client.example.net",
        remote_addr="127.0.0.2",
        helo="client.example.net",
        received=datetime(2026, 12, 6, 12, 0, tzinfo=UTC),
    ),
    22,
)


def test_checkque_works_any_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One database, whichever checkque run opens it.
    database = MemoryQueue(DSN, staging=tmp_path / "spool")

    def made(dsn: str, *, staging: Path, lease_seconds: float) -> MemoryQueue:
        assert (dsn, staging) == (DSN, tmp_path / "spool")
        return database

    module = types.ModuleType(DATABASE_MODULE)
    module.PostgresQueue = made  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, DATABASE_MODULE, module)
    config = str(database_config(tmp_path))

    def run(*arguments: str) -> tuple[int, str, str]:
        status = checkque.main(["-c", config, *arguments])
        out, err = capsys.readouterr()
        return status, out, err

    status, out, _ = run()
    assert status == 0
    assert out.splitlines()[1:] == [
        "0661f57b4f69aa000511300001    22  2026-12-06 12:00:00  smtp     queued"
        "  <bob@example.net>  alice@example.org",
        "    pending    alice@example.org",
        "1 message, 22 bytes",
        "",
        "set aside in the set_aside table (never delivered; see checkque --cat ID):",
        "0661f57b4f69aa000511300000          7  chunks missing",
    ]
    assert run("--cat", f"msg.{MESSAGE.id}") == (0, "Subject: hi\r\n\r\nbody\r\n", "")
    assert run("--flush", MESSAGE.id) == (0, f"{MESSAGE.id}: flush requested\n", "")
    assert run("--hold", "ALL") == (0, f"{MESSAGE.id}: held\n", "")
    assert run("--flush", MESSAGE.id) == (
        1,
        "",
        f"checkque: {MESSAGE.id}: held: release it first\n",
    )
    assert run("--release", MESSAGE.id) == (
        1,
        "",
        f"checkque: {MESSAGE.id}: busy: being delivered (waited 10 s)\n",
    )
    [line, _] = run("--json")[1].splitlines()
    assert json.loads(line)["state"] == "held"
    assert run("--delete", MESSAGE.id) == (0, f"{MESSAGE.id}: deleted\n", "")
    assert run("--delete", MESSAGE.id) == (
        1,
        "",
        f"checkque: {MESSAGE.id}: no such message in the queue\n",
    )
    status, out, _ = run()
    assert out.startswith("queue postgresql://mmdf@127.0.0.1:5432/mmdf is empty\n")
    assert database.flushed == [MESSAGE.id]
