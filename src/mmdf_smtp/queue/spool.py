"""The spool: a queue on a directory, one file per message.

Layout::

    <spool>/tmp/<id>     a message being received
    <spool>/queue/<id>   a queued message

Each file is the envelope as one line of JSON, then the message octets as
received (dot-unstuffed, CRLF line ends, our Received header first).  The
envelope is whole before the content starts, so one file holds both and
one rename commits them together.

Commit: the file is fsynced, renamed from ``tmp/`` into ``queue/`` (the
commit point), and ``queue/`` is fsynced.  A crash before the rename
leaves only a file in ``tmp/``, which :meth:`Spool.recover` removes; after
the directory fsync the message is on stable storage.  A message is never
partial (it reaches ``queue/`` whole) and never twice (a rename moves it).

Queue ids are hex: microseconds since the epoch (14 digits), the writer's
pid (7) and a per-process counter (5).  They are unique across the
processes sharing a spool and sort by arrival time.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from . import Envelope, QueueError

_ID = re.compile(r"[0-9a-f]{26}")
_BUFFER = 256 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FIELDS = fields(Envelope)


def envelope_to_json(envelope: Envelope) -> bytes:
    # Field by field, not dataclasses.asdict: that deep-copies, once a message.
    data: dict[str, Any] = {field.name: getattr(envelope, field.name) for field in _FIELDS}
    data["recipients"] = list(envelope.recipients)
    data["received"] = envelope.received.isoformat()
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def envelope_from_json(line: bytes) -> Envelope:
    data = json.loads(line)
    data["recipients"] = tuple(data["recipients"])
    data["received"] = datetime.fromisoformat(data["received"])
    return Envelope(**data)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    envelope: Envelope
    size: int  # octets of the message, without the envelope line


def _error(action: str, exc: OSError) -> QueueError:
    return QueueError(f"{action}: {exc.strerror or exc}", full=exc.errno in _FULL)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    def __init__(self, spool: Spool, queue_id: str, envelope: Envelope) -> None:
        self._spool = spool
        self._id = queue_id
        self._path = spool.tmp / queue_id
        self._file: BinaryIO | None = None
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=_BUFFER)
            self._file.write(envelope_to_json(envelope))
        except OSError as exc:
            self.abort()
            raise _error("cannot create a queue file", exc) from exc

    @property
    def id(self) -> str:
        return self._id

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise QueueError("message already closed")
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise _error("cannot write a queue file", exc) from exc

    def commit(self) -> None:
        file, self._file = self._file, None
        if file is None:
            raise QueueError("message already closed")
        try:
            with file:
                file.flush()
                os.fsync(file.fileno())
            os.rename(self._path, self._spool.queue / self._id)
        except OSError as exc:
            self.abort()
            raise _error("cannot commit a queue file", exc) from exc
        try:
            _fsync_directory(self._spool.queue)
        except OSError as exc:
            # Renamed but maybe not durable: saying 250 would be a lie, and
            # the client will send again, so take the message back out.
            self._path = self._spool.queue / self._id
            self.abort()
            raise _error("cannot sync the queue directory", exc) from exc

    def abort(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            # Closing flushes, and a full disk may be why we are here.
            with contextlib.suppress(OSError):
                file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._path)


class Spool:
    """The queue on a directory.  Safe to share between threads and processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp = directory / "tmp"
        self.queue = directory / "queue"
        self._counter = itertools.count()
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.tmp.mkdir(mode=0o700, exist_ok=True)
            self.queue.mkdir(mode=0o700, exist_ok=True)
            self._ready = True

    def new_id(self) -> str:
        # The counter's next() is atomic under the GIL: threads get distinct ids.
        count = next(self._counter) & 0xFFFFF
        return f"{time.time_ns() // 1000:014x}{os.getpid() & 0xFFFFFFF:07x}{count:05x}"

    def open(self, envelope: Envelope) -> SpoolWriter:
        try:
            self._prepare()
        except OSError as exc:
            raise _error(f"cannot create the spool {self.directory}", exc) from exc
        return SpoolWriter(self, self.new_id(), envelope)

    def recover(self) -> list[str]:
        """Remove what crashed writers left in tmp/; return the ids removed.

        A file belongs to the process whose pid is in its id; while that
        process lives the file may still be written.  Files of this process
        are stale too, as recovery runs before any message is received.
        """
        removed: list[str] = []
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            return removed
        for name in names:
            if _ID.fullmatch(name) and _alive(int(name[14:21], 16)):
                continue
            try:
                os.unlink(self.tmp / name)
            except FileNotFoundError:
                continue
            removed.append(name)
        return removed

    def ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.queue) if _ID.fullmatch(n))
        except FileNotFoundError:
            return []

    def messages(self) -> Iterator[QueuedMessage]:
        """The queued messages in arrival order; ones gone meanwhile are skipped."""
        for queue_id in self.ids():
            try:
                with open(self.queue / queue_id, "rb") as file:
                    header = file.readline()
                    size = os.fstat(file.fileno()).st_size - len(header)
            except FileNotFoundError:
                continue
            yield QueuedMessage(queue_id, envelope_from_json(header), size)

    def open_message(self, queue_id: str) -> BinaryIO:
        """The stored message (without its envelope line), for reading.

        Raises KeyError for an id that is not queued or not an id at all.
        """
        if not _ID.fullmatch(queue_id):
            raise KeyError(queue_id)
        try:
            file = open(self.queue / queue_id, "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        file.readline()
        return file


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
