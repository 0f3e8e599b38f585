"""The PostgreSQL queue on a real server the tests start (tests/pgcluster.py):
the rules every backend keeps, then what is its own (big messages, group
commit, a commit whose taker died, the LISTEN connection's loss)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mmdf_smtp.queue import Lease
from mmdf_smtp.queue.postgres import PostgresQueue
from queue_contract import NOW, QueueContract, queue_one

pytest_plugins = ["pgcluster"]

QUICK_LEASE = 0.2  # seconds: how long the tests' lease-ending claimers let a lease live


class PostgresCase:
    @pytest.fixture(autouse=True)
    def _database(self, pg_dsn: str, tmp_path: Path) -> Iterator[None]:
        self.dsn = pg_dsn
        self.staging = tmp_path / "staging"
        self.made: list[PostgresQueue] = []
        yield
        for backend in self.made:
            backend.close()

    def make_backend(self, **options: Any) -> PostgresQueue:
        backend = PostgresQueue(self.dsn, staging=self.staging, **options)
        self.made.append(backend)
        return backend

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(statement, params or None)
            return cursor.fetchall() if cursor.description else []


def _claim_once_the_lease_runs_out(claimer: PostgresQueue) -> Lease:
    """Leases end by time: claim until the dead or slow holder's has run out."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leases = claimer.claim(10, NOW)
        if leases:
            (lease,) = leases
            return lease
        time.sleep(QUICK_LEASE / 4)
    raise AssertionError("the lease never ran out")


class TestPostgresContract(PostgresCase, QueueContract):
    leases_end_with_holder = False

    def claim_after_holder_died(self, backend: Any) -> Lease:
        return _claim_once_the_lease_runs_out(self.make_backend(lease_seconds=QUICK_LEASE))

    def lose_lease(self, backend: Any) -> tuple[Lease, Lease]:
        queue_one(backend)
        (first,) = backend.claim(10, NOW)
        second = _claim_once_the_lease_runs_out(self.make_backend(lease_seconds=QUICK_LEASE))
        return first, second
