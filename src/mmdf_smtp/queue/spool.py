"""The spool: a queue on a directory, one file per message.

Layout::

    <spool>/tmp/<id>       a message being received
    <spool>/queue/<id>     a queued message (never changed once there)
    <spool>/hold/<id>      a queued message held by the administrator or
                           quarantined by a filter: never delivered from there
    <spool>/state/<id>     its recipients' delivery state, once deliver has seen it
    <spool>/corrupt/<id>   a file that cannot be read whole, set aside for the administrator
    <spool>/deliver.sock   where ``deliver`` listens for "a message was queued"

Each file is the envelope as one line of JSON, then the message octets as
received (dot-unstuffed, CRLF line ends, our Received header first).  The
envelope is whole before the content starts, so one file holds both and
one rename commits them together.  The envelope's first field,
``file_size``, is the size of the whole file, envelope line included; it
is filled in at the commit, in a slot of fixed width kept blank until
then (:func:`seal`), so a file that lost any of its end, or was never
finished, proves itself incomplete (as the END record ends a Postfix
queue file).  Readers see the same octets as without it: the message
starts after the envelope line.  The other fields are read by the rule
of ``must_understand`` (:meth:`.Envelope.from_data`): a file a newer
version wrote is whole and yet not this version's to deliver, and is
left where it is (:class:`.NewerFormat`), never set aside.

Commit: the file, created unreadable (mode :data:`COMMITTING`), is
sealed, fsynced, renamed from ``tmp/`` into ``queue/``, and ``queue/`` is
fsynced; then it gets its readable mode (:data:`QUEUED`), and only then
is it answered 250 and seen by deliver.  A crash before the rename leaves
only a file in ``tmp/``, which :meth:`Spool.recover` removes; a name in
``queue/`` has the whole file on stable storage behind it (fsync comes
before the rename: fsync(2) is the one call whose promise holds across a
power loss), and recovery makes one left unreadable deliverable once its
``file_size`` says it is whole.  One that is not (storage that lied about
a flush) is moved to ``corrupt/`` and logged, never delivered
(:meth:`Spool.set_aside`).  A message is never partial and never twice
(a rename moves it).

A message whose envelope has ``quarantine`` set (a milter's
SMFIR_QUARANTINE) is committed the same way into ``hold/`` instead: the
same fsyncs in the same order, ``hold/`` synced where ``queue/`` would be.
``checkque --hold`` and ``--release`` move messages between the two by a
rename (both directories synced); the delivery state stays.  While
deliver works a message it holds an exclusive flock(2) on its file
(:meth:`Spool.claim`, non-blocking); the administrator's :meth:`Spool.hold`,
:meth:`Spool.release` and :meth:`Spool.delete` act on a message only under
the same lock, so a message deliver has halfway is never moved or removed
under it.  A lock follows the file across renames
(it is on the open file), so either side checks, once it has the lock,
that the name still leads to the file it locked.

smtpd's sessions hold a message of up to :data:`IN_MEMORY` octets in
memory and create its file only at the commit.  Group commit: messages
committed together (:meth:`Spool.commit_all`) share the journal commit
of their fsyncs and one fsync of ``queue/``; threads committing at once
share the latter too (:meth:`Spool.sync_queue`).

The delivery state is JSON, replaced whole (temporary file, fsync, rename,
fsync of ``state/``).  A finished message is removed file first, state
second: a crash between the two leaves a state without a message, which
:meth:`Spool.forget_orphans` removes; the other order could leave a
message without its state, to be delivered again.  A writer that puts a
state before its message (smtpd's commit process, :meth:`Spool.adopt`)
creates the message's file in ``tmp/`` first, the sign of a commit under
way that keeps the state from being taken for an orphan meanwhile.

Queue ids are hex: microseconds since the epoch (14 digits), the writer's
pid (7) and a per-process counter (5).  They are unique across the
processes sharing a spool and sort by arrival time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import heapq
import io
import itertools
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from . import (
    NEWER_WAIT,
    PENDING,
    DelivererRunning,
    DeliveryState,
    Envelope,
    Lease,
    LeaseLost,
    MessageBusy,
    MessageWriter,
    NewerFormat,
    QueuedMessage,
    QueueError,
    SetAside,
    Wakeup,
    warn_newer_format,
)

log = logging.getLogger("mmdf_smtp.queue")

_ID_LENGTH = 26  # hex digits: time in microseconds, pid, counter (Spool.new_id)
_ID = re.compile(rf"[0-9a-f]{{{_ID_LENGTH}}}")
# What a message handed over to another process starts with (Spool.hand_over).
_IN_TOKEN = b"M"  # then its id and every octet of it
_IN_FILE = b"F"  # then its id: the rest is in its file in tmp/
# The same, for a quarantined message (committed into hold/).
_HELD_IN_TOKEN = b"Q"
_HELD_IN_FILE = b"H"
_TOKEN_KINDS = {
    _IN_TOKEN: (False, False),  # (in a file, into hold/)
    _IN_FILE: (True, False),
    _HELD_IN_TOKEN: (False, True),
    _HELD_IN_FILE: (True, True),
}
_BUFFER = 256 * 1024
# What smtpd's sessions hold in memory before a message gets its file
# (envelope included): a smaller one is written whole at its commit.
IN_MEMORY = 64 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)
# A message file's mode says whether it is queued: one being committed is
# not readable, so deliver and checkque pass it by (Spool.ids).
COMMITTING = 0o200
QUEUED = 0o600
# How a maildrop file starts (queue/maildrop.py), to tell one in corrupt/.
_MAILDROP_MAGIC = b"MMDF-MAILDROP "
TRIGGER = "deliver.sock"
POKE = b"."  # a message was queued
FLUSH = b"F"  # try deferred recipients now
FLUSH_ONE = b"I"  # then a queue id: try its deferred recipients now


# The envelope line starts with the file's size, right-aligned in a slot
# of fixed width (JSON allows the blanks before a number): the slot's place
# never moves, so the size is written in at the commit, when it is known,
# even into a file whose envelope went to the disk first.  A blank slot is
# not JSON: a file never sealed cannot pass for a whole one.
_SIZE_KEY = b'{"file_size":'
SIZE_SLOT = len(_SIZE_KEY)  # the slot's offset in the file
_SIZE_WIDTH = 20


def envelope_to_json(envelope: Envelope) -> bytes:
    """The envelope line, its size slot still blank (see :func:`seal`).

    The slot comes first and the fields after it, ``must_understand``
    (when any field is critical) last: what follows the slot moves nothing
    in it."""
    fields_json = _ENVELOPE_ENCODER.encode(envelope.to_data()).encode()
    return _SIZE_KEY + b" " * _SIZE_WIDTH + b"," + fields_json[1:] + b"\n"


def size_field(size: int) -> bytes:
    """What goes into the size slot of a file of ``size`` octets."""
    return b"%*d" % (_SIZE_WIDTH, size)


def seal(fd: int, size: int) -> None:
    """Write the size of a queue file of ``size`` octets into its slot.  Raises OSError.

    ``fd`` must not be in append mode: pwrite(2) on Linux appends there.
    """
    if os.pwrite(fd, size_field(size), SIZE_SLOT) != _SIZE_WIDTH:
        raise OSError(errno.EIO, "short write of a queue file's size")


# One encoder for all: json.dumps with options makes a new one each call.
_ENVELOPE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def envelope_from_json(line: bytes) -> Envelope:
    """The envelope line of a queue file; ValueError when it is not one
    (:class:`NewerFormat` when a newer version wrote it)."""
    data, _ = _envelope_data(line)
    return Envelope.from_data(data)


def _unsealed_envelope(line: bytes | bytearray) -> Envelope:
    """The envelope line of a message not yet sealed (its size slot blank)."""
    sealed = bytearray(line)
    sealed[SIZE_SLOT : SIZE_SLOT + _SIZE_WIDTH] = size_field(0)
    return envelope_from_json(bytes(sealed))


def read_envelope(file: BinaryIO) -> Envelope:
    """The envelope of a queue file open at its start, once the file has
    proved itself whole; ValueError, saying why, when it cannot.

    A file whose envelope has no ``file_size`` was written before queue
    files carried one, and is taken as whole.
    """
    line = file.readline()
    data, declared = _envelope_data(line)
    if declared is not None:
        size = os.fstat(file.fileno()).st_size
        if size != declared:
            raise ValueError(f"incomplete: {size} octets where its envelope says {declared}")
    # After the size: a file a newer version wrote is whole before it is
    # left alone for that version (NewerFormat); a torn one is set aside.
    return Envelope.from_data(data)


def _envelope_data(line: bytes) -> tuple[dict[str, Any], int | None]:
    """The envelope line's fields, and its ``file_size`` taken out of them."""
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            raise TypeError(f"{type(data).__name__}, not an object")
        declared = data.pop("file_size", None)
        if declared is not None and not isinstance(declared, int):
            raise TypeError(f"file_size is {declared!r}")
        return data, declared
    except (ValueError, TypeError) as exc:
        if not line:
            raise ValueError("not an envelope: the file is empty") from exc
        raise ValueError(f"not an envelope: {exc!r}") from exc


class MessageClaim:
    """An exclusive flock(2) on a queued message's file, held until :meth:`close`.

    Whoever holds it may read the message's state, move or remove it; the
    others wait (deliver) or give up after a while (checkque).
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path  # where the file was when the lock was taken

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # which releases the lock

    def __enter__(self) -> MessageClaim:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _still_at(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (a lock is on the
    file, and it may have been moved or removed before the lock was had)."""
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _error(action: str, exc: OSError) -> QueueError:
    return QueueError(f"{action}: {exc.strerror or exc}", full=exc.errno in _FULL)


def _sync_file_range() -> Callable[[int, int], int] | None:
    """Linux's sync_file_range(2), where there is one."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd, flags: int(call(fd, 0, 0, flags))


_SYNC_FILE_RANGE = _sync_file_range()
_WRITE = 2  # SYNC_FILE_RANGE_WRITE


def begin_writeback(fd: int) -> None:
    """Start writing a file's dirty pages out, without waiting.

    Done for every file of a group commit first, so that the disk takes
    them together and the block allocations (ext4 allocates at write-out)
    all fall in the journal commit of the first fsync.  Only a hint, never
    a promise: sync_file_range(2) "does not flush disk write caches" and
    its writes may be lost in a power failure; the fsync makes the promise.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, _WRITE)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    """One message on its way into the spool.

    A message is kept in memory until it outgrows ``in_memory`` octets; only
    then is its file created in ``tmp/`` and the rest written there, in
    pieces of :data:`_BUFFER`.  A small message thus touches the disk only
    at its commit (see :meth:`Spool.commit_all`), which the daemon runs in
    its commit process (:meth:`Spool.hand_over`); its event loop never
    waits on the filesystem for it.  A failure to store it (a full disk)
    surfaces there, as the same :class:`QueueError`.

    The file is a bare descriptor, not a file object: a buffered file's
    opening alone made three more system calls, and a big message's commit
    runs in a thread, which hands the interpreter over at every call.

    A message pickup queues from the maildrop (:meth:`Spool.open_claimed`)
    is written the same way, sealed and fsynced alike; only its commit
    point differs: the rename of its file over pickup's claim.
    """

    def __init__(
        self,
        spool: Spool,
        queue_id: str,
        held: bytearray,
        *,
        in_memory: int,
        fd: int | None = None,
        into_hold: bool = False,
        claim: str | None = None,
        move_on: bool = True,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """``held``: the octets so far (the envelope line first) not yet in
        the file; ``fd``: the file in tmp/, if it was created already;
        ``into_hold``: a quarantined message, committed into hold/;
        ``claim``: the file in pickup/ that this one replaces at its commit;
        ``move_on``: whether the commit then moves it on into queue/;
        ``owner``: (uid, gid) to give the file, when root writes it."""
        self._spool = spool
        self._id = queue_id
        self.into_hold = into_hold
        self._claim = claim
        self._move_on = move_on
        self._owner = owner
        self._size = 0  # octets of the message written (the envelope line not)
        self._path = spool._in_tmp + queue_id
        self._held = held
        self._hold = in_memory if fd is None else _BUFFER  # octets held before they go to the file
        self._fd = fd
        # Octets in the file so far: what the taker of a file handed over
        # finds there, the envelope line included (its size slot is sealed
        # at the commit, by offset).
        self._written = 0 if fd is None else os.lseek(fd, 0, os.SEEK_END)
        self._open = True
        self._created = fd is not None
        if len(self._held) > self._hold:
            self._write_held()

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        """The octets of the message written so far: once committed, its
        size as queued (what checkque shows)."""
        return self._size

    @property
    def claimed(self) -> bool:
        """Pickup's, replacing its claim in pickup/ (:meth:`Spool.open_claimed`)."""
        return self._claim is not None

    def write(self, data: bytes) -> None:
        if not self._open:
            raise QueueError("message already closed")
        self._size += len(data)
        if not self._held and len(data) >= _BUFFER and self._fd is not None:
            self._write_file(data)  # a big piece goes as it is, not copied first
            return
        self._held += data
        if len(self._held) > self._hold:
            self._write_held()

    def _write_held(self) -> None:
        """Move what memory holds into the file, creating it first if need be."""
        try:
            if self._fd is None:
                # A claimed message reaches queue/ only whole and synced
                # (see _commit_claimed): it is readable from the start.
                mode = COMMITTING if self._claim is None else QUEUED
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                self._created = True
                self._hold = _BUFFER
                if self._owner is not None:
                    os.fchown(self._fd, *self._owner)
        except OSError as exc:
            self.abort()
            raise _error("cannot create a queue file", exc) from exc
        self._write_file(self._held)
        self._held.clear()

    def _write_file(self, data: bytes | bytearray) -> None:
        assert self._fd is not None
        try:
            with memoryview(data) as whole:
                done = 0
                while done < len(whole):
                    done += os.write(self._fd, whole[done:])
            self._written += done
        except OSError as exc:
            self.abort()
            raise _error("cannot write a queue file", exc) from exc

    def _hand_over(self) -> bytes:
        """The message as :meth:`Spool.take_over` takes it; this writer is done with it.

        One held in memory goes whole; one with a file is written out and
        goes by its id.  Raises QueueError.
        """
        if not self._open:
            raise QueueError("message already closed")
        if self._fd is None:
            kind = _HELD_IN_TOKEN if self.into_hold else _IN_TOKEN
            token = kind + self._id.encode() + self._held
        else:
            self._write_held()
            fd, self._fd = self._fd, None
            try:
                os.close(fd)  # where a network filesystem reports a failed write
            except OSError as exc:
                self.abort()
                raise _error("cannot write a queue file", exc) from exc
            token = (_HELD_IN_FILE if self.into_hold else _IN_FILE) + self._id.encode()
        self._open = False
        self._created = False  # the file is the taker's now
        self._held = bytearray()
        return token

    def create_file(self) -> None:
        """Give a message still held in memory its file in ``tmp/`` now.

        For a writer that puts the message's delivery state before the
        message (smtpd's commit process, :meth:`Spool.adopt`): from now
        until the commit's rename into ``queue/`` the file says that a
        commit is under way, and deliver keeps the state
        (:meth:`Spool.forget_orphans`).  Raises QueueError.
        """
        if not self._open:
            raise QueueError("message already closed")
        if self._fd is None:
            self._write_held()

    def read_back(self) -> tuple[Envelope, BinaryIO]:
        """What the commit would queue, before it: the envelope, and the
        message to read (what follows the envelope line).  For the commit
        process, which may deliver a message instead of queueing it
        (delivery/atcommit.py).  Raises QueueError, ValueError for an
        envelope line that cannot be read.
        """
        if not self._open:
            raise QueueError("message already closed")
        if self._fd is None:
            end = self._held.index(b"\n") + 1
            envelope = _unsealed_envelope(self._held[:end])
            return envelope, io.BytesIO(self._held[end:])
        if self._held:
            self._write_held()
        assert self._fd is not None
        try:
            # Its mode while it is being committed keeps everyone off it,
            # its owner too: readable for as long as it takes to open it.
            os.fchmod(self._fd, QUEUED)
            try:
                fd = os.open(self._path, os.O_RDONLY)
            finally:
                os.fchmod(self._fd, COMMITTING)
        except OSError as exc:
            raise _error("cannot read a queue file back", exc) from exc
        file = os.fdopen(fd, "rb")
        try:
            envelope = _unsealed_envelope(file.readline())
        except BaseException:
            file.close()
            raise
        return envelope, file

    def commit(self) -> None:
        if self._claim is not None:
            self._commit_claimed(self._claim)
            return
        error = self._spool.commit_all([self])[0]
        if error is not None:
            raise error

    def _commit_claimed(self, claim: str) -> None:
        """Pickup's commit: written out, sealed and fsynced as any message,
        then renamed over its claim in pickup/, in one step from
        "submission" to "queued message"; then on into queue/ (hold/ when
        quarantined).  Raises QueueError: before the rename, nothing of the
        message remains and the claim waits for the next pass; after it,
        the message is queued, and the next pass moves it on."""
        self._write_out(start_writeback=False)
        self._sync()
        try:
            os.rename(self._path, claim)
        except OSError as exc:
            self.abort()
            raise _error("cannot commit a queue file", exc) from exc
        self._created = False  # committed: abort() must not touch it
        try:
            _fsync_directory(Path(claim).parent)
            if self._move_on:
                self._spool.enqueue_claimed(Path(claim), into_hold=self.into_hold)
        except OSError as exc:
            raise _error(f"cannot move {self._id} into the queue", exc) from exc

    def _write_out(self, *, start_writeback: bool) -> None:
        """Write the whole message to its file, sealed with its size; with
        ``start_writeback``, start it on its way to the disk.  Raises QueueError.

        The writing-out of several messages committed together thus
        overlaps, and their fsyncs (:meth:`_sync`) share one journal commit
        instead of one each.
        """
        if not self._open:
            raise QueueError("message already closed")
        size = self._written + len(self._held)
        if self._written == 0:
            # The envelope line is still in memory: sealed there, for free.
            self._held[SIZE_SLOT : SIZE_SLOT + _SIZE_WIDTH] = size_field(size)
            self._write_held()
        else:
            self._write_held()
            assert self._fd is not None
            try:
                seal(self._fd, size)
            except OSError as exc:
                self.abort()
                raise _error("cannot write a queue file", exc) from exc
        if start_writeback:
            assert self._fd is not None
            begin_writeback(self._fd)

    def _publish(self) -> None:
        """Durable in queue/: let deliver see it.  Raises QueueError."""
        try:
            os.chmod(self._path, QUEUED)
        except OSError as exc:
            self.abort()
            raise _error("cannot commit a queue file", exc) from exc
        self._created = False  # queued for good: abort() must not touch it

    def _sync(self) -> None:
        """Wait until the file is on stable storage, and close it.  Raises QueueError.

        Before the rename into queue/: only fsync(2) promises anything
        across a power loss, so a name in queue/ never stands for octets
        that were still in a cache.
        """
        fd, self._fd = self._fd, None
        self._open = False
        assert fd is not None
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.abort()
            raise _error("cannot commit a queue file", exc) from exc

    def _move_to_queue(self) -> None:
        """The commit point: tmp/ to queue/ (hold/ when quarantined).  Raises QueueError."""
        target = (self._spool._in_hold if self.into_hold else self._spool._in_queue) + self._id
        try:
            os.rename(self._path, target)
        except OSError as exc:
            self.abort()
            raise _error("cannot commit a queue file", exc) from exc
        self._path = target

    def abort(self) -> None:
        self._open = False
        self._held = bytearray()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._created:
            with contextlib.suppress(OSError):
                os.unlink(self._path)


class Spool:
    """The queue on a directory.  Safe to share between threads and processes.

    ``in_memory``: the octets a message may reach before its file is created
    (see :class:`SpoolWriter`); 0 creates it when the message is opened.
    """

    def __init__(self, directory: Path, *, in_memory: int = 0) -> None:
        self.directory = directory
        self.in_memory = in_memory
        self.tmp = directory / "tmp"
        self.queue = directory / "queue"
        self.hold_dir = directory / "hold"
        # A message's paths are made as strings: a pathlib join, for every
        # message in the loop and in the commit process, cost more than the
        # system call it names.
        self._in_tmp = os.path.join(self.tmp, "")
        self._in_queue = os.path.join(self.queue, "")
        self._in_hold = os.path.join(self.hold_dir, "")
        self.state = directory / "state"
        self._in_state = os.path.join(self.state, "")
        self.corrupt = directory / "corrupt"
        self.trigger = directory / TRIGGER
        self._counter = itertools.count()
        self._ready = False
        self._poker: socket.socket | None = None
        self._poker_pid = 0
        self._sync = threading.Condition()
        self._syncing = False
        self._syncs_started = 0
        self._syncs_done = 0
        self._state_sync = GroupSync(self.state)
        self._work: _WorkIndex | None = None  # what this process's deliverer knows (claim)

    def prepare(self) -> None:
        """Create the spool's folders if missing.  Raises OSError."""
        if not self._ready:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.tmp.mkdir(mode=0o700, exist_ok=True)
            self.queue.mkdir(mode=0o700, exist_ok=True)
            self.state.mkdir(mode=0o700, exist_ok=True)
            self.hold_dir.mkdir(mode=0o700, exist_ok=True)
            self._ready = True

    @property
    def name(self) -> str:
        return str(self.directory)

    @property
    def set_aside_place(self) -> str:
        return str(self.corrupt)

    @property
    def doorbell(self) -> str:
        return str(self.trigger)

    def poke(self, *, flush: bool = False) -> bool:
        """Tell a running ``deliver`` that a message was queued (or, with
        ``flush``, to try deferred recipients now); False when none listens.

        One datagram, never waited for: deliver may not be running, or its
        socket may be full of earlier pokes, and either way the message is
        safe in the queue and found by deliver's next pass.
        """
        return self._send_trigger(FLUSH if flush else POKE)

    def _send_trigger(self, datagram: bytes) -> bool:
        try:
            poker = self._poker
            if poker is None or self._poker_pid != os.getpid():
                if poker is not None:
                    # A copy from before a fork, whose descriptor may have
                    # been closed since: not ours to close.
                    poker.detach()
                poker = self._poker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                poker.setblocking(False)
                self._poker_pid = os.getpid()
            poker.sendto(datagram, str(self.trigger))
        except OSError:
            return False
        return True

    def commit_all(self, writers: Sequence[MessageWriter]) -> list[QueueError | None]:
        """Commit several messages together; for each, None or why it failed.

        1. every file is written out and sealed with its size, and the
           write-out of all started (so that they go to the disk together);
        2. each file is fsynced: the first fsync's journal commit carries
           the others' allocations, so the rest cost little;
        3. each file is renamed into queue/ (a quarantined one into hold/),
           still in the mode that keeps deliver off it, and queue/ is
           fsynced once for all (hold/ too, when one went there);
        4. each file gets its queued mode, and deliver one poke.

        A name appears in queue/ only once its file is on stable storage
        (step 2 before step 3), so a power loss never leaves a torn file
        there; one still in its committing mode is finished by
        :meth:`recover`.  A message that fails is taken back out, and the
        others are not held up by it.
        """
        results: list[QueueError | None] = []
        # One file alone has no write-out to overlap: its fsync starts it.
        several = len(writers) > 1
        for writer in writers:
            assert isinstance(writer, SpoolWriter)
            if writer._claim is not None:
                results.append(QueueError("a message pickup claimed commits alone"))
                continue
            try:
                writer._write_out(start_writeback=several)
            except QueueError as exc:
                results.append(exc)
                continue
            results.append(None)
        synced: list[int] = []
        for i, writer in enumerate(writers):
            if results[i] is not None:
                continue
            assert isinstance(writer, SpoolWriter)
            try:
                writer._sync()
            except QueueError as exc:
                results[i] = exc
                continue
            synced.append(i)
        moved: dict[int, SpoolWriter] = {}
        for i in synced:
            writer = writers[i]
            assert isinstance(writer, SpoolWriter)
            try:
                writer._move_to_queue()
            except QueueError as exc:
                results[i] = exc
                continue
            moved[i] = writer
        if not moved:
            return results
        try:
            if not all(writer.into_hold for writer in moved.values()):
                self.sync_queue()
            if any(writer.into_hold for writer in moved.values()):
                _fsync_directory(self.hold_dir)
        except OSError as exc:
            # Renamed but maybe not durable: saying 250 would be a lie, and
            # the client will send again, so take the messages back out.
            error = _error("cannot sync the queue directory", exc)
            for writer in moved.values():
                writer.abort()
            return [error if result is None else result for result in results]
        for i, writer in moved.items():
            try:
                writer._publish()
            except QueueError as exc:
                results[i] = exc
        if self._work is not None:
            self._work.rescan_wanted = True  # a notice deliver itself queued
        self.poke()
        return results

    def sync_queue(self) -> None:
        """Make the renames into queue/ done so far durable.  Raises OSError.

        Group commit: one fsync of queue/ covers every rename done before it
        started, so threads committing at once share one.  A caller waits
        for a sync that starts after it came (its rename is done by then);
        whichever caller finds none running starts it.  A failed sync counts
        for nobody: its caller gets the error, the others start another.
        """
        sync = self._sync
        with sync:
            wanted = self._syncs_started + 1
            while self._syncs_done < wanted:
                if self._syncing:
                    sync.wait()
                    continue
                self._syncing = True
                self._syncs_started += 1
                number = self._syncs_started
                sync.release()
                try:
                    _fsync_directory(self.queue)
                finally:
                    sync.acquire()
                    self._syncing = False
                    sync.notify_all()
                self._syncs_done = number

    def new_id(self) -> str:
        # The counter's next() is atomic under the GIL: threads get distinct ids.
        count = next(self._counter) & 0xFFFFF
        return f"{time.time_ns() // 1000:014x}{os.getpid() & 0xFFFFFFF:07x}{count:05x}"

    def open(self, envelope: Envelope, *, queue_id: str | None = None) -> SpoolWriter:
        try:
            self.prepare()
        except OSError as exc:
            raise _error(f"cannot create the spool {self.directory}", exc) from exc
        held = bytearray(envelope_to_json(envelope))
        return SpoolWriter(
            self,
            queue_id or self.new_id(),
            held,
            in_memory=self.in_memory,
            into_hold=envelope.quarantine is not None,
        )

    def open_claimed(
        self,
        envelope: Envelope,
        claim: Path,
        *,
        owner: tuple[int, int] | None = None,
        move_on: bool = True,
    ) -> SpoolWriter:
        """A message pickup queues from the maildrop, its queue id the name
        of its ``claim`` in pickup/: its commit renames it over the claim,
        then moves it on into queue/ (see :mod:`.maildrop`), unless not
        ``move_on`` (pickup hands it to another queue).  Its file is
        created at once, given to ``owner`` if that is set.  Raises
        :class:`QueueError`."""
        return SpoolWriter(
            self,
            claim.name,
            bytearray(envelope_to_json(envelope)),
            in_memory=0,
            into_hold=envelope.quarantine is not None,
            claim=str(claim),
            move_on=move_on,
            owner=owner,
        )

    def enqueue_claimed(self, claim: Path, *, into_hold: bool) -> None:
        """On from pickup/, committed: into queue/, or into hold/ when a
        milter quarantined it; both directories synced.  Raises OSError."""
        target = self.hold_dir if into_hold else self.queue
        os.rename(claim, target / claim.name)
        _fsync_directory(target)
        _fsync_directory(claim.parent)

    def adopt(self, message: QueuedMessage, body: BinaryIO, state: DeliveryState | None) -> bool:
        """Take in a message stored elsewhere (see :meth:`.Queue.adopt`):
        its file in tmp/, its state, then the message committed as any
        other, into hold/ when it is held.  A crash between the state and
        the commit leaves a state without its message, which
        :meth:`forget_orphans` removes (and keeps while the file is in
        tmp/); the other order could leave the message without its state,
        delivered again.
        False when a message of that id is queued or held here."""
        if not _ID.fullmatch(message.id):
            raise QueueError(f"not a queue id: {message.id!r}")
        if self._is_stored(message.id):
            return False
        try:
            self.prepare()
        except OSError as exc:
            raise _error(f"cannot create the spool {self.directory}", exc) from exc
        writer = SpoolWriter(
            self,
            message.id,
            bytearray(envelope_to_json(message.envelope)),
            in_memory=self.in_memory,
            into_hold=message.held,
        )
        if state is not None:
            # The file in tmp/ before the state: a deliver starting in
            # between takes the state for a commit's, not an orphan's.
            writer.create_file()
            try:
                self.write_state(message.id, state)
            except OSError as exc:
                writer.abort()
                raise _error(f"cannot write the state of {message.id}", exc) from exc
        try:
            while piece := body.read(_BUFFER):
                writer.write(piece)
        except OSError as exc:
            writer.abort()
            raise QueueError(f"cannot read {message.id}: {exc.strerror or exc}") from exc
        writer.commit()
        return True

    def hand_over(self, writer: MessageWriter) -> bytes:
        assert isinstance(writer, SpoolWriter)
        return writer._hand_over()

    def take_over(self, token: bytes) -> SpoolWriter:
        kind, queue_id = token[:1], token[1 : 1 + _ID_LENGTH].decode(errors="replace")
        if kind not in _TOKEN_KINDS or not _ID.fullmatch(queue_id):
            raise QueueError("not a message handed over")
        in_file, into_hold = _TOKEN_KINDS[kind]
        if not in_file:
            held = bytearray(memoryview(token)[1 + _ID_LENGTH :])
            return SpoolWriter(self, queue_id, held, in_memory=self.in_memory, into_hold=into_hold)
        try:
            # Not O_APPEND: the commit writes the size slot by offset.
            fd = os.open(self._in_tmp + queue_id, os.O_WRONLY)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self._in_tmp + queue_id)
            raise _error("cannot open a queue file handed over", exc) from exc
        return SpoolWriter(
            self, queue_id, bytearray(), in_memory=self.in_memory, fd=fd, into_hold=into_hold
        )

    def take_back(self, writer: MessageWriter) -> bool:
        """Whether the message that ``writer`` handed over was committed, its
        taker being gone; if not, what the taker left of it is removed.

        Queued mode is given only once the files and ``queue/`` are synced
        (:meth:`commit_all`), so a message in it is on stable storage, and
        deliver is told of it.  One in ``queue/`` still in its committing
        mode may have missed a sync: it goes, with a file left in ``tmp/``.
        Only once the taker has exited; a live one may still be at it.
        """
        queue_id = writer.id
        committed = (self._in_queue + queue_id, self._in_hold + queue_id)
        for path in committed:
            try:
                if os.stat(path).st_mode & stat.S_IRUSR:
                    self.poke()
                    return True
            except OSError:
                continue
        for path in (*committed, self._in_tmp + queue_id):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False

    def recover(self) -> list[str]:
        """Clean up after crashed writers; return the ids removed from tmp/.

        A file belongs to the process whose pid is in its id; while that
        process lives the file may still be written.  Files of this process
        are stale too, as recovery runs before any message is received.
        What crashed writers left in tmp/ is removed.  A message in queue/
        still in its committing mode was renamed only once on stable
        storage, and may have had its 250: it is made deliverable once it
        proves itself whole (:func:`read_envelope`); one that cannot is
        set aside (:meth:`set_aside`), never delivered.
        """
        removed: list[str] = []
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            names = []
        for name in names:
            if _ID.fullmatch(name) and _alive(int(name[14:21], 16)):
                continue
            try:
                os.unlink(self.tmp / name)
            except FileNotFoundError:
                continue
            removed.append(name)
        finished = 0
        for directory in (self.queue, self.hold_dir):
            for name in self._names(committing=True, directory=directory):
                if _alive(int(name[14:21], 16)):
                    continue
                problem = self._problem(name, directory)
                if problem is not None:
                    self.move_aside(name, problem, directory=directory)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(directory / name, QUEUED)
                    finished += 1
        if finished:
            log.info("made %d messages whose commit a crash cut short deliverable", finished)
        return removed

    def _problem(self, queue_id: str, directory: Path) -> str | None:
        """Why a file in queue/ (or hold/) cannot be read whole; None when it can (or is gone)."""
        path = directory / queue_id
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot be opened: {exc.strerror}"
        with open(fd, "rb") as file:
            try:
                read_envelope(file)
            except NewerFormat:
                return None  # whole: committed, for the newer version to deliver
            except ValueError as exc:
                return str(exc)
        return None

    def move_aside(self, queue_id: str, reason: str, *, directory: Path | None = None) -> None:
        """Move a queue file that cannot be read whole to ``corrupt/``, with a warning.

        Never delivered from there, never in the way of the others; the
        administrator looks at it (``checkque`` lists it) and resubmits or
        removes it.  Its delivery state, if any, goes with the next start
        of deliver (:meth:`forget_orphans`).  ``directory``: where the file
        is, by default queue/.  Raises OSError.
        """
        directory = directory or self.queue
        self.corrupt.mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(directory / queue_id, self.corrupt / queue_id)
        except FileNotFoundError:
            return
        _fsync_directory(self.corrupt)
        _fsync_directory(directory)
        log.warning(
            "id=%s: %s; moved to %s, not delivered", queue_id, reason, self.corrupt / queue_id
        )

    def set_aside(self) -> list[SetAside]:
        """What ``corrupt/`` holds, by name, with what is wrong with each file.

        Beside the queue files :meth:`move_aside` moved there, it holds what
        pickup refused from the maildrop (see :mod:`.maildrop`).
        """
        found: list[SetAside] = []
        try:
            names = sorted(os.listdir(self.corrupt))
        except FileNotFoundError:
            return found
        for name in names:
            try:
                with _open_regular(self.corrupt / name) as file:
                    size = os.fstat(file.fileno()).st_size
                    start = file.read(len(_MAILDROP_MAGIC))
                    file.seek(0)
                    if start == _MAILDROP_MAGIC:
                        problem = "a submission refused by pickup (see the log)"
                    else:
                        try:
                            read_envelope(file)
                            problem = "a whole queue file"
                        except ValueError as exc:
                            problem = str(exc)
            except FileNotFoundError:
                continue
            except OSError as exc:
                size, problem = 0, f"cannot be read: {exc.strerror}"
            found.append(SetAside(name, size, problem))
        return found

    def ids(self) -> list[str]:
        """The queued messages' ids, in arrival order; not those being committed."""
        return sorted(self._names(committing=False))

    def held_ids(self) -> list[str]:
        """The held messages' ids, in arrival order; not those being committed."""
        return sorted(self._names(committing=False, directory=self.hold_dir))

    def _names(self, *, committing: bool, directory: Path | None = None) -> list[str]:
        found = []
        try:
            with os.scandir(directory or self.queue) as entries:
                for entry in entries:
                    if not _ID.fullmatch(entry.name):
                        continue
                    try:
                        readable = bool(entry.stat().st_mode & stat.S_IRUSR)
                    except FileNotFoundError:
                        continue
                    if readable != committing:
                        found.append(entry.name)
        except FileNotFoundError:
            pass
        return found

    def messages(self, *, held: bool = False) -> Iterator[QueuedMessage]:
        """The queued messages in arrival order (``held``: those in hold/).

        Ones gone meanwhile are skipped; so is one whose envelope cannot be
        read, with a warning: one damaged file must not hide the others.
        One a newer version wrote comes with what it ``needs``.
        """
        directory = self.hold_dir if held else self.queue
        for queue_id in self.held_ids() if held else self.ids():
            needs: tuple[str, ...] = ()
            try:
                with open(directory / queue_id, "rb") as file:
                    try:
                        envelope = read_envelope(file)
                    except NewerFormat as exc:
                        if exc.envelope is None:
                            raise
                        envelope, needs = exc.envelope, exc.needed
                    size = os.fstat(file.fileno()).st_size - file.tell()
            except FileNotFoundError:
                continue
            except ValueError as exc:
                log.warning("queue file %s: %s", directory / queue_id, exc)
                continue
            yield QueuedMessage(queue_id, envelope, size, held=held, needs=needs)

    def envelope(self, queue_id: str) -> Envelope:
        """The envelope of a queued or held message; KeyError when there is none.

        (Deliver reads it under the message's lock, so never of one held.)
        Raises ValueError, saying why, for a file that cannot be read whole.
        """
        for directory in (self.queue, self.hold_dir):
            try:
                with open(directory / queue_id, "rb") as file:
                    return read_envelope(file)
            except (FileNotFoundError, PermissionError):  # gone, or still being committed
                continue
        raise KeyError(queue_id)

    def _state_of_locked(self, queue_id: str) -> DeliveryState | None:
        """:meth:`read_state` of a message whose file this process holds
        locked in queue/: it cannot be removed meanwhile, so no second look.
        The deliverer's path, once a message."""
        path = self._in_state + queue_id
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        return _parsed_state(path, data)

    def read_state(self, queue_id: str) -> DeliveryState | None:
        """A queued or held message's delivery state; None before deliver first saw it.

        Raises KeyError for a message in neither queue/ nor hold/ (a state
        a crash left behind its removed message included), and ValueError,
        naming the file, for a state that cannot be read.
        """
        if not _ID.fullmatch(queue_id):
            raise KeyError(queue_id)
        path = self.state / queue_id
        try:
            data: bytes | None = path.read_bytes()
        except FileNotFoundError:
            data = None
        # After the read: a message removed meanwhile has no state to show.
        if not self._is_stored(queue_id):
            raise KeyError(queue_id)
        return None if data is None else _parsed_state(str(path), data)

    def write_state(self, queue_id: str, state: DeliveryState) -> None:
        """Replace the delivery state atomically and durably.  Raises OSError.

        The file's modification time is when the message is next due
        (:func:`_due_stamp`), as Postfix keeps a deferred message's next try
        in its file's mtime: a deliverer's scan of the queue learns it from
        a stat, without reading the state.  Threads writing states at once
        share the sync of ``state/``.
        """
        self.prepare()
        temporary = self.state / f".{queue_id}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(state.to_bytes())
                file.flush()
                stamp = _due_stamp(state)
                os.utime(file.fileno(), ns=(stamp, stamp))
                os.fsync(file.fileno())
            os.rename(temporary, self.state / queue_id)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._state_sync.sync()

    def due(
        self,
        now: datetime,
        *,
        flush: bool = False,
        known: Mapping[str, datetime] | None = None,
    ) -> tuple[list[str], dict[str, datetime]]:
        """The ids to try now, in arrival order, and when each of the others is next due.

        ``flush`` makes every deferred recipient due at once (``postqueue -f``).
        ``known`` holds next tries the caller already knows (it wrote them):
        their states are not read again until they are due.
        """
        known = known or {}
        due: list[str] = []
        waiting: dict[str, datetime] = {}
        for queue_id in self.ids():
            next_try = known.get(queue_id)
            if next_try is None or next_try <= now or flush:
                try:
                    state = self.read_state(queue_id)
                except KeyError:
                    continue  # delivered, held or deleted meanwhile
                except ValueError:
                    due.append(queue_id)  # for the delivery attempt to report it
                    continue
                # A state with nothing left to do is a removal a crash cut short.
                if state is None or flush or state.done or state.due(now):
                    due.append(queue_id)
                    continue
                next_try = state.next_try()
            if next_try is not None:
                waiting[queue_id] = next_try
        return due, waiting

    def remove(self, queue_id: str) -> None:
        """Take a finished message out of the queue: the file, then its state."""
        os.unlink(self.queue / queue_id)
        _fsync_directory(self.queue)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state / queue_id)

    # -- the deliverer's side (DeliveryQueue) ----------------------------------

    def start_delivering(self) -> SpoolWakeups:
        """Become this spool's one deliverer: take ``deliver.lock`` and listen
        on ``deliver.sock``.  Raises :class:`DelivererRunning` when another
        holds the lock, OSError when the spool cannot be used."""
        self.prepare()
        lock = os.open(self.directory / DELIVER_LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise DelivererRunning(f"another deliver is running on {self.directory}") from None
        trigger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            trigger.setblocking(False)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.trigger)  # a crashed deliver's; we hold the lock
            trigger.bind(str(self.trigger))
        except OSError as exc:
            # A file system without sockets (some FUSE ones): the doorbell
            # is a hint, and the scan every RESCAN_INTERVAL finds the mail.
            log.warning(
                "cannot listen on %s (%s): new mail is found by a scan every %d s",
                self.trigger,
                exc.strerror or exc,
                RESCAN_INTERVAL,
            )
        except BaseException:
            trigger.close()
            os.close(lock)
            raise
        return SpoolWakeups(self, lock, trigger)

    def claim(
        self,
        limit: int,
        now: datetime,
        *,
        flush_all: bool = False,
        flush_ids: Collection[str] = (),
    ) -> list[Lease]:
        """Up to ``limit`` due messages, each under an exclusive non-blocking
        flock on its file (one held by checkque is passed by).  See
        :class:`_WorkIndex` for how the due ones are found."""
        work = self._work_index()
        with work.lock:
            if flush_all:
                work.flush_all()
            for queue_id in flush_ids:
                if _ID.fullmatch(queue_id):
                    work.make_ready(queue_id, 0.0, flushed=True)
            work.retry_busy()
            leases: list[Lease] = []
            stamp = now.timestamp()
            scanned = False
            while len(leases) < limit:
                candidate = work.pop(stamp)
                if candidate is None:
                    # One chunk of the scan a claim: what it finds is handed
                    # out longest due first, and the claim's cost has a bound.
                    if scanned or not work.scan_more(stamp, _SCAN_PER_CLAIM * max(limit, 1)):
                        break
                    scanned = True
                    continue
                lease = self._lease(work, *candidate, now)
                if lease is not None:
                    leases.append(lease)
            return leases

    def next_due(self) -> datetime | None:
        work = self._work_index()
        with work.lock:
            return work.next_due()

    def rescan_interval(self) -> float:
        return RESCAN_INTERVAL

    def _work_index(self) -> _WorkIndex:
        if self._work is None:
            self._work = _WorkIndex(self._in_queue, os.path.join(self.state, ""), self._in_hold)
        return self._work

    def _lease(
        self, work: _WorkIndex, queue_id: str, flushed: bool, now: datetime
    ) -> SpoolLease | None:
        """The lease on one candidate, or None: gone, busy, not whole, or not due after all."""
        path = self._in_queue + queue_id
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            work.forget(queue_id)  # delivered, held or deleted meanwhile; or still being committed
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                work.busy.append(queue_id)  # checkque has it for a moment
                os.close(fd)
                return None
            if not (os.fstat(fd).st_mode & stat.S_IRUSR and _still_at(fd, path)):
                work.forget(queue_id)
                os.close(fd)
                return None
            with open(fd, "rb", closefd=False) as file:
                try:
                    envelope = read_envelope(file)
                except NewerFormat as exc:
                    # Whole, and for the newer version to deliver when it
                    # runs again: not set aside, and not read again soon.
                    warn_newer_format(queue_id, exc)
                    work.make_waiting(queue_id, (now + NEWER_WAIT).timestamp())
                    os.close(fd)
                    return None
                except ValueError as exc:
                    # Not whole (storage that lied about a flush): delivering it
                    # would hand on a torn message.  The administrator decides.
                    self.move_aside(queue_id, str(exc))
                    work.forget(queue_id)
                    os.close(fd)
                    return None
            try:
                state = self._state_of_locked(queue_id)
            except NewerFormat as exc:
                warn_newer_format(queue_id, exc)
                work.make_waiting(queue_id, (now + NEWER_WAIT).timestamp())
                os.close(fd)
                return None
            except ValueError as exc:
                log.error("id=%s: cannot deliver: %s", queue_id, exc)
                work.make_waiting(queue_id, (now + UNREADABLE_WAIT).timestamp())
                os.close(fd)
                return None
            if state is not None and not flushed and not state.done and not state.due(now):
                next_try = state.next_try()
                work.make_waiting(queue_id, next_try.timestamp() if next_try else 0.0)
                os.close(fd)
                return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        work.held.add(queue_id)
        return SpoolLease(self, work, queue_id, fd, envelope=envelope, state=state)

    def forget_orphans(self) -> list[str]:
        """Remove states whose message is gone, and temporary states whose
        writer is gone.

        deliver runs this at start-up, after :meth:`recover` and before its
        first pass.  A state may come before its message: smtpd's commit
        process (copies written at commit time) and :meth:`adopt` write it
        while the message's file is in ``tmp/``, and rename the file into
        ``queue/`` (or ``hold/``) only then.  Recovery has removed every
        file in ``tmp/`` whose writer is gone, so a file still there is a
        commit under way, and its state stays: removed, deliver would take
        the message for a new one and write the commit's copies again.  A
        state whose message is in none of these places has none coming.
        """
        removed: list[str] = []
        try:
            entries = os.scandir(self.state)
        except FileNotFoundError:
            return removed
        # A stat a state, not the queue's ids in a set: memory stays bounded
        # whatever the queue's length.  A held message keeps its state for
        # its release.
        with entries:
            for entry in entries:
                name = entry.name
                if _ID.fullmatch(name):
                    if self._has_message(name):
                        continue
                elif (writer := _writer_of_temporary(name)) is not None and _alive(writer):
                    continue  # write_state's, under way
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(name)
        return removed

    def _has_message(self, queue_id: str) -> bool:
        """Whether a message is in queue/ or hold/, or on its way there from tmp/.

        A file only moves onward, from tmp/ into queue/ or hold/ (and
        between those two by the administrator, under the message's lock),
        so it is looked for in that order, queue/ once more at the end for
        a release: a file that moves once while it is looked for is found
        where it went.  queue/ first too, where almost every state's
        message is.
        """
        return any(
            os.path.exists(directory + queue_id)
            for directory in (
                self._in_queue,
                self._in_tmp,
                self._in_queue,
                self._in_hold,
                self._in_queue,
            )
        )

    def open_message(self, queue_id: str) -> BinaryIO:
        """The stored message (without its envelope line), queued or held, for reading.

        (Deliver opens it under the message's lock, so never one held.)
        Raises KeyError for an id that is neither or not an id at all.
        """
        if not _ID.fullmatch(queue_id):
            raise KeyError(queue_id)
        for directory in (self._in_queue, self._in_hold):
            try:
                file = open(directory + queue_id, "rb")  # noqa: SIM115 - returned to the caller
            except (FileNotFoundError, PermissionError):
                continue
            if not os.fstat(file.fileno()).st_mode & stat.S_IRUSR:  # still being committed
                file.close()
                continue
            file.readline()
            return file
        raise KeyError(queue_id)

    def open_set_aside(self, name: str) -> BinaryIO:
        """A file of ``corrupt/``, whole, envelope line and all, for reading.

        Raises KeyError for a name not there or not an id.
        """
        if not _ID.fullmatch(name):
            raise KeyError(name)
        try:
            return _open_regular(self.corrupt / name)
        except OSError:
            raise KeyError(name) from None

    # -- the message lock, and what the administrator does (checkque) --------

    def claim_one(self, queue_id: str) -> MessageClaim | None:
        """A deliverer's lock on one queued message, to hold while it works it:
        from before it reads the state until the state is written or the
        message removed.  Waits while checkque holds it (a rename and an
        fsync or two); None when the message is no longer in queue/ (held,
        deleted or delivered meanwhile) or still being committed.
        """
        path = self._in_queue + queue_id
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_mode & stat.S_IRUSR and _still_at(fd, path):
                return MessageClaim(fd, path)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def _lock_for_admin(self, queue_id: str, *, wait: float) -> MessageClaim:
        """The lock on a message in queue/ or hold/, for the administrator.

        Never blocks for long: when deliver holds the lock for ``wait``
        seconds, raises :class:`MessageBusy`.  Raises KeyError when there is
        no such message (or it is still being committed).
        """
        if not _ID.fullmatch(queue_id):
            raise KeyError(queue_id)
        deadline = time.monotonic() + wait
        while True:
            found = self._open_stored(queue_id)
            if found is None:
                raise KeyError(queue_id)
            fd, path = found
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise MessageBusy(queue_id) from None
                # flock(2) has no timeout; deliver's hold lasts one delivery.
                time.sleep(0.05)
                continue
            except BaseException:
                os.close(fd)
                raise
            if _still_at(fd, path):
                return MessageClaim(fd, path)
            os.close(fd)  # moved or removed before the lock was had: look again

    def _open_stored(self, queue_id: str) -> tuple[int, str] | None:
        """The file of a message in queue/ or hold/, opened; None when there is none."""
        for path in (self._in_queue + queue_id, self._in_hold + queue_id):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                continue
            info = os.fstat(fd)
            # Root opens a file still being committed (mode 0200): not yet queued.
            if stat.S_ISREG(info.st_mode) and info.st_mode & stat.S_IRUSR:
                return fd, path
            os.close(fd)
        return None

    def _is_stored(self, queue_id: str) -> bool:
        """Whether a message lies in queue/ or hold/, committed."""
        if not _ID.fullmatch(queue_id):
            return False
        for directory in (self._in_queue, self._in_hold):
            try:
                if os.stat(directory + queue_id).st_mode & stat.S_IRUSR:
                    return True
            except FileNotFoundError:
                continue
        return False

    def hold(self, queue_id: str, *, wait: float) -> bool:
        """Move a message into hold/, where deliver never looks (both
        directories synced); False when it is there already.  Under the
        message's lock (:meth:`_lock_for_admin`): raises MessageBusy or
        KeyError as it does, and OSError."""
        with self._lock_for_admin(queue_id, wait=wait) as claim:
            if claim.path.startswith(self._in_hold):
                return False
            self._make_hold()
            os.rename(claim.path, self._in_hold + queue_id)
            _fsync_directory(self.hold_dir)
            _fsync_directory(self.queue)
        log.info("id=%s: held by the administrator", queue_id)
        return True

    def _make_hold(self) -> None:
        """Create hold/ if missing (a spool older than it), as the owner of
        queue/: smtpd, running as that user, commits quarantined mail there."""
        try:
            self.hold_dir.mkdir(mode=0o700)
        except FileExistsError:
            return
        owner = os.stat(self.queue)
        if os.geteuid() == 0:
            os.chown(self.hold_dir, owner.st_uid, owner.st_gid)

    def release(self, queue_id: str, *, wait: float) -> bool:
        """Move a message from hold/ back into queue/, its delivery state as
        it was, and poke deliver; False when it was not held.  Raises as
        :meth:`hold`."""
        with self._lock_for_admin(queue_id, wait=wait) as claim:
            if not claim.path.startswith(self._in_hold):
                return False
            os.rename(claim.path, self._in_queue + queue_id)
            _fsync_directory(self.queue)
            _fsync_directory(self.hold_dir)
        log.info("id=%s: released by the administrator", queue_id)
        # Due at once: a deliverer in this process hears it here, one in
        # another from the poke (its next scan finds the file back).
        work = self._work
        if work is not None:
            with work.lock:
                work.make_ready(queue_id, _arrival(queue_id))
        self.poke()
        return True

    def delete(self, queue_id: str, *, wait: float) -> None:
        """Remove a message, held or not, and then its state.  Raises as :meth:`hold`."""
        with self._lock_for_admin(queue_id, wait=wait) as claim:
            os.unlink(claim.path)
            _fsync_directory(Path(claim.path).parent)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state / queue_id)
        log.info("id=%s: deleted by the administrator", queue_id)

    def delete_set_aside(self, name: str) -> bool:
        """Remove a file of corrupt/; False when there is none of that name.  Raises OSError."""
        if not _ID.fullmatch(name):
            return False
        try:
            os.unlink(self.corrupt / name)  # a symbolic link there goes, not what it names
        except FileNotFoundError:
            return False
        _fsync_directory(self.corrupt)
        log.info("id=%s: set-aside file deleted by the administrator", name)
        return True

    def flush(self, queue_id: str | None = None) -> bool:
        """Ask a running deliver to try a message's deferred recipients now
        (every message's with None): a datagram on deliver.sock; False when
        none listens."""
        if queue_id is None:
            return self._send_trigger(FLUSH)
        return self._send_trigger(FLUSH_ONE + queue_id.encode())


def _open_regular(path: Path) -> BinaryIO:
    """A regular file, for reading; OSError for anything else.

    ``corrupt/`` also holds what users put in the maildrop (symbolic links,
    sockets, FIFOs among them): none of it is followed or waited on.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return open(fd, "rb")


def _writer_of_temporary(name: str) -> int | None:
    """The pid in a temporary state's name (``.ID.PID.THREAD``,
    :meth:`Spool.write_state`); None for any other name."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] or not parts[2].isdigit() or int(parts[2]) <= 0:
        return None
    return int(parts[2])


def _alive(pid: int) -> bool:
    if pid == os.getpid() & 0xFFFFFFF:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the deliverer's side ------------------------------------------------------

DELIVER_LOCK = "deliver.lock"
# The longest a deliverer goes without looking at the whole of queue/:
# a wake-up lost delays mail by this much at most (Postfix's
# queue_run_delay is 300 s; a scan of 100,000 messages costs a stat each).
RESCAN_INTERVAL = 60.0
# How long a message whose state cannot be read waits before it is tried again.
UNREADABLE_WAIT = timedelta(seconds=60)
# Queue entries a claim may examine per message it asks for: a claim's cost
# is bounded by its limit, never by the queue's length.
_SCAN_PER_CLAIM = 64
# The most due times a deliverer keeps in memory; a message left out is
# found again by the next scan, its next try read from its state's mtime.
INDEX_LIMIT = 20_000


def _due_stamp(state: DeliveryState) -> int:
    """When a message with ``state`` is next due, in ns since the epoch, for
    its state file's mtime: 0 (due now) unless every recipient not done is
    deferred."""
    if state.done or any(r.status == PENDING for r in state.recipients):
        return 0
    next_try = state.next_try()
    return int(next_try.timestamp() * 1e9) if next_try is not None else 0


def _greatest_id(*directories: str) -> str:
    """The greatest queue id in ``directories``; "" when there is none."""
    greatest = ""
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name > greatest and _ID.fullmatch(entry.name):
                        greatest = entry.name
        except FileNotFoundError:
            continue
    return greatest


def _arrival(queue_id: str) -> float:
    """A queue id's arrival time, in seconds since the epoch (its first 14 hex digits)."""
    return int(queue_id[:14], 16) / 1e6


def _parsed_state(path: str, data: bytes) -> DeliveryState:
    """A state file's contents; ValueError naming ``path`` when they cannot
    be read (:class:`NewerFormat`, as it is, when a newer version wrote them)."""
    try:
        return DeliveryState.from_bytes(data)
    except NewerFormat:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable delivery state: {exc!r}") from exc


class _WorkIndex:
    """What one deliverer knows of when its spool's messages are due.

    Two heaps: ``ready``, messages due whatever the time (new ones, by
    arrival; flushed ones; ones given back with nothing deferred), and
    ``waiting``, deferred ones by next try.  It is filled by an incremental
    scan of queue/ (a few entries at a time, as claims need them; a new
    scan when mail came, or after :data:`RESCAN_INTERVAL`), where a
    message without a state is new and one with a state is due at its
    state file's mtime; and by the leases this deliverer ends, whose next
    tries it wrote.  At most :data:`INDEX_LIMIT` messages are known at
    once: the rest are found again by a later scan.  Entries are replaced
    lazily: a heap entry counts only while ``known`` agrees with it.
    """

    def __init__(self, queue: str, state: str, hold: str) -> None:
        self.lock = threading.Lock()
        self._queue = queue
        self._state = state
        self._ready: list[tuple[float, str]] = []
        self._waiting: list[tuple[float, str]] = []
        self._known: dict[str, tuple[bool, float]] = {}  # id: (ready, key)
        self._flushed: set[str] = set()
        self.held: set[str] = set()  # under this process's leases
        self.busy: list[str] = []  # locked by someone else at the last try
        self._scan: Iterator[os.DirEntry[str]] | None = None
        self._scan_flush = False
        self._scanned_at = -RESCAN_INTERVAL
        self.rescan_wanted = True
        # Every message an earlier deliverer may have tried has an id no
        # greater than this (ids begin with their arrival time; one that
        # came later with a smaller id, from a clock set back, is only
        # looked for first needlessly); and those this one gave back
        # without a recorded state.  The others were never tried: their
        # Maildir copies cannot exist yet (SpoolLease.unattempted).
        self.last_before_start = _greatest_id(queue, hold)
        self.tried_unrecorded: set[str] = set()

    def make_ready(self, queue_id: str, key: float, *, flushed: bool = False) -> None:
        if flushed:
            self._flushed.add(queue_id)
        if self._known.get(queue_id) == (True, key):
            return
        self._known[queue_id] = (True, key)
        heapq.heappush(self._ready, (key, queue_id))
        self._compact()

    def make_waiting(self, queue_id: str, due: float) -> None:
        if queue_id not in self._known and len(self._known) >= INDEX_LIMIT:
            return  # the next scan finds it again
        self._known[queue_id] = (False, due)
        heapq.heappush(self._waiting, (due, queue_id))
        self._compact()

    def forget(self, queue_id: str) -> None:
        self._known.pop(queue_id, None)
        self._flushed.discard(queue_id)

    def _compact(self) -> None:
        """Drop replaced heap entries once they outnumber the live ones."""
        if len(self._ready) + len(self._waiting) > 2 * len(self._known) + 1024:
            self._ready = [(k, i) for i, (r, k) in self._known.items() if r]
            self._waiting = [(k, i) for i, (r, k) in self._known.items() if not r]
            heapq.heapify(self._ready)
            heapq.heapify(self._waiting)

    def _top(self, heap: list[tuple[float, str]], ready: bool) -> tuple[float, str] | None:
        while heap:
            key, queue_id = heap[0]
            if self._known.get(queue_id) == (ready, key):
                return key, queue_id
            heapq.heappop(heap)
        return None

    def pop(self, now: float) -> tuple[str, bool] | None:
        """The candidate due longest at ``now``, and whether it was flushed;
        None when none is known."""
        ready = self._top(self._ready, True)
        waiting = self._top(self._waiting, False)
        if waiting is not None and waiting[0] > now:
            waiting = None
        if ready is None and waiting is None:
            return None
        if waiting is None or (ready is not None and min(ready[0], now) <= waiting[0]):
            assert ready is not None
            heapq.heappop(self._ready)
            queue_id = ready[1]
        else:
            heapq.heappop(self._waiting)
            queue_id = waiting[1]
        del self._known[queue_id]
        flushed = queue_id in self._flushed
        self._flushed.discard(queue_id)
        return queue_id, flushed

    def flush_all(self) -> None:
        """Every deferred message due now: those known, and those the scan
        that starts now finds."""
        for queue_id, (ready, _) in list(self._known.items()):
            if not ready:
                self.make_ready(queue_id, 0.0, flushed=True)
        self._close_scan()
        self.rescan_wanted = True
        self._scan_flush = True

    def retry_busy(self) -> None:
        busy, self.busy = self.busy, []
        for queue_id in busy:
            self.make_ready(queue_id, _arrival(queue_id))

    def scan_more(self, now: float, count: int) -> bool:
        """Look at up to ``count`` more entries of queue/; False when there
        is nothing to scan now."""
        if self._scan is None:
            if not self.rescan_wanted and time.monotonic() - self._scanned_at < RESCAN_INTERVAL:
                return False
            self.rescan_wanted = False
            self._scanned_at = time.monotonic()
            try:
                self._scan = os.scandir(self._queue)
            except FileNotFoundError:
                return False
        for _ in range(count):
            entry = next(self._scan, None)
            if entry is None:
                self._close_scan()
                break
            self._learn(entry.name, now)
        return True

    def _learn(self, queue_id: str, now: float) -> None:
        if not _ID.fullmatch(queue_id) or queue_id in self.held or queue_id in self._known:
            return
        try:
            due = os.stat(self._state + queue_id).st_mtime
        except FileNotFoundError:
            self.make_ready(queue_id, _arrival(queue_id), flushed=self._scan_flush)
            return
        if due <= now or self._scan_flush:
            self.make_ready(queue_id, due, flushed=self._scan_flush)
        else:
            self.make_waiting(queue_id, due)

    def _close_scan(self) -> None:
        scan, self._scan = self._scan, None
        if scan is not None:
            scan.close()  # type: ignore[attr-defined]
        self._scan_flush = False

    def next_due(self) -> datetime | None:
        scanned = self._scanned_at > -RESCAN_INTERVAL
        if (
            self._scan is not None
            or (self.rescan_wanted and scanned)
            or self._top(self._ready, True) is not None
        ):
            return _EPOCH  # more to claim now: mail came since the last scan, or one is under way
        if self.busy:
            return datetime.now(UTC) + timedelta(seconds=1)
        waiting = self._top(self._waiting, False)
        return datetime.fromtimestamp(waiting[0], UTC) if waiting is not None else None

    def given_back(
        self, queue_id: str, state: DeliveryState | None, not_before: datetime | None
    ) -> None:
        self.held.discard(queue_id)
        due: float | None = None
        if state is not None:
            stamp = _due_stamp(state)
            due = stamp / 1e9 if stamp else None
        if not_before is not None:
            due = max(due or 0.0, not_before.timestamp())
        if due is None:
            self.make_ready(queue_id, _arrival(queue_id))
        else:
            self.make_waiting(queue_id, due)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SpoolLease:
    """A message of the spool under this deliverer's exclusive flock, until :meth:`end`.

    The lock is on the open file: it ends with its holder, never under it
    (``renew`` has nothing to do, and ``LeaseLost`` comes only after
    :meth:`end` or :meth:`complete`).
    """

    def __init__(
        self,
        spool: Spool,
        work: _WorkIndex,
        queue_id: str,
        fd: int,
        *,
        envelope: Envelope,
        state: DeliveryState | None,
    ) -> None:
        self._spool = spool
        self._work = work
        self._id = queue_id
        self._fd = fd
        self._envelope = envelope
        self._state = state
        self._state_written = state is not None
        self._resumed = (
            state is not None
            or queue_id <= work.last_before_start
            or queue_id in work.tried_unrecorded
        )

    @property
    def id(self) -> str:
        return self._id

    @property
    def envelope(self) -> Envelope:
        return self._envelope

    @property
    def state(self) -> DeliveryState | None:
        return self._state

    @property
    def resumed(self) -> bool:
        return self._resumed

    @property
    def unattempted(self) -> bool:
        """No deliverer has tried this message before: nothing of it can
        have been delivered, so its first state may be recorded after the
        first attempt, or never when that attempt finishes it."""
        return not self._resumed

    def open_message(self) -> BinaryIO:
        return self._spool.open_message(self._id)

    def renew(self) -> None:
        self._check()

    def _check(self) -> None:
        if self._fd < 0:
            raise LeaseLost(f"id={self._id}: the lease has ended")

    def record(self, state: DeliveryState, changed: Collection[int] | None = None) -> None:
        self._check()
        try:
            self._state_written = True
            self._spool.write_state(self._id, state)
        except OSError as exc:
            raise _error("cannot write a delivery state", exc) from exc
        self._state = state

    def complete(self) -> None:
        """The file, then its state (see :meth:`Spool.forget_orphans`); ``queue/``
        synced between, shared with the other threads completing at once."""
        self._check()
        spool = self._spool
        try:
            os.unlink(spool._in_queue + self._id)
            spool.sync_queue()
        except OSError as exc:
            raise _error("cannot remove a delivered message", exc) from exc
        if self._state_written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.state / self._id)
        fd, self._fd = self._fd, -1
        os.close(fd)
        with self._work.lock:
            self._work.held.discard(self._id)
            self._work.forget(self._id)
            # Kept through a hold and a release, dropped only here: a step
            # cut short by an error is rare, and its copies may be in cur/.
            self._work.tried_unrecorded.discard(self._id)

    def end(self, *, not_before: datetime | None = None) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        os.close(fd)  # before the index hands it out again: a claim would find it busy
        with self._work.lock:
            if not self._state_written:
                # Tried, perhaps in part, with nothing recorded: the next
                # holder looks for its Maildir copies first.
                self._work.tried_unrecorded.add(self._id)
            self._work.given_back(self._id, self._state, not_before)


class SpoolWakeups:
    """deliver.sock, read for :class:`Wakeup`; and deliver.lock, held until :meth:`close`."""

    def __init__(self, spool: Spool, lock: int, trigger: socket.socket) -> None:
        self._spool = spool
        self._lock = lock
        self._trigger = trigger

    def fileno(self) -> int:
        return self._trigger.fileno()

    def drain(self) -> Wakeup:
        new_mail = flush_all = False
        ids: set[str] = set()
        while True:
            try:
                datagram = self._trigger.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            if datagram.startswith(FLUSH_ONE):
                ids.add(datagram[1:].decode(errors="replace"))
            elif datagram == FLUSH:
                flush_all = True
            else:
                new_mail = True
        if new_mail:
            self._spool._work_index().rescan_wanted = True
        return Wakeup(new_mail=new_mail, flush_all=flush_all, flush_ids=frozenset(ids))

    def close(self) -> None:
        if self._lock < 0:
            return
        if self._trigger.getsockname():  # bound: the name is ours
            with contextlib.suppress(OSError):
                os.unlink(self._spool.trigger)
        self._trigger.close()
        os.close(self._lock)
        self._lock = -1


class GroupSync:
    """fsync of one directory, shared by the threads that ask at once: each
    waits for a sync that started after it asked (see :meth:`Spool.sync_queue`)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._condition = threading.Condition()
        self._syncing = False
        self._started = 0
        self._done = 0

    def sync(self) -> None:
        """Raises OSError."""
        condition = self._condition
        with condition:
            wanted = self._started + 1
            while self._done < wanted:
                if self._syncing:
                    condition.wait()
                    continue
                self._syncing = True
                self._started += 1
                number = self._started
                condition.release()
                try:
                    _fsync_directory(self._directory)
                finally:
                    condition.acquire()
                    self._syncing = False
                    condition.notify_all()
                self._done = number
