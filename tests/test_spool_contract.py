"""The spool keeps the rules every queue backend keeps (tests/queue_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdf_smtp.queue import QueueBackend
from mmdf_smtp.queue.spool import Spool
from queue_contract import (
    Edit,
    QueueContract,
    Record,
    edit_spool_envelope,
    edit_spool_state,
    spool_envelope,
)


class TestSpoolContract(QueueContract):
    # One deliver a spool (deliver.lock), and a lease is the holder's flock.
    one_deliverer = True
    leases_end_with_holder = True

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path / "spool"

    def make_backend(self) -> QueueBackend:
        return Spool(self.directory)

    def stored_envelope(self, queue_id: str) -> Record:
        return spool_envelope(Spool(self.directory), queue_id)

    def edit_envelope(self, queue_id: str, edit: Edit) -> None:
        edit_spool_envelope(Spool(self.directory), queue_id, edit)

    def edit_state(self, queue_id: str, index: int, edit: Edit) -> None:
        edit_spool_state(Spool(self.directory), queue_id, index, edit)
