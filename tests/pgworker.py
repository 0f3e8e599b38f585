"""A writer or a deliverer on the PostgreSQL queue, in a process of its own,
for the failover test (tests/test_postgres_failover.py) to kill.

    python pgworker.py writer|deliverer DSN LOG STAGING

A writer queues messages one after another and logs ``trying <id>`` before
each commit, then ``committed <id>`` once it returned or ``failed <id>``
once it raised.  A deliverer claims, reads each message whole, logs
``completing <id>``, completes it and logs ``completed <id>``.  Each line
is written and flushed before the next step, so what a SIGKILL leaves in
the log is what the process had done.  SIGTERM ends either between steps.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).parent))

from mmdf_smtp.queue import LeaseLost, QueueError
from mmdf_smtp.queue.postgres import PostgresQueue
from queue_contract import envelope

LEASE_SECONDS = 2.0
stopping = False


def _stop(*_: object) -> None:
    global stopping  # noqa: PLW0603 - the signal handler's one way to say so
    stopping = True


def write(queue: PostgresQueue, log: TextIO) -> None:
    number = 0
    while not stopping:
        writer = queue.open(envelope())
        writer.write(b"Subject: %d from %d\r\n\r\n" % (number, os.getpid()) + b"x" * 1000)
        _log(log, "trying", writer.id)
        try:
            writer.commit()
        except QueueError:
            _log(log, "failed", writer.id)
        else:
            _log(log, "committed", writer.id)
        number += 1


def deliver(queue: PostgresQueue, log: TextIO) -> None:
    wakeups = queue.start_delivering()
    while not stopping:
        try:
            leases = queue.claim(5, datetime.now(UTC))
        except QueueError:
            time.sleep(0.1)
            continue
        if not leases:
            select.select([wakeups], [], [], 0.2)
            wakeups.drain()
            continue
        for lease in leases:
            try:
                with lease.open_message() as message:
                    while message.read(65536):
                        pass
                _log(log, "completing", lease.id)
                lease.complete()
                _log(log, "completed", lease.id)
            except (LeaseLost, QueueError, OSError):
                lease.end()
    wakeups.close()


def _log(log: TextIO, what: str, queue_id: str) -> None:
    log.write(f"{what} {queue_id}\n")
    log.flush()


def main() -> None:
    role, dsn, log_path, staging = sys.argv[1:5]
    signal.signal(signal.SIGTERM, _stop)
    queue = PostgresQueue(
        dsn, staging=Path(staging), lease_seconds=LEASE_SECONDS, settle_seconds=30
    )
    with open(log_path, "a") as log:
        if role == "writer":
            write(queue, log)
        else:
            deliver(queue, log)


if __name__ == "__main__":
    main()
