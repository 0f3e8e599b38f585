"""A send to the next hop that outlasts the lease keeps it (deliver renews it).

deliver runs on a PostgreSQL queue with a lease of one second, and the
next hop holds the end of data for three; meanwhile another deliverer
claims again and again.  It must get nothing: the message stays the first
deliver's, and the hop receives it once.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from mmdf_smtp.queue.postgres import PostgresQueue
from peer import Handler, peer
from queue_contract import envelope, queue_one
from test_deliver_wire import deliver_service, wait_for
from wire import write_config

pytest_plugins = ["pgcluster"]

LEASE_SECONDS = 1
STALL = 3 * LEASE_SECONDS


def test_a_send_longer_than_the_lease_is_not_taken_by_another(pg_dsn: str, tmp_path: Path) -> None:
    release = threading.Event()
    handler = Handler(release=release)
    with peer(handler) as (_, port):
        config = write_config(
            tmp_path,
            f'[deliver]\nnext_hop = "smtp:127.0.0.1:{port}"\n'
            f'[queue]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\n'
            f"lease_seconds = {LEASE_SECONDS}\n",
        )
        queue = PostgresQueue(pg_dsn, staging=tmp_path / "staging", lease_seconds=LEASE_SECONDS)
        other = PostgresQueue(pg_dsn, staging=tmp_path / "other", lease_seconds=LEASE_SECONDS)
        try:
            queue_id = queue_one(queue, envelope("bob@relay.example"))
            with deliver_service(config) as deliver:
                assert handler.arrived.wait(30), "the next hop never got the message"
                # The hop holds its reply while the lease would have run out three times over.
                claims = 0
                stall_ends = time.monotonic() + STALL
                while time.monotonic() < stall_ends:
                    taken = other.claim(10, datetime.now(UTC))
                    assert [lease.id for lease in taken] == []
                    claims += 1
                    release.wait(0.05)  # a pace for the claims, not a synchronisation
                release.set()
                wait_for(deliver, f"id={queue_id} removed")
            assert claims > STALL * 10
            assert len(handler.messages) == 1
            assert handler.messages[0].recipients == ["bob@relay.example"]
            assert list(other.messages()) == []
        finally:
            queue.close()
            other.close()
