"""Running on the PostgreSQL queue: a spool moved into it (checkque
--move-from), local submission picked up into it, and its size in the
metrics; on a real server the tests start (tests/pgcluster.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pwd
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mmdf_smtp import metrics
from mmdf_smtp.cli import checkque as checkque_module
from mmdf_smtp.config import Config, load
from mmdf_smtp.queue import (
    DELIVERED,
    DeliveryState,
    Envelope,
    Lease,
    Queue,
    QueueError,
    RecipientState,
    maildrop,
    open_backend,
)
from mmdf_smtp.queue.postgres import PostgresQueue
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.submission import Request, read_headers, read_lines
from queue_contract import BODY, NOW, deferred, envelope
from wire import write_config

pytest_plugins = ["pgcluster"]


def checkque(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    """checkque in the test's process: status, stdout, stderr."""
    try:
        status = checkque_module.main(["-c", str(config), *args])
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def queue_into(queue: Queue, env: Envelope, body: bytes = BODY) -> str:
    writer = queue.open(env)
    writer.write(body)
    writer.commit()
    return writer.id


class Site:
    """An old spool with one of each kind of message, and a configuration
    naming the database."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        for name in ("old", "new"):
            (tmp_path / name).mkdir()
        self.old_config = write_config(tmp_path / "old")
        self.old = Spool(tmp_path / "old" / "spool")
        self.config = write_config(
            tmp_path / "new", f'\n[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
        )
        self.database = PostgresQueue(dsn, staging=tmp_path / "new" / "spool")
        self.new = queue_into(self.old, envelope("new@example.net"))
        self.deferred = queue_into(self.old, envelope("a@example.net", "b@example.net"), BODY * 3)
        state = DeliveryState(
            [RecipientState(recipient=r, address=r) for r in ("a@example.net", "b@example.net")]
        )
        state.recipients[0].status = DELIVERED
        state.recipients[0].last_reply = "250 2.0.0 ok"
        self.old.write_state(self.deferred, deferred(state, 1, NOW + timedelta(days=1)))
        self.held = queue_into(self.old, envelope("held@example.net"))
        assert self.old.hold(self.held, wait=0)
        self.quarantined = queue_into(
            self.old,
            dataclasses.replace(envelope("q@example.net"), quarantine="looks odd"),
        )
        self.torn = queue_into(self.old, envelope("torn@example.net"))
        self.old.move_aside(self.torn, "torn")
        self.ids = [self.new, self.deferred, self.held, self.quarantined]


@pytest.fixture
def site(tmp_path: Path, pg_dsn: str) -> Iterator[Site]:
    made = Site(tmp_path, pg_dsn)
    yield made
    made.database.close()


def messages_as_json(capsys: pytest.CaptureFixture[str], config: Path) -> list[dict[str, object]]:
    status, out, err = checkque(capsys, config, "--json")
    assert (status, err) == (0, "")
    return [json.loads(line) for line in out.splitlines()]


def test_a_spool_moves_whole_and_its_set_aside_files_stay(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    before = messages_as_json(capsys, site.old_config)
    shown = [entry for entry in before if entry["state"] != "corrupt"]
    assert [entry["id"] for entry in shown] == sorted(site.ids)
    bodies = {i: checkque(capsys, site.old_config, "--cat", i)[1] for i in site.ids}
    (torn,) = site.old.set_aside()
    assert torn.name == site.torn

    status, out, err = checkque(capsys, site.config, "--move-from", str(site.old.directory))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert sorted(lines[:4]) == sorted(f"{i}: moved" for i in site.ids)
    assert lines[4].startswith("4 messages moved into ")
    assert lines[4].endswith(f", 0 there already, 0 left in {site.old.directory}")
    assert lines[5:] == [
        f"left alone in {site.old.corrupt} (set aside, never moved):",
        f"{torn.name}  {torn.size:>9}  {torn.reason}",
    ]

    # Every message as it was, state and held flag included; bodies octet for octet.
    assert messages_as_json(capsys, site.config) == shown
    assert {i: checkque(capsys, site.config, "--cat", i)[1] for i in site.ids} == bodies
    # The old spool keeps only what was set aside.
    assert [e["id"] for e in messages_as_json(capsys, site.old_config)] == [site.torn]
    assert sorted(p.name for p in site.old.state.iterdir()) == []
    # In the database, due when the recorded states say.
    assert sorted(lease.id for lease in _claim_all(site.database, NOW)) == [site.new]
    later = {
        lease.id: lease.resumed for lease in _claim_all(site.database, NOW + timedelta(days=2))
    }
    assert later == {site.new: False, site.deferred: True}

    # A second run finds nothing to move.
    status, out, err = checkque(capsys, site.config, "--move-from", str(site.old.directory))
    assert (status, err) == (0, "")
    assert out.splitlines()[0].startswith("0 messages moved into ")


def _claim_all(database: PostgresQueue, now: datetime) -> list[Lease]:
    leases = database.claim(100, now)
    for lease in leases:
        lease.end()
    return leases


def test_a_move_cut_short_after_the_commit_copies_nothing_twice(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the database's commit and the spool's removal: the
    next run finds the message in the database, even delivered meanwhile,
    and only removes it from the spool."""
    real_delete = Spool.delete

    def crash(self: Spool, queue_id: str, *, wait: float) -> None:
        raise KeyboardInterrupt  # as a kill: nothing after the commit runs

    monkeypatch.setattr(Spool, "delete", crash)
    with pytest.raises(KeyboardInterrupt):
        checkque_module.main(["-c", str(site.config), "--move-from", str(site.old.directory)])
    monkeypatch.setattr(Spool, "delete", real_delete)
    capsys.readouterr()
    first = site.new  # the first moved: in both places now
    assert first in site.old.ids()
    # A deliverer of the database delivers it meanwhile: it leaves the queue.
    (lease,) = site.database.claim(1, NOW)
    assert lease.id == first
    lease.complete()

    status, out, err = checkque(capsys, site.config, "--move-from", str(site.old.directory))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert f"{first}: already in the target: removed from the spool" in lines
    assert lines[4].startswith("3 messages moved into ")
    assert lines[4].endswith(f", 1 there already, 0 left in {site.old.directory}")
    assert [e["id"] for e in messages_as_json(capsys, site.config)] == sorted(
        set(site.ids) - {first}
    )
    assert site.old.ids() == site.old.held_ids() == []


def test_a_move_waits_for_no_deliver(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    held = site.old.start_delivering()  # deliver.lock, as a running deliver holds it
    try:
        status, out, err = checkque(capsys, site.config, "--move-from", str(site.old.directory))
    finally:
        held.close()
    assert (status, out) == (75, "")
    assert err == (
        f"checkque: deliver is running on {site.old.directory} (it holds deliver.lock):"
        " stop it first\n"
    )
    assert messages_as_json(capsys, site.config) == []
    assert sorted(site.old.ids() + site.old.held_ids()) == sorted(site.ids)


def test_a_move_from_what_is_not_a_spool_or_into_itself_is_refused(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert checkque(capsys, site.config, "--move-from", str(tmp_path / "none")) == (
        64,
        "",
        f"checkque: {tmp_path / 'none'}: not a spool (it has no queue/)\n",
    )
    assert checkque(capsys, site.old_config, "--move-from", str(site.old.directory)) == (
        64,
        "",
        f"checkque: {site.old.directory} is the configured queue itself\n",
    )


# -- local submission into the database ---------------------------------------------


def other_user() -> pwd.struct_passwd:
    """A user who is neither root nor the configured ``user``: submit drops for them."""
    try:
        return pwd.getpwnam("daemon")
    except KeyError:
        pytest.skip("no 'daemon' user in the password file to submit as")


def drop_as(config: Config, user: pwd.struct_passwd, text: bytes) -> None:
    """A maildrop file as submit run by ``user`` leaves it (tests/test_submit.py's way)."""
    spool = Spool(config.spool)
    maildrop.prepare(spool)
    pieces = read_lines(io.BytesIO(text), dot_ends=False, limit=0)
    request = Request(recipients=("alice",))
    name = maildrop.drop(spool, request, read_headers(pieces).octets())
    os.chown(spool.directory / "maildrop" / name, user.pw_uid, user.pw_gid)


def test_a_users_submission_is_picked_up_into_the_database(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    user = other_user()
    config = load(str(site.config))
    drop_as(config, user, b"Subject: dropped\n\nbody\n")
    backend = open_backend(config)
    [queue_id] = maildrop.pickup(Spool(config.spool), config, into=backend)
    (message,) = messages_as_json(capsys, site.config)
    assert (message["id"], message["state"], message["channel"]) == (queue_id, "queued", "local")
    assert (message["submitter"], message["submitter_uid"]) == (user.pw_name, user.pw_uid)
    assert message["sender"] == f"{user.pw_name}@example.org"
    assert message["recipients"] == ["alice@example.org"]
    _, data, _ = checkque(capsys, site.config, "--cat", queue_id)
    assert "\r\nSubject: dropped\r\n" in data and data.endswith("\r\n\r\nbody\r\n")
    assert message["size"] == len(data.encode())
    # Nothing left behind in the node's folders: it is all in the database.
    staging = Spool(config.spool)
    assert [list((staging.directory / name).iterdir()) for name in ("maildrop", "pickup")] == [
        [],
        [],
    ]
    assert staging.ids() == []
    assert maildrop.pickup(Spool(config.spool), config, into=backend) == []


def test_a_pickup_cut_short_after_the_commit_queues_nothing_twice(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    user = other_user()
    config = load(str(site.config))
    drop_as(config, user, b"Subject: once\n\nbody\n")
    backend = open_backend(config)
    real_adopt = PostgresQueue.adopt

    def adopt_then_lose_the_connection(self: PostgresQueue, *args: Any) -> bool:
        real_adopt(self, *args)
        raise QueueError("the connection was lost at the commit")

    monkeypatch.setattr(PostgresQueue, "adopt", adopt_then_lose_the_connection)
    assert maildrop.pickup(Spool(config.spool), config, into=backend) == []
    monkeypatch.setattr(PostgresQueue, "adopt", real_adopt)
    (left,) = (config.spool / "pickup").iterdir()  # the queued form, to hand on again
    (message,) = messages_as_json(capsys, site.config)
    assert message["id"] == left.name
    assert maildrop.pickup(Spool(config.spool), config, into=backend) == [left.name]
    assert [m["id"] for m in messages_as_json(capsys, site.config)] == [left.name]
    assert list((config.spool / "pickup").iterdir()) == []


# -- the queue's gauges ---------------------------------------------------------------


def gauges(config: Path) -> dict[str, float]:
    collector = metrics.Collector(lambda: [], (), metrics.gauges_of(load(str(config))))
    return {
        family.name: family.samples[0].value
        for family in collector.collect()
        if family.name.startswith("mmdf_queue")
    }


def test_the_gauges_count_the_databases_queue(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gauges(site.config) == {"mmdf_queue_messages": 0, "mmdf_queue_oldest_seconds": 0}
    assert checkque(capsys, site.config, "--move-from", str(site.old.directory))[0] == 0
    counted = gauges(site.config)
    # The held and the quarantined are not waiting, as the spool's hold/ is not counted.
    assert counted["mmdf_queue_messages"] == 2
    oldest = int(site.new[:14], 16) / 1e6
    assert 0 < counted["mmdf_queue_oldest_seconds"] <= time.time() - oldest + 1

    # Asked at a scrape, and not more often than DATABASE_EVERY however many scrape.
    monkeypatch.setattr(metrics, "DATABASE_EVERY", 3600.0)
    collector = metrics.Collector(lambda: [], (), metrics.gauges_of(load(str(site.config))))
    first = {f.name: f.samples[0].value for f in collector.collect()}
    queue_into(site.database, envelope())
    again = {f.name: f.samples[0].value for f in collector.collect()}
    assert first["mmdf_queue_messages"] == again["mmdf_queue_messages"] == 2
    assert gauges(site.config)["mmdf_queue_messages"] == 3  # a collector of its own asks


def test_a_database_that_does_not_answer_costs_a_scrape_its_gauges_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepted by the kernel, never answered
    port = silent.getsockname()[1]
    (tmp_path / "site").mkdir()
    config = write_config(
        tmp_path / "site",
        f'\n[queue]\nbackend = "postgresql"\ndsn = "postgresql://mmdf@127.0.0.1:{port}/mmdf"\n',
    )
    started = time.monotonic()
    with silent:
        assert gauges(config) == {}
    assert time.monotonic() - started < metrics.DATABASE_TIMEOUT + 3
    assert "metrics: cannot count the queue: cannot connect" in caplog.text
