"""Counters for Prometheus: counted in shared memory, summed when scraped.

smtpd's sessions are served by several worker processes; ``[metrics]
listen`` serves, from the supervisor, the sums over all of them.  Each
process counts in a *segment* of its own: a run of float64 slots in
memory shared with the supervisor (an anonymous ``MAP_SHARED`` mapping
made before the workers are forked), each slot named by its metric and
label values in a key area beside it.  A count is one addition to a
slot found through a dict of the process's own: no lock (one writer a
segment, the event loop's thread), no system call, no file.  The
supervisor reads every segment when scraped and adds them up; a worker
that replaces a dead one takes over its segment, so that the counters
only grow (as Prometheus wants of a counter).

deliver counts in a segment of its own too, in a file of the spool
(:data:`DELIVER_FILE`), which the supervisor adds to what it serves, so
that one scrape shows everything; ``[metrics] deliver_listen`` serves
deliver's alone, for a deliver that runs without a daemon.

prometheus_client (its multiprocess mode) was measured against this:
an increment of a labelled counter there takes a lock, a ``getpid()``
and an mmap write in a file per process, about 20 times the cost of an
addition here (see the README, "Metrics").  The library still renders
the text format and serves it; the tests parse it with its parser.

Without ``[metrics]`` nothing is counted: :data:`RECORDER` stays None and
every hook is a call that returns at once.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .queue import QueueError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .config import Config

log = logging.getLogger("mmdf_smtp.metrics")

COUNTER, HISTOGRAM = "counter", "histogram"
FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FILTER = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From arrival to the outcome: seconds for a Maildir, days for a retried next hop.
DELIVERY = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 432000.0)


@dataclass(frozen=True, slots=True)
class Family:
    """A metric: its name (a counter's without ``_total``), help, labels and buckets."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds; +Inf is implied


SMTPD_FAMILIES = (
    Family(
        "mmdf_sessions",
        COUNTER,
        "SMTP sessions ended, by source channel and how they ended",
        ("channel", "outcome"),
    ),
    Family("mmdf_tls_sessions", COUNTER, "SMTP sessions ended that used TLS", ("channel",)),
    Family("mmdf_replies", COUNTER, "SMTP replies sent, by class (2xx, 4xx, 5xx)", ("class",)),
    Family("mmdf_messages_accepted", COUNTER, "Messages queued (250)", ("channel",)),
    Family("mmdf_accepted_bytes", COUNTER, "Octets of the messages queued", ("channel",)),
    Family(
        "mmdf_messages_refused",
        COUNTER,
        "Messages whose data was refused or not queued, by reason",
        ("reason",),
    ),
    Family("mmdf_refused_bytes", COUNTER, "Octets of the messages refused", ("reason",)),
    Family(
        "mmdf_refusals",
        COUNTER,
        "Refusals logged (clients, senders, recipients, messages), by reason",
        ("reason",),
    ),
    Family(
        "mmdf_commit_seconds", HISTOGRAM, "From the end of data to the message on disk", (), FAST
    ),
    Family(
        "mmdf_milter_seconds",
        HISTOGRAM,
        "A milter's answer to one command, by milter and command",
        ("milter", "stage"),
        FILTER,
    ),
    Family(
        "mmdf_check_seconds",
        HISTOGRAM,
        "The built-in checks at SMTP time (DNS look-ups mostly), by check",
        ("check",),
        FILTER,
    ),
)
DELIVER_FAMILIES = (
    Family(
        "mmdf_deliveries",
        COUNTER,
        "Delivery attempts of one recipient, by outcome and kind (local, nexthop, bounce)",
        ("status", "kind"),
    ),
    Family(
        "mmdf_delivery_seconds",
        HISTOGRAM,
        "From arrival to delivery, by kind",
        ("kind",),
        DELIVERY,
    ),
    Family("mmdf_notices", COUNTER, "Delivery status notifications queued to senders"),
)
FAMILIES = {family.name: family for family in SMTPD_FAMILIES + DELIVER_FAMILIES}

# A segment: a header, the slots' values, then their keys.
_MAGIC = 0x4D4D4401  # "MMD", version 1: a segment of another layout is started afresh
_HEADER = struct.Struct("=II")  # magic, slots in use
_VALUES = 64
SLOTS = 2048
KEY_SIZE = 120  # octets a slot's key may take: a length, then UTF-8
_KEYS = _VALUES + 8 * SLOTS
SEGMENT = -(-(_KEYS + KEY_SIZE * SLOTS) // mmap.PAGESIZE) * mmap.PAGESIZE
_SEPARATOR = "\x1f"
DELIVER_FILE = "deliver.metrics"

Key = tuple[str, tuple[str, ...]]


def _slots_of(family: Family) -> int:
    """A histogram takes a slot a bucket (+Inf too) and one for the sum."""
    return len(family.buckets) + 2 if family.kind == HISTOGRAM else 1


class Recorder:
    """One process's counts, in its segment of shared memory.

    Only one thread of one process may write a segment (the loop's, in
    smtpd's workers; deliver has one thread).
    """

    def __init__(self, segment: memoryview) -> None:
        self._header = segment[: _HEADER.size]
        self.values = segment[_VALUES:_KEYS].cast("d")
        self._keys = segment[_KEYS : _KEYS + KEY_SIZE * SLOTS]
        self._slots: dict[Key, int] = {}
        self._full = False
        magic, used = _HEADER.unpack(self._header)
        self._used: int = used
        if magic != _MAGIC:
            segment[:] = bytes(len(segment))
            _HEADER.pack_into(self._header, 0, _MAGIC, 0)
            self._used = 0
        for slot, key in _read_keys(self._keys, self._used):
            self._slots[key] = slot

    def add(self, family: str, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        slot = self._slots.get((family, labels))
        if slot is None:
            slot = self._allocate(family, labels)
            if slot < 0:
                return
        self.values[slot] += amount

    def observe(self, family: str, labels: tuple[str, ...], value: float) -> None:
        slot = self._slots.get((family, labels))
        if slot is None:
            slot = self._allocate(family, labels)
            if slot < 0:
                return
        buckets = FAMILIES[family].buckets
        # Prometheus's bucket le="b" holds the values <= b: bisect_left finds it.
        self.values[slot + bisect.bisect_left(buckets, value)] += 1
        self.values[slot + len(buckets) + 1] += value

    def _allocate(self, family: str, labels: tuple[str, ...]) -> int:
        needed = _slots_of(FAMILIES[family])
        if self._used + needed > SLOTS:
            if not self._full:
                log.error(
                    "metrics: no room for more label values; %s%s not counted", family, labels
                )
                self._full = True
            return -1
        slot = self._used
        key = _SEPARATOR.join((family, *labels)).encode(errors="replace")[: KEY_SIZE - 1]
        offset = slot * KEY_SIZE
        self._keys[offset : offset + 1 + len(key)] = bytes((len(key),)) + key
        # The key is in place before the count of slots in use says so: a
        # scrape meanwhile sees the slot whole, or not at all.
        self._used += needed
        _HEADER.pack_into(self._header, 0, _MAGIC, self._used)
        self._slots[(family, labels)] = slot
        return slot


def _read_keys(keys: memoryview | bytes, used: int) -> Iterator[tuple[int, Key]]:
    slot = 0
    while slot < used:
        offset = slot * KEY_SIZE
        length = keys[offset]
        name, *labels = (
            bytes(keys[offset + 1 : offset + 1 + length]).decode(errors="replace").split(_SEPARATOR)
        )
        family = FAMILIES.get(name)
        if family is None:  # another version's: the segment's layout ends here
            return
        yield slot, (name, tuple(labels))
        slot += _slots_of(family)


def read_segment(segment: memoryview | bytes) -> Iterator[tuple[Key, list[float]]]:
    """A segment's keys with their slots' values."""
    magic, used = _HEADER.unpack_from(segment)
    if magic != _MAGIC:
        return
    view = memoryview(segment)
    values = view[_VALUES:_KEYS].cast("d")
    for slot, key in _read_keys(view[_KEYS : _KEYS + KEY_SIZE * SLOTS], min(used, SLOTS)):
        yield key, list(values[slot : slot + _slots_of(FAMILIES[key[0]])])


def summed(segments: Iterable[memoryview | bytes]) -> dict[Key, list[float]]:
    totals: dict[Key, list[float]] = {}
    for segment in segments:
        for key, values in read_segment(segment):
            total = totals.get(key)
            if total is None:
                totals[key] = values
            else:
                totals[key] = [a + b for a, b in zip(total, values, strict=True)]
    return totals


# -- the hooks: each returns at once when nothing is counted ------------------

RECORDER: Recorder | None = None


def count(family: str, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
    if RECORDER is not None:
        RECORDER.add(family, labels, amount)


def observe(family: str, labels: tuple[str, ...], value: float) -> None:
    if RECORDER is not None:
        RECORDER.observe(family, labels, value)


def session_ended(channel: str, outcome: str, tls: bool, replies: list[int]) -> None:
    """A session is over; ``replies``: how many of each class (index 2 for 2xx...)."""
    recorder = RECORDER
    if recorder is None:
        return
    recorder.add("mmdf_sessions", (channel, outcome))
    if tls:
        recorder.add("mmdf_tls_sessions", (channel,))
    for klass in (2, 4, 5):
        if replies[klass]:
            recorder.add("mmdf_replies", (f"{klass}xx",), replies[klass])


def message_accepted(channel: str, size: int) -> None:
    recorder = RECORDER
    if recorder is not None:
        recorder.add("mmdf_messages_accepted", (channel,))
        recorder.add("mmdf_accepted_bytes", (channel,), size)


def message_refused(reason: str, size: int) -> None:
    recorder = RECORDER
    if recorder is not None:
        recorder.add("mmdf_messages_refused", (reason,))
        recorder.add("mmdf_refused_bytes", (reason,), size)


def since(family: str, labels: tuple[str, ...], started: float) -> None:
    """Observe the seconds since ``started`` (``time.monotonic()``)."""
    if RECORDER is not None:
        RECORDER.observe(family, labels, time.monotonic() - started)


# -- where the counts are kept ---------------------------------------------------


class SharedSegments:
    """Segments in memory shared with the processes forked after it was made."""

    def __init__(self, count: int) -> None:
        self._memory = mmap.mmap(-1, SEGMENT * count, flags=mmap.MAP_SHARED)
        self._view = memoryview(self._memory)
        self.count = count

    def segment(self, index: int) -> memoryview:
        return self._view[index * SEGMENT : (index + 1) * SEGMENT]

    def segments(self) -> list[memoryview]:
        return [self.segment(index) for index in range(self.count)]


def record_in(segment: memoryview) -> None:
    """From now on this process counts in ``segment``."""
    global RECORDER  # noqa: PLW0603 - the hooks' one switch
    RECORDER = Recorder(segment)


def stop_recording() -> None:
    global RECORDER  # noqa: PLW0603
    RECORDER = None


def deliver_segment(spool: Path) -> memoryview:
    """deliver's segment: a file of the spool, shared with smtpd's supervisor.

    Its counts go on from what a deliver before this one counted.
    """
    fd = os.open(spool / DELIVER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != SEGMENT:
            os.ftruncate(fd, 0)  # another layout's, or new: zeros
            os.ftruncate(fd, SEGMENT)
        memory = mmap.mmap(fd, SEGMENT, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return memoryview(memory)


def read_deliver_segment(spool: Path) -> bytes | None:
    try:
        data = (spool / DELIVER_FILE).read_bytes()
    except OSError:
        return None
    return data if len(data) == SEGMENT else None


# -- the queue, seen at scrape time -----------------------------------------------

# The queue file names are Spool.new_id's: the arrival time in microseconds
# in 14 hex digits, then the pid and a counter.
_QUEUE_ID = re.compile(r"[0-9a-f]{26}")


# What the queue's gauges are read from at a scrape: messages waiting and
# the oldest one's age in seconds at ``now`` (a Unix time); None when the
# queue cannot be asked (the gauges are left out of that scrape).
QueueGauges = Callable[[float], "tuple[int, float] | None"]
# A database is asked at most this often, however many scrapers there are.
DATABASE_EVERY = 5.0  # seconds
DATABASE_TIMEOUT = 2.0  # seconds a count may take before the scrape goes on without it


def _age_of(oldest: str | None, now: float) -> float:
    return max(0.0, now - int(oldest[:14], 16) / 1e6) if oldest else 0.0


def queue_gauges(queue: Path, now: float) -> tuple[int, float]:
    """Messages in ``queue`` and the oldest one's age in seconds, from the names alone."""
    messages = 0
    oldest: str | None = None
    with contextlib.suppress(FileNotFoundError), os.scandir(queue) as entries:
        for entry in entries:
            name = entry.name
            if _QUEUE_ID.fullmatch(name):
                messages += 1
                if oldest is None or name < oldest:
                    oldest = name
    return messages, _age_of(oldest, now)


def gauges_of(config: Config) -> QueueGauges:
    """How the configured queue is counted: the spool's ``queue/`` by its
    names; a database by a count query (:meth:`.PostgresQueue.count_waiting`)
    bounded by :data:`DATABASE_TIMEOUT`, run at a scrape and not more often
    than every :data:`DATABASE_EVERY` seconds, on a connection of its own."""
    if config.queue.backend != "postgresql":
        queue = config.spool / "queue"
        return lambda now: queue_gauges(queue, now)
    from .queue.postgres import PostgresQueue

    assert config.queue.dsn is not None
    database = PostgresQueue(
        config.queue.dsn,
        staging=config.spool,
        connect_timeout=DATABASE_TIMEOUT,
        statement_timeout=DATABASE_TIMEOUT,
        connections=1,
    )
    lock = threading.Lock()
    last: list[tuple[float, int, str | None]] = []  # (monotonic time, messages, oldest id)

    def gauges(now: float) -> tuple[int, float] | None:
        with lock:  # two scrapes at once: one query
            if not last or time.monotonic() - last[0][0] >= DATABASE_EVERY:
                try:
                    messages, oldest = database.count_waiting()
                except QueueError as exc:
                    log.warning("metrics: cannot count the queue: %s", exc)
                    return None
                last[:] = [(time.monotonic(), messages, oldest)]
            _, messages, oldest = last[0]
        return messages, _age_of(oldest, now)

    return gauges


# -- serving ----------------------------------------------------------------------


class Collector:
    """The families, summed over the segments, for prometheus_client's exposition."""

    def __init__(
        self,
        segments: Callable[[], Iterable[memoryview | bytes]],
        families: Iterable[Family],
        queue: Path | QueueGauges | None,
    ) -> None:
        self._segments = segments
        self._families = tuple(families)
        if isinstance(queue, Path):
            in_folder = queue
            self._queue: QueueGauges | None = lambda now: queue_gauges(in_folder, now)
        else:
            self._queue = queue

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        totals = summed(self._segments())
        by_family: dict[str, list[tuple[tuple[str, ...], list[float]]]] = {}
        for (name, labels), values in totals.items():
            by_family.setdefault(name, []).append((labels, values))
        for family in self._families:
            samples = sorted(by_family.get(family.name, []))
            yield _metric(family, samples)
        counted = self._queue(time.time()) if self._queue is not None else None
        if counted is not None:
            messages, age = counted
            yield GaugeMetricFamily("mmdf_queue_messages", "Messages in the queue", messages)
            yield GaugeMetricFamily(
                "mmdf_queue_oldest_seconds",
                "Age of the oldest message in the queue (0 when it is empty)",
                age,
            )


def _metric(family: Family, samples: list[tuple[tuple[str, ...], list[float]]]) -> Metric:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    labels = list(family.labels)
    if family.kind == COUNTER:
        counter = CounterMetricFamily(family.name, family.help, labels=labels)
        for values, (total,) in samples:
            counter.add_metric(list(values), total)
        return counter
    histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
    bounds = [repr(b) for b in family.buckets] + ["+Inf"]  # floats: "0.5", "1.0"
    for values, slots in samples:
        cumulative, running = [], 0.0
        for bound, in_bucket in zip(bounds, slots[:-1], strict=True):
            running += in_bucket
            cumulative.append((bound, running))
        histogram.add_metric(list(values), cumulative, slots[-1])
    return histogram


def load_exposition() -> None:
    """Import what serving takes, before privileges are dropped.

    Imported only when metrics are served: it takes a fifth of a second,
    which a program started per connection (smtpsrvr under inetd) does not
    pay; and once a program runs as the mail system's user it may no
    longer be able to read Python's library to import it.
    """
    import prometheus_client.core
    import prometheus_client.exposition
    import prometheus_client.openmetrics.exposition  # noqa: F401


class Server:
    """``/metrics`` over HTTP, in a thread of the process that made it."""

    def __init__(self, address: str, collector: Collector) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from .config import split_listen

        host, port = split_listen(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        self._server, self._thread = start_http_server(port, host, registry)
        bound: Any = self._server.server_address
        self.host, self.port = str(bound[0]), int(bound[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_smtpd(
    address: str, shared: SharedSegments, spool: Path, *, queue: QueueGauges | None = None
) -> Server:
    """The supervisor's ``/metrics``: every worker's counts, deliver's, and
    the queue (``queue``: how it is counted, by default the spool's queue/;
    see :func:`gauges_of`)."""

    def segments() -> list[memoryview | bytes]:
        found: list[memoryview | bytes] = list(shared.segments())
        delivered = read_deliver_segment(spool)
        if delivered is not None:
            found.append(delivered)
        return found

    collector = Collector(segments, FAMILIES.values(), queue or spool / "queue")
    return _started(address, collector)


def serve_deliver(
    address: str, segment: memoryview, spool: Path, *, queue: QueueGauges | None = None
) -> Server:
    counted = queue or spool / "queue"
    return _started(address, Collector(lambda: [segment], DELIVER_FAMILIES, counted))


def _started(address: str, collector: Collector) -> Server:
    # The thread serving it must not take the signals meant for the process.
    with _signals_blocked():
        server = Server(address, collector)
    log.info("metrics at %s", server.url)
    return server


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
