"""Writers and deliverers on a primary with a synchronous standby, killed
with SIGKILL one kind after the other, and then the primary itself, its
standby promoted: every commit that returned is delivered, once; what was
refused is not delivered at all."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mmdf_smtp.queue.postgres import PostgresQueue
from pgcluster import PgServer, primary_and_standby
from queue_contract import envelope

WORKER = Path(__file__).parent / "pgworker.py"


@pytest.fixture
def pair() -> Iterator[tuple[PgServer, PgServer]]:
    with primary_and_standby() as servers:
        yield servers


class Worker:
    def __init__(self, role: str, dsn: str, folder: Path, number: int) -> None:
        self.log = folder / f"{role}{number}.log"
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), role, dsn, str(self.log), str(folder / "staging")]
        )

    def lines(self, what: str) -> list[str]:
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        # A line a SIGKILL cut short has no end: not a step taken.
        return [
            line.split()[1]
            for line in text.splitlines(keepends=True)
            if line.endswith("\n") and line.startswith(what + " ")
        ]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0


def _until(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_kill_writers_deliverers_and_the_primary(
    pair: tuple[PgServer, PgServer], tmp_path: Path
) -> None:
    primary, standby = pair
    dsn = (
        f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} user=postgres"
        " dbname=postgres target_session_attrs=read-write connect_timeout=2"
    )
    PostgresQueue(dsn, staging=tmp_path / "staging").prepare()  # the schema, before the race
    writers = [Worker("writer", dsn, tmp_path, n) for n in range(2)]
    deliverers = [Worker("deliverer", dsn, tmp_path, n) for n in range(2)]
    workers = writers + deliverers
    try:

        def committed() -> int:
            return sum(len(w.lines("committed")) for w in writers)

        def completed() -> int:
            return sum(len(d.lines("completed")) for d in deliverers)

        _until(lambda: committed() >= 50 and completed() >= 20, "no progress at the start")
        writers[0].kill()
        mark = committed()
        _until(lambda: committed() >= mark + 30, "no progress after a writer died")
        deliverers[0].kill()
        mark, done = committed(), completed()
        _until(
            lambda: committed() >= mark + 30 and completed() >= done + 30,
            "no progress after a deliverer died",
        )
        primary.kill()
        standby.promote()
        mark, done = committed(), completed()
        _until(
            lambda: committed() >= mark + 30 and completed() >= done + 30,
            "no progress after the failover",
        )
        writers[1].stop()
        # The survivor works off the rest, the dead deliverer's leases too.
        queue = PostgresQueue(dsn, staging=tmp_path / "staging")
        _until(lambda: not list(queue.messages()), "the queue was not worked off")
        deliverers[1].stop()
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.kill()

    tried = Counter(i for w in writers for i in w.lines("trying"))
    acknowledged = {i for w in writers for i in w.lines("committed")}
    refused = {i for w in writers for i in w.lines("failed")}
    completions = Counter(i for d in deliverers for i in d.lines("completed"))
    # A deliverer killed between its complete() and its log line.
    attempted = {i for d in deliverers for i in d.lines("completing")}
    assert max(tried.values()) == 1
    assert max(completions.values()) == 1  # each message completed once
    assert acknowledged <= set(completions) | (attempted - set(completions))
    assert acknowledged - set(completions) <= attempted
    assert not refused & (set(completions) | attempted)
    # Besides those acknowledged, only the one a writer was killed while committing.
    assert len(set(completions) - acknowledged) <= 1
    assert set(completions) - acknowledged <= set(tried) - acknowledged - refused
    assert len(acknowledged) >= 140


def test_a_commit_returns_once_the_standby_has_it(
    pair: tuple[PgServer, PgServer], tmp_path: Path
) -> None:
    """With its synchronous standby gone, a commit waits (no 250 for a
    message on one machine), and returns once the standby is back."""
    primary, standby = pair
    queue = PostgresQueue(primary.dsn(), staging=tmp_path / "staging")
    queue.prepare()
    standby.kill()
    writer = queue.open(envelope())
    writer.write(b"on two machines\r\n")
    done = threading.Event()
    committer = threading.Thread(target=lambda: (writer.commit(), done.set()))
    committer.start()
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        _until(
            lambda: conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
            ).fetchone(),
            "the commit did not wait for the standby",
        )
    assert not done.is_set()
    standby.start()
    committer.join(timeout=60)
    assert done.is_set()
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT id FROM mmdf_message").fetchall() == [(writer.id,)]
    queue.close()
