"""The queue backends' raw commit rate: messages of 1 KiB through commit_all.

    python bench/queue_commit.py [--dsn DSN] [--threads 10] [--messages 300] [--group 1]

Each of ``--threads`` threads commits ``--messages`` messages, ``--group``
at a time, into the file spool and into PostgreSQL, both with their
durability on (fsync; ``synchronous_commit = on``), and the rate of each
is printed.  Without ``--dsn`` a PostgreSQL of Debian's packages is
started on loopback for the run, in a temporary folder (the tests'
tests/pgcluster.py), on the same filesystem as the spool.  No network:
what is measured is the commit, not SMTP.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mmdf_smtp.queue import Envelope, Queue
from mmdf_smtp.queue.spool import IN_MEMORY, Spool

ENVELOPE = Envelope(
    sender="alice@example.org",
    recipients=("bob@example.net",),
    channel="smtp",
    remote_host="client.example.org",
    remote_addr="127.0.0.2",
    helo="client.example.org",
    received=datetime(2026, 12, 6, 12, 0, tzinfo=UTC),
)
BODY = b"Subject: bench\r\n\r\n" + b"x" * (1024 - 18)


def commit_rate(queue: Queue, *, threads: int, messages: int, group: int) -> float:
    """Messages a second, all threads together."""
    failures: list[object] = []
    start = threading.Barrier(threads + 1)

    def commit() -> None:
        start.wait()
        try:
            for _ in range(messages // group):
                writers = [queue.open(ENVELOPE) for _ in range(group)]
                for writer in writers:
                    writer.write(BODY)
                failures.extend(e for e in queue.commit_all(writers) if e is not None)
        except Exception as exc:  # a rate of commits not made is no rate: said below
            failures.append(exc)

    workers = [threading.Thread(target=commit) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} commits failed: {failures[0]}")
    return threads * (messages // group) * group / elapsed


@contextlib.contextmanager
def postgresql(dsn: str | None) -> Iterator[str]:
    if dsn is not None:
        yield dsn
        return
    path = Path(__file__).resolve().parent.parent / "tests" / "pgcluster.py"
    spec = importlib.util.spec_from_file_location("pgcluster", path)
    assert spec is not None and spec.loader is not None
    pgcluster: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pgcluster)
    with pgcluster.single_server() as server:
        yield server.dsn(pgcluster.new_database(server))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL to use (default: one started for the run)")
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--messages", type=int, default=300, help="a thread")
    parser.add_argument("--group", type=int, default=1, help="messages a commit_all")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mmdf_smtp.queue.postgres import PostgresQueue

    with tempfile.TemporaryDirectory(prefix="mmdf-bench-") as folder, postgresql(args.dsn) as dsn:
        backends: dict[str, Callable[[int], Queue]] = {
            "spool": lambda n: Spool(Path(folder) / f"spool{n}", in_memory=IN_MEMORY),
            "postgresql": lambda n: PostgresQueue(dsn, staging=Path(folder) / f"staging{n}"),
        }
        rates: dict[str, list[float]] = {name: [] for name in backends}
        for number in range(args.rounds):
            for name, make in backends.items():
                queue = make(number)
                queue.prepare()
                rates[name].append(
                    commit_rate(
                        queue, threads=args.threads, messages=args.messages, group=args.group
                    )
                )
        print(
            f"1 KiB messages, {args.threads} threads, {args.group} a commit_all,"
            f" median of {args.rounds} rounds:"
        )
        for name, values in rates.items():
            values.sort()
            print(f"  {name:<11} {values[len(values) // 2]:8.0f} msg/s   (all: {values})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
