"""Commits off the event loop: a commit process of each worker's own.

A commit is a short run of system calls that mostly wait on the disk
(create, write, rename, fsync, the directory's fsync).  Made by threads
of the worker, each of those calls handed the interpreter to the thread
and back, and the loop, busy with the other sessions, kept it a while
every time: a small message's commit took 2-3 ms where the disk needed
0.5, and the hand-overs cost the worker more CPU than the sessions.  So
a worker forks a process to commit for it (:class:`CommitProcess`).  The
loop hands it each message in one datagram over a socket pair
(:meth:`~mmdf_smtp.queue.Queue.hand_over`: a small one whole, a big one
by the name of the file it is already written to) and reads the
outcomes as it reads its clients: no thread, no lock, no wake-up but the
socket's.

In the commit process, the one thread commits every small message that
came in while it was busy in one go, so that they share a directory sync
(:meth:`~mmdf_smtp.queue.Queue.commit_all`), with no hand-over to another
thread.  A message of :data:`BIG` octets or more goes to
:class:`CommitThreads` instead: its fsync may take a while, and it must
not hold up the small ones' 250.

The commit process lives as long as its socket: when the worker exits
(or dies), it finishes the commits it has and exits too.  If it dies,
the messages it had not answered for are answered once it has exited,
as the queue finds them: 250 for one it had committed, a temporary
error for the others, whose leftovers are removed so that the client's
next try is the only copy (:meth:`CommitProcess._broken`).  The next
commit starts another process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

from .. import metrics
from ..delivery.atcommit import CommitDelivery, Report, Result
from ..queue import MessageWriter, Queue, QueueError

log = logging.getLogger("mmdf_smtp.smtpd")
delivery_log = logging.getLogger("mmdf_smtp.deliver")

CommitDone = Callable[[Exception | None], None]

# A datagram is a run of records: a job's number and a length, then as
# many octets of the message (worker to commit process) or of its outcome
# (back).  All the messages that ended in one turn of the loop go in one
# datagram, and a batch's outcomes in one: a wake-up of the other side
# costs more than the octets.  A message held in memory is at most the
# queue's in-memory size (64 KiB for the spool); the socket buffers have
# room for a few datagrams of the largest.
_RECORD = struct.Struct("!QIc")  # number, length, kind
_SMALL = b"s"
_BIG = b"b"  # a message of BIG octets or more
_OUTCOME_KIND = b"-"
# A message this big may keep its fsync a while: it is committed in a
# thread of its own, so that the small ones' 250 never wait for it.  The
# small ones are committed by the commit process's one thread, with no
# hand-over at all.
BIG = 1024 * 1024
DATAGRAM = 256 * 1024
# A worker that never pauses must not keep its messages waiting for a gap.
_MOST_IN_A_BATCH = 256
_SOCKET_BUFFER = 4 * DATAGRAM
_OUTCOME = 4096  # an outcome's most octets
_COMMITTED = b"0"  # then, for local copies written at commit time, their Report
_FAILED = b"1"  # then the QueueError's text: a temporary failure
_FULL = b"2"  # then the text: storage ran out
_BROKEN = b"3"  # then the text: an unexpected error, not the message's fault
# How long the sessions of a commit process that stopped answering wait
# for it to exit before they are told their messages were not queued: it
# may still be finishing a big message's fsync.
EXIT_WAIT = 30.0
_REAP_EVERY = 0.1


class CommitThreads:
    """A few threads that commit, together, the messages that came while they were busy.

    ``finished`` gets each batch with its outcomes (None, the QueueError
    that kept a message out, or an unexpected error), in the thread that
    committed it.
    """

    THREADS = 2

    def __init__(
        self,
        queue: Queue,
        finished: Callable[[list[tuple[MessageWriter, int]], list[Result]], None],
        delivery: CommitDelivery | None = None,
    ) -> None:
        self._queue = queue
        self._delivery = delivery
        self._finished = finished
        self._jobs: list[tuple[MessageWriter, int]] = []
        self._ready = threading.Condition()
        self._threads = 0
        self._idle = 0
        self._busy = 0

    def submit(self, jobs: list[tuple[MessageWriter, int]]) -> None:
        if not jobs:
            return
        with self._ready:
            self._jobs += jobs
            if self._idle:
                self._ready.notify()
            elif self._threads < self.THREADS:
                self._threads += 1
                threading.Thread(target=self._run, name="commit", daemon=True).start()

    def wait_until_done(self) -> None:
        with self._ready:
            self._ready.wait_for(lambda: not self._jobs and not self._busy)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._idle += 1
                    self._ready.wait()
                    self._idle -= 1
                batch, self._jobs = self._jobs, []
                self._busy += 1
            results = _commit(self._queue, [writer for writer, _ in batch], self._delivery)
            try:
                self._finished(batch, results)
            finally:
                with self._ready:
                    self._busy -= 1
                    self._ready.notify_all()


def _commit(
    queue: Queue, writers: list[MessageWriter], delivery: CommitDelivery | None
) -> list[Result]:
    """Each message committed to ``queue``, or, by ``delivery``, its local copies written."""
    try:
        if delivery is not None:
            return delivery.commit_all(writers)
        return list(queue.commit_all(writers))
    except Exception as exc:
        return [exc] * len(writers)


def _outcome(result: Result) -> bytes:
    if result is None:
        return _COMMITTED
    if isinstance(result, Report):
        # Bounded by atcommit.MOST_COPIES: well within a datagram.
        return _COMMITTED + result.to_bytes()
    if isinstance(result, QueueError):
        kind, text = _FULL if result.full else _FAILED, str(result)
    else:
        kind, text = _BROKEN, f"{type(result).__name__}: {result}"
    return kind + text.encode(errors="replace")[: _OUTCOME - 1]


def _result(outcome: bytes) -> Exception | None:
    kind, text = outcome[:1], outcome[1:].decode(errors="replace")
    if kind == _COMMITTED:
        return None
    if kind in (_FAILED, _FULL):
        return QueueError(text, full=kind == _FULL)
    return RuntimeError(f"in the commit process: {text}")


def _datagrams(records: list[tuple[int, bytes, bytes]]) -> Iterator[bytes]:
    """Records (number, kind, octets) packed into datagrams of at most :data:`DATAGRAM` octets."""
    pieces: list[bytes] = []
    size = 0
    for number, kind, octets in records:
        if pieces and size + _RECORD.size + len(octets) > DATAGRAM:
            yield b"".join(pieces)
            pieces, size = [], 0
        pieces += (_RECORD.pack(number, len(octets), kind), octets)
        size += _RECORD.size + len(octets)
    if pieces:
        yield b"".join(pieces)


def _records(datagram: memoryview) -> Iterator[tuple[int, bytes, bytes]]:
    offset = 0
    while offset + _RECORD.size <= len(datagram):
        number, size, kind = _RECORD.unpack_from(datagram, offset)
        offset += _RECORD.size
        yield number, kind, bytes(datagram[offset : offset + size])
        offset += size


def serve(sock: socket.socket, queue: Queue, delivery: CommitDelivery | None = None) -> None:
    """The commit process: commit what comes on ``sock`` until it closes;
    with ``delivery``, local mail is delivered instead (:mod:`..delivery.atcommit`)."""
    # The worker's segment of the metrics has one writer, the worker: what
    # is done here is counted there, from the outcomes.
    metrics.stop_recording()
    # The worker's signals are the worker's: a SIGTERM to the process group
    # must not cut a commit short.  The end comes with the socket's.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    sock.setblocking(True)

    def answer(outcomes: list[tuple[int, bytes, bytes]]) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: nobody to tell
            for datagram in _datagrams(outcomes):
                sock.send(datagram)

    def finished(batch: list[tuple[MessageWriter, int]], results: list[Result]) -> None:
        pairs = zip(batch, results, strict=True)
        answer([(number, _OUTCOME_KIND, _outcome(result)) for (_, number), result in pairs])

    big = CommitThreads(queue, finished, delivery)
    buffer = bytearray(DATAGRAM)
    with memoryview(buffer) as view:
        flags = 0  # the first datagram of a batch is waited for; the rest are what came meanwhile
        ended = False
        small: list[tuple[MessageWriter, int]] = []
        while not ended:
            try:
                size = sock.recv_into(buffer, 0, flags)
            except BlockingIOError:
                size = -1
            except ConnectionResetError:
                size = 0
            ended = size == 0
            if size > 0:
                flags = socket.MSG_DONTWAIT
                large: list[tuple[MessageWriter, int]] = []
                refused: list[tuple[int, bytes, bytes]] = []
                for number, kind, message in _records(view[:size]):
                    try:
                        writer = queue.take_over(message)
                    except Exception as exc:
                        refused.append((number, _OUTCOME_KIND, _outcome(exc)))
                        continue
                    (large if kind == _BIG else small).append((writer, number))
                if refused:
                    answer(refused)
                big.submit(large)
                if len(small) < _MOST_IN_A_BATCH:
                    continue
            # Nothing more came (or a batch is full): commit the small ones together, here.
            if small:
                batch, small = small, []
                finished(batch, _commit(queue, [writer for writer, _ in batch], delivery))
            flags = 0
    big.wait_until_done()


def _leave_the_worker(*, keep: int) -> None:
    """In a new commit process: let go of the worker's descriptors.

    Its clients' connections above all: a copy held here would keep one
    open after the worker closed it.  What the worker's objects held is
    closed under them, so none of them may close "its" descriptor later,
    when the number may be a queue file's: the collector is kept off
    everything made before the fork.
    """
    gc.freeze()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


class CommitProcess:
    """The worker's side of a commit process for one queue."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: Queue,
        delivery: CommitDelivery | None = None,
    ) -> None:
        self.queue = queue
        self._loop = loop
        self._pending: dict[int, tuple[CommitDone, MessageWriter]] = {}
        self._unsent: list[tuple[int, bytes, bytes]] = []  # for the end of this turn of the loop
        self._outbox: collections.deque[bytes] = collections.deque()  # for when the socket drains
        self._input = bytearray(DATAGRAM)
        self._numbers = itertools.count()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            status = 0
            try:
                _leave_the_worker(keep=theirs.fileno())
                serve(theirs, queue, delivery)
            except BaseException:
                status = 70
                with contextlib.suppress(OSError):
                    os.write(2, traceback.format_exc().encode(errors="replace"))
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(status)
        theirs.close()
        self.pid = pid
        self._sock = ours
        ours.setblocking(False)
        loop.add_reader(ours.fileno(), self._read)
        self._closed = False

    @property
    def idle(self) -> bool:
        return not self._pending

    @property
    def alive(self) -> bool:
        return not self._closed

    def submit(self, writer: MessageWriter, size: int, done: CommitDone) -> None:
        try:
            message = self.queue.hand_over(writer)
        except QueueError as exc:
            writer.abort()
            self._loop.call_soon(done, exc)
            return
        if _RECORD.size + len(message) > DATAGRAM:
            # Not from the spool, whose messages held in memory are smaller.
            self._loop.call_soon(done, RuntimeError("a message handed over is too big"))
            return
        number = next(self._numbers)
        self._pending[number] = (done, writer)
        if not self._unsent:
            self._loop.call_soon(self._send_unsent)
        self._unsent.append((number, _BIG if size >= BIG else _SMALL, message))

    def _send_unsent(self) -> None:
        records, self._unsent = self._unsent, []
        for datagram in _datagrams(records):
            if self._closed:
                return
            if self._outbox:
                self._outbox.append(datagram)
            else:
                self._send(datagram)

    def _send(self, datagram: bytes) -> None:
        try:
            self._sock.send(datagram)
        except BlockingIOError:
            self._outbox.append(datagram)
            self._loop.add_writer(self._sock.fileno(), self._send_queued)
        except OSError as exc:
            self._broken(exc)

    def _send_queued(self) -> None:
        while self._outbox:
            try:
                self._sock.send(self._outbox[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self._broken(exc)
                return
            self._outbox.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def _read(self) -> None:
        # One datagram a call: the loop calls again while more are waiting,
        # and a read until EAGAIN would cost a system call and an exception
        # for each batch's outcomes, most often the only datagram there.
        if self._closed:
            return
        try:
            size = self._sock.recv_into(self._input)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(exc)
            return
        if not size:
            self._broken(None)
            return
        with memoryview(self._input) as view:
            for number, _, outcome in _records(view[:size]):
                if len(outcome) > 1 and outcome[:1] == _COMMITTED:
                    _delivered(Report.from_bytes(outcome[1:]))
                job = self._pending.pop(number, None)
                if job is not None:
                    job[0](_result(outcome))

    def _broken(self, exc: OSError | None) -> None:
        """The commit process is gone, or its socket broke: once it has
        exited, the messages it did not answer for are answered as the queue
        finds them (:meth:`~mmdf_smtp.queue.Queue.take_back`).

        A message it committed gets its 250 after all, and one it did not
        is removed and gets a temporary error, so that the client's next
        try is not delivered twice, nor a copy left unseen in ``queue/``.
        """
        pending, self._pending = self._pending, {}
        self._unsent.clear()
        if not self._shut():
            return  # heard of already: nothing is pending any more
        reason = str(exc) if exc else "end of file"
        # Never from within the submit that may have found it gone: the
        # first look is from the loop.
        self._loop.call_soon(self._reap, lambda exited: self._answer(pending, reason, exited), 0.0)

    def _answer(
        self,
        pending: dict[int, tuple[CommitDone, MessageWriter]],
        reason: str,
        exited: bool,
    ) -> None:
        error = QueueError("the commit process stopped")
        committed = 0
        for done, writer in pending.values():
            result: Exception | None = error
            if exited:
                try:
                    if self.queue.take_back(writer):
                        result = None
                        committed += 1
                except Exception:
                    log.exception("cannot tell whether message %s was committed", writer.id)
            self._loop.call_soon(done, result)  # each on its own, as an outcome read is
        if pending:
            log.error(
                "the commit process (pid %d) stopped (%s) with %d messages: %s",
                self.pid,
                reason,
                len(pending),
                f"{committed} committed, the rest not"
                if exited
                else f"it had not exited after {EXIT_WAIT:g} s, so none is taken back",
            )

    def close(self) -> None:
        """Stop it: it finishes the commits it has, then exits."""
        if self._shut():
            self._reap(None, 0.0)

    def _shut(self) -> bool:
        """Close our end of the socket, once; False if it was closed already."""
        if self._closed:
            return False
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        if self._outbox:
            self._loop.remove_writer(self._sock.fileno())
            self._outbox.clear()
        self._sock.close()
        return True

    def _reap(self, exited: Callable[[bool], None] | None, waited: float) -> None:
        """Collect the process once it has exited.  ``exited`` hears whether
        it did within :data:`EXIT_WAIT` (it finishes the commits it has)."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # collected already
            pid = self.pid
        if pid:
            if exited is not None:
                exited(True)
            return
        if exited is not None and waited >= EXIT_WAIT:
            exited(False)
            exited = None
        self._loop.call_later(_REAP_EVERY, self._reap, exited, waited + _REAP_EVERY)


def _delivered(report: Report) -> None:
    """Log and count local copies written at commit time, as deliver does its own."""
    for line in report.lines:
        delivery_log.info("%s", line)
    if report.copies:
        metrics.count("mmdf_deliveries", ("delivered", "local"), report.copies)
        for _ in range(report.copies):
            metrics.observe("mmdf_delivery_seconds", ("local",), report.seconds)


class Committer:
    """Where the worker's sessions commit: a commit process per queue.

    A reload may bring a new queue; sessions begun before it still commit
    to theirs.  The process of a queue no longer current is closed once
    it has nothing left to commit.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: Queue,
        delivery: CommitDelivery | None = None,
    ) -> None:
        """``delivery``: what delivers local mail at commit time for ``queue``, if anything."""
        self._loop = loop
        self._processes: dict[int, CommitProcess] = {}  # by id() of the queue
        self._deliveries: dict[int, CommitDelivery | None] = {id(queue): delivery}
        self._current = queue
        self._process_for(queue)

    def submit(self, queue: Queue, writer: MessageWriter, size: int, done: CommitDone) -> None:
        """Commit ``writer``'s message of ``size`` octets; ``done`` gets its outcome."""
        process = self._process_for(queue)
        started = time.monotonic()

        def finished(result: Exception | None) -> None:
            metrics.since("mmdf_commit_seconds", (), started)
            if process.idle and process.queue is not self._current:
                self._retire(process)
            done(result)

        process.submit(writer, size, finished)

    def use(self, queue: Queue, delivery: CommitDelivery | None = None) -> None:
        """From now on new sessions commit to ``queue`` (through ``delivery``)."""
        self._current = queue
        self._deliveries = {
            key: value for key, value in self._deliveries.items() if key in self._processes
        }
        self._deliveries[id(queue)] = delivery
        for process in list(self._processes.values()):
            if process.idle and process.queue is not queue:
                self._retire(process)

    def close(self) -> None:
        for process in list(self._processes.values()):
            self._retire(process)

    def _process_for(self, queue: Queue) -> CommitProcess:
        process = self._processes.get(id(queue))
        if process is None or not process.alive:
            process = CommitProcess(self._loop, queue, self._deliveries.get(id(queue)))
            self._processes[id(queue)] = process
        return process

    def _retire(self, process: CommitProcess) -> None:
        process.close()
        if self._processes.get(id(process.queue)) is process:
            del self._processes[id(process.queue)]
