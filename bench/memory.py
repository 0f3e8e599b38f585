"""Memory of a server's whole process tree, sampled while a case runs.

Two sums over the tree: RSS (each process's resident set; pages shared
between processes are counted once per process) and PSS (shared pages
divided among their sharers, so the sum is the tree's real footprint).
Postfix runs one process per session, mmdf-smtp a few workers sharing
pages after fork: PSS is the fair total, and it is the one reported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from servers import process_tree

INTERVAL = 0.1


@dataclass(frozen=True)
class Footprint:
    rss: int  # bytes
    pss: int
    processes: int

    def max(self, other: Footprint) -> Footprint:
        return Footprint(
            max(self.rss, other.rss), max(self.pss, other.pss), max(self.processes, other.processes)
        )


def _field_kib(path: str, name: bytes) -> int:
    try:
        with open(path, "rb") as file:
            for line in file:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def footprint(root: int) -> Footprint:
    """The tree's memory now."""
    pids = process_tree(root)
    rss = sum(_field_kib(f"/proc/{pid}/status", b"VmRSS:") for pid in pids)
    pss = sum(_field_kib(f"/proc/{pid}/smaps_rollup", b"Pss:") for pid in pids)
    return Footprint(rss, pss, len(pids))


class PeakSampler:
    """Samples a tree's footprint every INTERVAL seconds in a thread; keeps the peak."""

    def __init__(self, root: Callable[[], int]) -> None:
        self._root = root
        self._stop = threading.Event()
        self.peak = footprint(root())
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.peak = self.peak.max(footprint(self._root()))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = self.peak.max(footprint(self._root()))
