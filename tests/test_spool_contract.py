"""The spool keeps the rules every queue backend keeps (tests/queue_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdf_smtp.queue import QueueBackend
from mmdf_smtp.queue.spool import Spool
from queue_contract import QueueContract


class TestSpoolContract(QueueContract):
    # One deliver a spool (deliver.lock), and a lease is the holder's flock.
    one_deliverer = True
    leases_end_with_holder = True

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path / "spool"

    def make_backend(self) -> QueueBackend:
        return Spool(self.directory)
