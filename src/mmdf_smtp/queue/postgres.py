"""The queue in a PostgreSQL database that several hosts share.

Any number of smtpd nodes commit into it and any number of deliverers
work it off; with ``synchronous_commit = on`` and a synchronous standby a
commit that returned is on the disks of two machines.  The dsn is libpq's:
with several hosts and ``target_session_attrs=read-write`` a promoted
standby is found by itself.

Tables (``mmdf_`` first, so that the database may hold others)::

    mmdf_schema     the schema's version, one row (for later migrations)
    mmdf_message    one row a message: its id (the primary key), envelope
                    (JSON), size, arrival, held, when due, and its lease
    mmdf_recipient  its recipients' delivery states, a row an entry
    mmdf_chunk      its octets, in rows of :data:`CHUNK` octets (bytea)
    mmdf_deliverer  the deliverers listening, each seen within a while

The way in: a message being received is held in memory up to
``in_memory`` octets, then streamed to a file in the node's ``staging``
folder, never whole in memory.  Its commit is one transaction that
inserts the message's row and its chunks, read back from the file a
chunk at a time; it returns after COMMIT.  :meth:`PostgresQueue.commit_all`
puts a group of messages in one transaction, and concurrent transactions
share the server's WAL flush (PostgreSQL's own group commit).  A
connection lost at COMMIT leaves its outcome unknown: it is settled by
inserting a tombstone with the message's id (:meth:`PostgresQueue._settle`).
The insert waits for a transaction still holding the id, conflicts with
one that committed (committed: 250), and otherwise keeps a late insert of
the dead transaction from ever committing (not committed: 451).  The same
settles :meth:`PostgresQueue.take_back`.  So that it also finds a message
delivered before it asked, a completed or deleted message leaves its row,
emptied, marked ``gone``; such rows and tombstones are hidden everywhere
and purged an hour later (by deliverers, now and then).

The work: :meth:`PostgresQueue.claim` picks due messages nobody holds with
``FOR UPDATE SKIP LOCKED`` in a subquery and writes a lease on each, a
holder's name and when it was last renewed, by the database's clock
(hosts' clocks differ; the database's is one).  A lease is live until
``lease_seconds`` after its renewal; every node must use the same
value.  Due-ness is the caller's ``now`` against ``due_at`` (NULL: due at
once), which every record sets from the recipients' states, so that the
message of a holder that died is due when its states say.  Record,
complete and renew are checked against the lease: a row not ours (another
holder claimed it after ours ran out) is :class:`LeaseLost`, and nothing
is written.  New mail and flushes are a NOTIFY on :data:`CHANNEL` after
the commit (a wake-up only: deliverers also claim every
``rescan_interval`` seconds); the NOTIFY is a transaction of its own with
``synchronous_commit`` off, because PostgreSQL serialises the commits of
transactions that notify, which would undo group commit.  New mail's
comes from a thread of its own once the commit returned, not before the
250, and one NOTIFY serves the commits of :data:`_NOTIFY_GAP` (:class:`_Doorbell`).

What a 250 promises depends on the server's settings, not on this module:
``fsync = on`` and ``synchronous_commit = on`` (both the default) put the
message on the primary's disk before COMMIT returns; with a standby named
in ``synchronous_standby_names``, on the standby's too (``remote_apply``:
also visible there); ``synchronous_commit = off`` or ``local`` with a
standby would answer 250 for a message a crash or a failover can lose.
A COMMIT waits for its synchronous standby for as long as it takes
(``statement_timeout`` ends before the commit begins), so smtpd answers
nothing while the standby is gone: run two (``ANY 1 (a, b)``) so that one
gone stops nothing.  An administrator who cancels such a wait gets the
commit made on the primary only, and PostgreSQL says so in a WARNING,
which is logged (:func:`_log_notice`).

What other engines run: the SQL is kept to plain tables with primary
keys, ``text``, ``bytea``, ``timestamptz``, ``INSERT ... ON CONFLICT``,
``UPDATE ... RETURNING``, ``FOR UPDATE SKIP LOCKED`` in a subquery,
``= ANY(array)``, ``unnest`` of arrays, and one expression index with a
``WHERE``; no large objects, advisory locks, sequences, triggers or
server-side functions.  Checked against the engines' documentation, not
run on them: YugabyteDB runs PostgreSQL's own query layer; CockroachDB
documents SKIP LOCKED from its 23.1 release notes on (earlier versions
say it is not supported).  LISTEN/NOTIFY is what they lack (CockroachDB
has none; YugabyteDB has it in early access from 2025.2.3): there the
NOTIFY fails, is ignored, and deliverers find work by polling
(``rescan_interval``).  Not checked: the multi-array ``unnest`` and the
partial expression index on CockroachDB, its serializable retries under
contention (they would surface as QueueErrors), and the hot range that
ids ordered by time make there.  On PostgreSQL itself, ``EXPLAIN`` of the
claim on a queue of 100,000 messages shows an index scan of the due
index stopping after ``limit`` rows (0.4 ms).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import errno
import io
import itertools
import json
import logging
import os
import re
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import (
    NEWER_WAIT,
    PENDING,
    DeliveryState,
    Envelope,
    Lease,
    LeaseLost,
    MessageBusy,
    MessageWriter,
    NewerFormat,
    QueueBackend,
    QueuedMessage,
    QueueError,
    RecipientState,
    SetAside,
    Wakeup,
    warn_newer_format,
)

log = logging.getLogger("mmdf_smtp.queue")
T = TypeVar("T")

SCHEMA_VERSION = 1
CHUNK = 256 * 1024  # octets a row of mmdf_chunk
IN_MEMORY = 64 * 1024  # octets a message may reach before it gets a staging file
CHANNEL = "mmdf_queue"  # what deliverers LISTEN on
_NEW = "new"
_FLUSH = "flush"
_FLUSH_ONE = "flush:"  # then a queue id
_ID = re.compile(r"[0-9a-f]{26}")
_PAGE = 200  # messages a page of the administrator's listing
_SYNC_EVERY = 4 * CHUNK  # octets a commit sends before it waits for the server
_HEARTBEAT = 10.0  # seconds between a deliverer's signs of life
_DELIVERER_GONE = 3 * _HEARTBEAT  # a deliverer not seen for this long listens no more
# How long the row of a message gone stays: longer than any settle takes.
_GONE_KEPT = timedelta(hours=1)
_PURGE = 20_000  # rows a purge removes at most
_NOTIFY_GAP = 0.025  # seconds after a NOTIFY of new mail in which the next waits, to go as one
_NOTIFY_LAST = 5.0  # seconds a process that ends waits for the NOTIFY it owes
# What a message handed over to another process starts with (hand_over).
_IN_TOKEN = b"M"  # then its id, its envelope line and its octets
_IN_FILE = b"F"  # then its id and the name of its file in staging

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS mmdf_schema (
        version INT PRIMARY KEY
    )""",
    """CREATE TABLE IF NOT EXISTS mmdf_message (
        id TEXT PRIMARY KEY,
        envelope TEXT NOT NULL,
        size BIGINT NOT NULL,
        arrived TIMESTAMPTZ NOT NULL DEFAULT now(),
        held BOOLEAN NOT NULL DEFAULT false,
        gone TEXT,
        due_at TIMESTAMPTZ,
        lease_holder TEXT,
        lease_renewed TIMESTAMPTZ
    )""",
    # The claim's order; a scan in it meets the due messages first.
    """CREATE INDEX IF NOT EXISTS mmdf_message_due
        ON mmdf_message ((COALESCE(due_at, arrived)), id)
        WHERE NOT held AND gone IS NULL""",
    # What the purge finds.
    """CREATE INDEX IF NOT EXISTS mmdf_message_gone
        ON mmdf_message (arrived) WHERE gone IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS mmdf_recipient (
        message_id TEXT NOT NULL,
        idx INT NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (message_id, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS mmdf_chunk (
        message_id TEXT NOT NULL,
        seq INT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (message_id, seq)
    )""",
    """CREATE TABLE IF NOT EXISTS mmdf_deliverer (
        name TEXT PRIMARY KEY,
        seen TIMESTAMPTZ NOT NULL
    )""",
)

_INSERT_MESSAGE = "INSERT INTO mmdf_message (id, envelope, size, held) VALUES (%s, %s, %s, %s)"
_INSERT_CHUNK = "INSERT INTO mmdf_chunk (message_id, seq, data) VALUES (%s, %s, %s)"
# A group of messages of a chunk or less: one statement, its own transaction.
# The arrays go in binary (%b): as text, each octet of the messages would be
# escaped by the client and parsed by the server.
_INSERT_SMALL = """
    WITH message AS (
        INSERT INTO mmdf_message (id, envelope, size, held)
        SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::boolean[]))
    INSERT INTO mmdf_chunk (message_id, seq, data)
    SELECT id, 0, data FROM unnest(%b::text[], %b::bytea[]) AS piece (id, data)
"""
# A row whose message is gone stays an hour (see the module's document).
_LIVE = "gone IS NULL"
_TAKEN_BACK = "taken back"  # a tombstone: the commit was not made
_COMPLETED = "completed"
_DELETED = "deleted"
_SET_ASIDE = "set aside: "  # then why: kept for the administrator, never purged
_GONE = "gone = %s, envelope = '', held = true, lease_holder = NULL, lease_renewed = NULL"
_FREE = "(lease_holder IS NULL OR lease_renewed <= now() - %(lease)s)"
_CLAIM = f"""
    UPDATE mmdf_message SET lease_holder = %(holder)s, lease_renewed = now()
    WHERE id IN (
        SELECT id FROM mmdf_message
        WHERE NOT held AND gone IS NULL AND {_FREE}
          AND (due_at IS NULL OR due_at <= %(now)s
               OR %(flush_all)s OR id = ANY(%(flush_ids)s::text[]))
          AND NOT id = ANY(%(newer)s::text[])
        ORDER BY COALESCE(due_at, arrived), id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING id, envelope, size, COALESCE(due_at, arrived)
"""
_NEXT_DUE = f"""
    SELECT min(COALESCE(due_at, arrived)) FROM mmdf_message
    WHERE NOT held AND gone IS NULL AND {_FREE} AND NOT id = ANY(%(newer)s::text[])
"""


def envelope_to_text(envelope: Envelope) -> str:
    """The envelope column: the spool's envelope line, without its size slot."""
    return json.dumps(envelope.to_data(), ensure_ascii=False, separators=(",", ":"))


def envelope_from_text(text: str) -> Envelope:
    """The envelope column's envelope; ValueError when it is not one
    (:class:`NewerFormat` when a newer version wrote it)."""
    return Envelope.from_data(json.loads(text))


def _due_of(state: DeliveryState | None) -> datetime | None:
    """When a message with ``state`` is due again: None for at once (nothing
    recorded, a pending entry, or every entry done: to be completed)."""
    if state is None or state.done:
        return None
    if any(entry.status == PENDING for entry in state.recipients):
        return None
    tries = [entry.next_try for entry in state.recipients if not entry.done]
    if any(when is None for when in tries):
        return None
    return min(when for when in tries if when is not None)


def _error(action: str, exc: psycopg.Error) -> QueueError:
    return QueueError(f"{action}: {exc}".strip(), full=isinstance(exc, pg_errors.DiskFull))


class _Pool:
    """Connections for the threads of one process, each used by one at a time.

    A connection that failed, or was left in a transaction, is closed, and
    so are the idle ones with it (after a failover they all lead to the
    dead primary).  A copy from before a fork is left alone: its sockets
    are the parent's.
    """

    def __init__(self, queue: PostgresQueue, keep: int) -> None:
        self._queue = queue
        self._keep = keep
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self.take()
        try:
            yield conn
        finally:
            self.give_back(conn)

    def take(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._pid != os.getpid():
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not _closed_by_server(conn):
                    return conn
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        return self._queue._connect()

    def give_back(self, conn: psycopg.Connection[Any]) -> None:
        usable = not conn.broken and conn.info.transaction_status == pq.TransactionStatus.IDLE
        if not usable:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self.clear()
            return
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            ours = self._pid == os.getpid()
        for conn in idle if ours else ():
            with contextlib.suppress(psycopg.Error):
                conn.close()


def _closed_by_server(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection has something to read: the end of it, as
    a server that died or was left (a failover) closes its sockets.  So
    the commits after a failover do not find out on their own statements,
    whose outcome a broken connection would leave unknown."""
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    return bool(readable)


class PostgresWriter:
    """One message on its way into the database: in memory, then in a
    staging file once it outgrows ``in_memory`` octets."""

    def __init__(
        self,
        queue: PostgresQueue,
        queue_id: str,
        envelope: Envelope,
        held: bytearray,
        *,
        staged: str | None = None,
        size: int = 0,
    ) -> None:
        self._queue = queue
        self._id = queue_id
        self.envelope = envelope
        self._envelope_text = envelope_to_text(envelope)
        self._held = held
        self._size = size + len(held)
        # The staging file, once there is one: its name, and our descriptor
        # to append with (None once handed over or closed).
        self._staged = staged
        self._fd: int | None = None
        if staged is not None:
            try:
                self._fd = os.open(queue.staging / staged, os.O_WRONLY | os.O_APPEND)
            except OSError as exc:
                self._forget_file()
                raise QueueError(f"cannot open a staged message: {exc.strerror}") from exc
        self._open = True
        if len(self._held) > queue.in_memory:
            self._stage()

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        return self._size

    @property
    def into_hold(self) -> bool:
        return self.envelope.quarantine is not None

    def write(self, data: bytes) -> None:
        if not self._open:
            raise QueueError("message already closed")
        self._size += len(data)
        if self._fd is not None:
            self._write_file(data)
            return
        self._held += data
        if len(self._held) > self._queue.in_memory:
            self._stage()

    def _stage(self) -> None:
        """Give the message its staging file: the envelope line, then what memory held."""
        name = f"{self._id}.{os.getpid()}"
        try:
            self._fd = os.open(
                self._queue.staging / name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                0o600,
            )
        except OSError as exc:
            self.abort()
            raise QueueError(
                f"cannot create a staged message: {exc.strerror}",
                full=exc.errno in (errno.ENOSPC, errno.EDQUOT),
            ) from exc
        self._staged = name
        self._write_file(self._envelope_text.encode() + b"\n")
        self._write_file(self._held)
        self._held = bytearray()

    def _write_file(self, data: bytes | bytearray) -> None:
        assert self._fd is not None
        try:
            with memoryview(data) as whole:
                done = 0
                while done < len(whole):
                    done += os.write(self._fd, whole[done:])
        except OSError as exc:
            self.abort()
            raise QueueError(
                f"cannot write a staged message: {exc.strerror}",
                full=exc.errno in (errno.ENOSPC, errno.EDQUOT),
            ) from exc

    def pieces(self) -> Iterator[bytes]:
        """The message's octets in chunks of :data:`CHUNK`, read from the
        staging file one at a time.  Raises OSError."""
        if self._staged is None:
            with memoryview(self._held) as whole:
                for start in range(0, len(whole), CHUNK):
                    yield bytes(whole[start : start + CHUNK])
            return
        with open(self._queue.staging / self._staged, "rb") as file:
            file.readline()  # the envelope
            while piece := file.read(CHUNK):
                yield piece

    def hand_over(self) -> bytes:
        if not self._open:
            raise QueueError("message already closed")
        self._open = False
        if self._staged is None:
            token = _IN_TOKEN + self._id.encode() + self._envelope_text.encode() + b"\n"
            return token + self._held
        self._close_fd()
        return _IN_FILE + self._id.encode() + self._staged.encode()

    def commit(self) -> None:
        error = self._queue.commit_all([self])[0]
        if error is not None:
            raise error

    @property
    def is_open(self) -> bool:
        return self._open

    def committed(self) -> None:
        """In the database: the staging file goes."""
        self._open = False
        self._held = bytearray()
        self._close_fd()
        self._forget_file()

    def abort(self) -> None:
        self._open = False
        self._held = bytearray()
        self._close_fd()
        self._forget_file()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _forget_file(self) -> None:
        name, self._staged = self._staged, None
        if name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._queue.staging / name)


class _Chunks(io.RawIOBase):
    """A stored message, read a chunk (a round trip) at a time."""

    def __init__(self, queue: PostgresQueue, queue_id: str, size: int) -> None:
        self._queue = queue
        self._id = queue_id
        self._size = size
        self._read = 0  # octets handed out
        self._seq = 0  # the next chunk to fetch
        self._piece = b""
        self._offset = 0
        self._skip = 0  # octets of the next chunk fetched that a seek passed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        # The next hop's client goes back to the start of the message to
        # send it again (in plaintext after a failed TLS handshake), and a
        # DSN to the start of the body after reading the headers.
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._read, io.SEEK_END: self._size}[whence]
        position = max(0, base + offset)
        if position != self._read:
            # Every chunk but the last holds CHUNK octets (the writer's rule).
            self._read = position
            self._seq = position // CHUNK
            self._piece, self._offset = b"", 0
            self._skip = position % CHUNK
        return self._read

    def readinto(self, buffer: Any) -> int:
        if self._offset >= len(self._piece):
            if self._read >= self._size:
                return 0
            self._piece, self._offset = self._fetch(), self._skip
            self._skip = 0
        count = min(len(buffer), len(self._piece) - self._offset)
        buffer[:count] = self._piece[self._offset : self._offset + count]
        self._offset += count
        self._read += count
        return count

    def _fetch(self) -> bytes:
        try:
            with self._queue._pool.connection() as conn:
                cursor = conn.cursor(binary=True)
                row = cursor.execute(
                    "SELECT data FROM mmdf_chunk WHERE message_id = %s AND seq = %s",
                    (self._id, self._seq),
                ).fetchone()
        except (psycopg.Error, QueueError) as exc:
            raise OSError(errno.EIO, f"cannot read message {self._id}: {exc}") from exc
        if row is None or not row[0]:
            raise OSError(errno.EIO, f"message {self._id} is gone from the queue")
        self._seq += 1
        return bytes(row[0])


class PostgresLease:
    """A message claimed from the database: the row's holder is ours."""

    def __init__(
        self,
        queue: PostgresQueue,
        queue_id: str,
        envelope: Envelope,
        *,
        size: int,
        holder: str,
        state: DeliveryState | None,
    ) -> None:
        self._queue = queue
        self._id = queue_id
        self._envelope = envelope
        self._size = size
        self._holder = holder
        self._state = state
        self._resumed = state is not None
        self._over = False  # completed, lost or ended: end() does nothing more

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
    def holder(self) -> str:
        return self._holder

    def open_message(self) -> BinaryIO:
        return self._queue._open_body(self._id, self._size)

    def _ours(self, conn: psycopg.Connection[Any], assignments: str, *values: Any) -> None:
        """Update the message's row where the lease is still ours; LeaseLost if not."""
        cursor = conn.execute(
            f"UPDATE mmdf_message SET {assignments} WHERE id = %s AND lease_holder = %s",
            (*values, self._id, self._holder),
        )
        if cursor.rowcount == 0:
            self._over = True
            raise LeaseLost(f"message {self._id}: the lease ran out and another holds it")

    def renew(self) -> None:
        try:
            with self._queue._pool.connection() as conn:
                self._ours(conn, "lease_renewed = now()")
        except psycopg.Error as exc:
            raise _error(f"cannot renew the lease on {self._id}", exc) from exc

    def record(self, state: DeliveryState, changed: Collection[int] | None = None) -> None:
        first = self._state is None
        indexes = range(len(state.recipients)) if first or changed is None else sorted(changed)
        rows = [
            (json.dumps(state.recipients[i].to_json(), ensure_ascii=False), self._id, i)
            for i in indexes
        ]
        try:
            with self._queue._pool.connection() as conn, conn.transaction():
                self._ours(conn, "due_at = %s, lease_renewed = now()", _due_of(state))
                with conn.cursor() as cursor:
                    if first:
                        cursor.executemany(
                            "INSERT INTO mmdf_recipient (state, message_id, idx)"
                            " VALUES (%s, %s, %s) ON CONFLICT (message_id, idx)"
                            " DO UPDATE SET state = excluded.state",
                            rows,
                        )
                    elif rows:
                        cursor.executemany(
                            "UPDATE mmdf_recipient SET state = %s"
                            " WHERE message_id = %s AND idx = %s",
                            rows,
                        )
        except psycopg.Error as exc:
            raise _error(f"cannot record the state of {self._id}", exc) from exc
        self._state = copy.deepcopy(state)

    def complete(self) -> None:
        try:
            with self._queue._pool.connection() as conn, conn.transaction():
                cursor = conn.execute(
                    f"UPDATE mmdf_message SET {_GONE} WHERE id = %s AND lease_holder = %s",
                    (_COMPLETED, self._id, self._holder),
                )
                if cursor.rowcount == 0:
                    self._over = True
                    raise LeaseLost(f"message {self._id}: the lease ran out and another holds it")
                _delete_parts(conn, self._id)
        except psycopg.Error as exc:
            raise _error(f"cannot complete {self._id}", exc) from exc
        self._over = True

    def end(self, *, not_before: datetime | None = None) -> None:
        if self._over:
            return
        self._over = True
        due = _due_of(self._state)
        if not_before is not None:
            due = not_before if due is None else max(due, not_before)
        try:
            with self._queue._pool.connection() as conn:
                conn.execute(
                    "UPDATE mmdf_message SET lease_holder = NULL, lease_renewed = NULL, due_at = %s"
                    " WHERE id = %s AND lease_holder = %s",
                    (due, self._id, self._holder),
                )
        except (psycopg.Error, QueueError) as exc:
            # The lease runs out by itself; the recorded state says when it is due.
            log.warning("id=%s: cannot end the lease: %s", self._id, exc)


def _delete_parts(conn: psycopg.Connection[Any], queue_id: str) -> None:
    conn.execute("DELETE FROM mmdf_recipient WHERE message_id = %s", (queue_id,))
    conn.execute("DELETE FROM mmdf_chunk WHERE message_id = %s", (queue_id,))


class PostgresWakeups:
    """The doorbell: a pipe a thread rings for each NOTIFY on :data:`CHANNEL`.

    The LISTEN connection may break (a failover); the thread connects again,
    and rings for new mail, since notices may have been missed meanwhile.
    The pipe stays the same, so the deliverer's selector keeps working.
    The thread also keeps the deliverer's row in ``mmdf_deliverer`` fresh
    (:meth:`PostgresQueue.flush` asks whether anyone listens).
    """

    def __init__(self, queue: PostgresQueue, conn: psycopg.Connection[Any], name: str) -> None:
        self._queue = queue
        self._conn: psycopg.Connection[Any] | None = conn
        self._name = name
        self._read, self._write = os.pipe()
        self._stop_read, self._stop_write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._lock = threading.Lock()
        self._new_mail = False
        self._flush_all = False
        self._flush_ids: set[str] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._listen, name="mmdf-listen", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._read

    def drain(self) -> Wakeup:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        with self._lock:
            wakeup = Wakeup(
                new_mail=self._new_mail,
                flush_all=self._flush_all,
                flush_ids=frozenset(self._flush_ids),
            )
            self._new_mail = self._flush_all = False
            self._flush_ids = set()
        return wakeup

    def _ring(self, payload: str) -> None:
        with self._lock:
            if payload == _FLUSH:
                self._flush_all = True
            elif payload.startswith(_FLUSH_ONE):
                self._flush_ids.add(payload.removeprefix(_FLUSH_ONE))
            else:
                self._new_mail = True
        with contextlib.suppress(BlockingIOError):  # full: it rings already
            os.write(self._write, b"!")

    def _listen(self) -> None:
        last_seen = time.monotonic()
        while True:
            conn = self._conn
            try:
                if conn is None:
                    conn = self._conn = self._queue._connect(listen=True)
                    self._queue._seen(conn, self._name)
                    last_seen = time.monotonic()
                    self._ring(_NEW)
                wait = max(0.0, last_seen + _HEARTBEAT - time.monotonic())
                readable, _, _ = select.select([conn.fileno(), self._stop_read], [], [], wait)
                if self._stop_read in readable:
                    return
                if readable:
                    for notice in conn.notifies(timeout=0):
                        self._ring(notice.payload)
                if time.monotonic() >= last_seen + _HEARTBEAT:
                    self._queue._seen(conn, self._name)
                    self._queue._purge(conn)
                    last_seen = time.monotonic()
            except (psycopg.Error, QueueError, OSError) as exc:
                log.warning("the queue's wake-ups: %s; connecting again", exc)
                self._conn = None
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                readable, _, _ = select.select([self._stop_read], [], [], 1.0)
                if readable:
                    return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_write, b"!")
        self._thread.join(timeout=10)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.execute("DELETE FROM mmdf_deliverer WHERE name = %s", (self._name,))
            conn.close()
        for fd in (self._read, self._write, self._stop_read, self._stop_write):
            os.close(fd)


class _Doorbell:
    """The NOTIFY of new mail, sent by a thread of its own after the commits.

    Not on the way to the 250: a commit's transaction is followed by no
    other round trip before its outcome is told.  The wake-ups that come
    while one is being sent, and for :data:`_NOTIFY_GAP` after it, go out
    as one: at a connection per message the commits of a node come in
    small groups, and a NOTIFY for each cost a seventh of the group's own
    transaction in the database, a fifth in the committing process.  The
    connection is the thread's, with ``synchronous_commit`` off for good
    (a wake-up needs no flush, and PostgreSQL serialises the commits of
    transactions that notify), so a NOTIFY is one statement.  A wake-up
    is a hint: one lost (the database gone, the process ended by
    ``os._exit``) delays mail until the deliverers' next rescan, never
    strands it.  Where the engine has no NOTIFY, the statement fails and
    the connection is kept.
    """

    def __init__(self, queue: PostgresQueue) -> None:
        self._queue = queue
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Condition()
        self._wanted = False
        self._stopping = False

    def ring(self) -> None:
        if self._pid != os.getpid():  # new, or a fork's copy: the thread was the parent's
            self._pid, self._thread, self._ready = os.getpid(), None, threading.Condition()
        with self._ready:
            self._wanted = True
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="mmdf-notify", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            self._ready.notify()

    def close(self) -> None:
        """Send what is owed (within a few seconds), then stop the thread."""
        with self._ready:
            if self._pid != os.getpid() or self._thread is None:
                return
            self._stopping = True
            self._ready.notify()
            thread = self._thread
        thread.join(timeout=_NOTIFY_LAST)
        atexit.unregister(self.close)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while True:
                with self._ready:
                    self._ready.wait_for(lambda: self._wanted or self._stopping)
                    if not self._wanted:
                        self._thread = None  # the next ring starts another
                        return
                    self._wanted = False
                conn = self._send(conn)
                with self._ready:
                    self._ready.wait_for(lambda: self._stopping, timeout=_NOTIFY_GAP)
        finally:
            with self._ready:
                if self._thread is threading.current_thread():  # ended by an error
                    self._thread = None
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    def _send(self, conn: psycopg.Connection[Any] | None) -> psycopg.Connection[Any] | None:
        """One NOTIFY; on a connection lost, once more on a new one (the old
        one may lead to a primary gone).  The connection to keep."""
        for _ in range(2):
            try:
                if conn is None:
                    conn = self._queue._connect()
                    conn.execute("SET synchronous_commit TO OFF")
                conn.execute(f"NOTIFY {CHANNEL}, '{_NEW}'")
                return conn
            except QueueError as exc:  # no connection
                log.debug("no NOTIFY: %s", exc)
                return None
            except psycopg.Error as exc:
                log.debug("no NOTIFY: %s", exc)
                assert conn is not None
                if not conn.broken:
                    return conn  # the engine has no NOTIFY: the deliverers poll
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                conn = None
        return None


class PostgresQueue:
    """The queue in a PostgreSQL database (see the module's document).

    ``dsn``: libpq's connection string.  ``staging``: this node's folder
    for messages being received.  ``lease_seconds``: how long a lease
    lives unrenewed (the same on every node).  ``rescan_seconds``: how
    often a deliverer claims without a wake-up.  ``connect_timeout`` and
    ``statement_timeout`` (seconds) bound every database call, unless the
    dsn says otherwise.  ``settle_seconds``: how long a commit whose outcome
    a lost connection left unknown keeps trying to learn it.
    """

    def __init__(
        self,
        dsn: str,
        *,
        staging: Path,
        in_memory: int = IN_MEMORY,
        lease_seconds: float = 300.0,
        rescan_seconds: float = 30.0,
        connect_timeout: float = 10.0,
        statement_timeout: float = 60.0,
        settle_seconds: float = 60.0,
        connections: int = 16,
    ) -> None:
        self.dsn = dsn
        self.staging = staging
        self.in_memory = in_memory
        self.lease = timedelta(seconds=lease_seconds)
        self._rescan = rescan_seconds
        self._statement_timeout_ms = int(statement_timeout * 1000)
        self._settle_seconds = settle_seconds
        given = conninfo_to_dict(dsn)
        self._defaults: dict[str, Any] = {
            key: value
            for key, value in {
                "connect_timeout": max(1, round(connect_timeout)),
                "application_name": "mmdf-smtp",
                # A primary that vanished without a word is noticed.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 3,
                "keepalives_count": 3,
            }.items()
            if key not in given
        }
        self._pool = _Pool(self, connections)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._counter = itertools.count()
        self._tag_pid = 0
        self._tag = 0
        self._staging_ready = False
        self._doorbell = _Doorbell(self)
        # Messages a newer version wrote, passed by until then (the
        # caller's clock): see _leave_for_newer.
        self._newer: dict[str, datetime] = {}
        self._newer_lock = threading.Lock()

    # -- connections ---------------------------------------------------------

    def _connect(self, *, listen: bool = False) -> psycopg.Connection[Any]:
        """A new connection, autocommit (transactions are explicit), its
        statements bounded in time, timestamps in UTC.  Raises QueueError."""
        try:
            options = dict(self._defaults)
            if listen and "application_name" in options:
                options["application_name"] = "mmdf-smtp-listen"
            conn = psycopg.connect(self.dsn, autocommit=True, **options)
        except psycopg.Error as exc:
            self._pool.clear()
            raise _error("cannot connect to the queue's database", exc) from exc
        # No server-side prepared statements: a pipeline that failed midway
        # leaves psycopg's record of them wrong, and poolers (PgBouncer in
        # transaction mode) do not keep them.
        conn.prepare_threshold = None
        conn.add_notice_handler(_log_notice)
        try:
            conn.execute(
                f"SET statement_timeout = {self._statement_timeout_ms};"
                " SET TIME ZONE 'UTC'" + (f"; LISTEN {CHANNEL}" if listen else "")
            )
            if not self._schema_ready:
                self._ensure_schema(conn)
        except psycopg.Error as exc:
            conn.close()
            raise _error("cannot set up a connection to the queue's database", exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Create the tables in an empty database; refuse a newer schema."""
        with self._schema_lock:
            if self._schema_ready:
                return
            version = self._schema_version(conn)
            if version is None:
                try:
                    with conn.transaction():
                        for statement in _SCHEMA:
                            conn.execute(statement)
                        conn.execute(
                            "INSERT INTO mmdf_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                            (SCHEMA_VERSION,),
                        )
                except (pg_errors.UniqueViolation, pg_errors.DuplicateTable):
                    pass  # another node created it at the same moment
                version = self._schema_version(conn)
            if version != SCHEMA_VERSION:
                raise QueueError(
                    f"the queue's database has schema version {version},"
                    f" this software knows {SCHEMA_VERSION}"
                )
            self._schema_ready = True

    @staticmethod
    def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
        try:
            with conn.transaction():
                row = conn.execute("SELECT max(version) FROM mmdf_schema").fetchone()
        except pg_errors.UndefinedTable:
            return None
        return None if row is None or row[0] is None else int(row[0])

    def close(self) -> None:
        """Send the wake-up still owed, and close the connections kept for reuse."""
        self._doorbell.close()
        self._pool.clear()

    def _notify(self, conn: psycopg.Connection[Any], payload: str) -> None:
        """Ring the deliverers' doorbells.  A wake-up only: its own
        transaction, not waiting for a flush (a NOTIFY in the commit's
        transaction would serialise the commits), and where the engine has
        no NOTIFY, nothing (deliverers poll)."""
        try:
            conn.execute(
                f"BEGIN; SET LOCAL synchronous_commit TO OFF; NOTIFY {CHANNEL}, '{payload}'; COMMIT"
            )
        except psycopg.Error as exc:
            log.debug("no NOTIFY: %s", exc)
            if conn.info.transaction_status != pq.TransactionStatus.IDLE and not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")

    # -- the way in ----------------------------------------------------------

    def prepare(self) -> None:
        """Create the staging folder and, in an empty database, the schema."""
        if not self._staging_ready:
            self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._staging_ready = True
        try:
            with self._pool.connection():
                pass
        except QueueError as exc:
            raise OSError(errno.EIO, str(exc)) from exc

    def recover(self) -> list[str]:
        """Remove staging files whose writers died; purge old tombstones."""
        removed: list[str] = []
        try:
            names = os.listdir(self.staging)
        except FileNotFoundError:
            names = []
        for name in names:
            queue_id, _, pid = name.partition(".")
            if not _ID.fullmatch(queue_id) or not pid.isdigit():
                continue
            if int(pid) != os.getpid() and _alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.staging / name)
                removed.append(queue_id)
        try:
            with self._pool.connection() as conn:
                self._purge(conn)
        except (psycopg.Error, QueueError) as exc:
            log.warning("cannot purge the queue's old rows: %s", exc)
        return removed

    @staticmethod
    def _purge(conn: psycopg.Connection[Any]) -> None:
        """Remove the rows of messages gone over :data:`_GONE_KEPT` ago, and
        deliverers not seen for a day.  Deliverers run it now and then."""
        conn.execute(
            "DELETE FROM mmdf_message WHERE id IN (SELECT id FROM mmdf_message"
            " WHERE gone IS NOT NULL AND gone NOT LIKE %s AND arrived < now() - %s LIMIT %s)",
            (_SET_ASIDE + "%", _GONE_KEPT, _PURGE),
        )
        conn.execute("DELETE FROM mmdf_deliverer WHERE seen < now() - %s", (timedelta(days=1),))

    def new_id(self) -> str:
        """Hex: microseconds since the epoch (14), a tag drawn at random by
        each process (7), a counter (5).  Unique across the hosts sharing the
        database (pids are not: containers repeat them), sorted by time."""
        if self._tag_pid != os.getpid():
            self._tag, self._tag_pid = secrets.randbits(28), os.getpid()
            self._counter = itertools.count()
        count = next(self._counter) & 0xFFFFF
        return f"{time.time_ns() // 1000:014x}{self._tag:07x}{count:05x}"

    def open(self, envelope: Envelope, *, queue_id: str | None = None) -> PostgresWriter:
        if not self._staging_ready:
            try:
                self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise QueueError(f"cannot create {self.staging}: {exc.strerror}") from exc
            self._staging_ready = True
        return PostgresWriter(self, queue_id or self.new_id(), envelope, bytearray())

    def adopt(self, message: QueuedMessage, body: BinaryIO, state: DeliveryState | None) -> bool:
        """Take in a message stored elsewhere (see :meth:`.Queue.adopt`), in
        one transaction: its row (due when its ``state`` says), its chunks
        read from ``body`` one at a time, its recipients' states.  The
        row's insert does nothing where the id is taken, by a message
        queued, or gone within the hour (its row stays), or by a
        transaction still in flight, which it waits for: so a connection
        lost at the COMMIT of an earlier try, its outcome unknown, is
        settled by trying again.  That raises QueueError, and is not
        settled here: a tombstone would keep the message out for good."""
        if not _ID.fullmatch(message.id):
            raise QueueError(f"not a queue id: {message.id!r}")
        try:
            with self._pool.connection() as conn, conn.transaction():
                taken = conn.execute(
                    "INSERT INTO mmdf_message (id, envelope, size, held, due_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                    (
                        message.id,
                        envelope_to_text(message.envelope),
                        message.size,
                        message.held,
                        _due_of(state),
                    ),
                ).fetchone()
                if taken is None:
                    return False
                size = 0
                for seq in itertools.count():
                    piece = body.read(CHUNK)
                    if not piece:
                        break
                    conn.execute(_INSERT_CHUNK, (message.id, seq, piece))
                    size += len(piece)
                if size != message.size:
                    conn.execute(
                        "UPDATE mmdf_message SET size = %s WHERE id = %s", (size, message.id)
                    )
                if state is not None:
                    with conn.cursor() as cursor:
                        cursor.executemany(
                            "INSERT INTO mmdf_recipient (message_id, idx, state)"
                            " VALUES (%s, %s, %s)",
                            [
                                (message.id, i, json.dumps(entry.to_json(), ensure_ascii=False))
                                for i, entry in enumerate(state.recipients)
                            ],
                        )
        except psycopg.Error as exc:
            raise _error(f"cannot queue {message.id}", exc) from exc
        except OSError as exc:
            raise QueueError(f"cannot read {message.id}: {exc.strerror or exc}") from exc
        if not message.held:
            self._notify_new()
        return True

    def hand_over(self, writer: MessageWriter) -> bytes:
        assert isinstance(writer, PostgresWriter)
        return writer.hand_over()

    def take_over(self, token: bytes) -> PostgresWriter:
        kind, queue_id = token[:1], token[1:27].decode(errors="replace")
        rest = bytes(memoryview(token)[27:])
        if kind not in (_IN_TOKEN, _IN_FILE) or not _ID.fullmatch(queue_id):
            raise QueueError("not a message handed over")
        if kind == _IN_TOKEN:
            line, _, octets = rest.partition(b"\n")
            envelope = _envelope_or_error(line)
            return PostgresWriter(self, queue_id, envelope, bytearray(octets))
        name = rest.decode(errors="replace")
        if not re.fullmatch(rf"{queue_id}\.[0-9]+", name):
            raise QueueError("not a message handed over")
        try:
            with open(self.staging / name, "rb") as file:
                line = file.readline()
                size = os.fstat(file.fileno()).st_size - len(line)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.staging / name)
            raise QueueError(f"cannot open a staged message: {exc.strerror}") from exc
        envelope = _envelope_or_error(line.rstrip(b"\n"))
        return PostgresWriter(self, queue_id, envelope, bytearray(), staged=name, size=size)

    def take_back(self, writer: MessageWriter) -> bool:
        """Whether the message that ``writer`` handed over was committed, its
        taker being gone.  Its staging file goes either way.  The answer is
        final: a transaction of the dead taker still in flight either
        committed before it, or can no longer commit (see :meth:`_settle`)."""
        assert isinstance(writer, PostgresWriter)
        staged = [name for name in _listdir(self.staging) if name.startswith(writer.id + ".")]
        for name in staged:
            with contextlib.suppress(OSError):
                os.unlink(self.staging / name)
        committed = self._settle_or_assume_not(writer.id)
        if committed:
            self._notify_new()
        return committed

    def commit_all(self, writers: Sequence[MessageWriter]) -> list[QueueError | None]:
        """Commit messages in one transaction; for each, None once COMMIT
        returned, or the error after which nothing of it is queued.

        A connection that fails before COMMIT is tried again on a new one
        (after a failover, the promoted standby) until ``settle_seconds``
        pass; one lost at COMMIT is settled message by message.  A group the
        server refuses for one message's sake is committed one by one, so
        that the others are not held up by it.
        """
        results: list[QueueError | None] = [None] * len(writers)
        group: list[tuple[int, PostgresWriter]] = []
        for i, writer in enumerate(writers):
            assert isinstance(writer, PostgresWriter)
            if writer.is_open:
                group.append((i, writer))
            else:
                results[i] = QueueError("message already closed")
        if not group:
            return results
        try:
            self._commit_group([writer for _, writer in group])
        except _Unknown:
            for i, writer in group:
                if self._settle_or_assume_not(writer.id):
                    writer.committed()
                else:
                    writer.abort()
                    results[i] = QueueError("the queue's database went away at the commit")
            if any(results[i] is None for i, _ in group):
                self._notify_new()
            return results
        except _Refused as refused:
            if len(group) == 1:
                group[0][1].abort()
                results[group[0][0]] = refused.error
                return results
            for i, writer in group:
                results[i] = self.commit_all([writer])[0]
            return results
        except QueueError as exc:
            for i, writer in group:
                writer.abort()
                results[i] = exc
            return results
        for _, writer in group:
            writer.committed()
        self._notify_new()
        return results

    def _commit_group(self, writers: Sequence[PostgresWriter]) -> None:
        """One transaction for them all.  Raises _Unknown when the COMMIT's
        outcome is unknown, _Refused when the server refused the data,
        QueueError when nothing was committed for another reason."""
        deadline = time.monotonic() + self._settle_seconds
        while True:
            try:
                conn = self._pool.take()
            except QueueError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
                continue
            try:
                if all(writer.size <= CHUNK for writer in writers):
                    try:
                        self._send_small(conn, writers)
                    except psycopg.Error as exc:
                        if conn.broken:
                            raise _Unknown from exc
                        raise _Refused(_error("cannot queue the message", exc)) from exc
                    return
                try:
                    self._send_group(conn, writers)
                except psycopg.Error as exc:
                    if not conn.broken:
                        raise _Refused(_error("cannot queue the message", exc)) from exc
                    if time.monotonic() >= deadline:
                        raise _error("cannot queue the message", exc) from exc
                    continue  # nothing committed: again, on a new connection
                except OSError as exc:  # reading a staging file
                    raise QueueError(f"cannot read a staged message: {exc.strerror}") from exc
                try:
                    conn.execute("COMMIT")
                except psycopg.Error as exc:
                    if conn.broken:
                        raise _Unknown from exc
                    raise _Refused(_error("cannot queue the message", exc)) from exc
                return
            finally:
                self._pool.give_back(conn)

    @staticmethod
    def _send_small(conn: psycopg.Connection[Any], writers: Sequence[PostgresWriter]) -> None:
        """Messages of a chunk or less, in one statement: one round trip,
        and no BEGIN or COMMIT (a statement is a transaction of its own)."""
        with_octets = [writer for writer in writers if writer.size]
        conn.execute(
            _INSERT_SMALL,
            (
                [writer.id for writer in writers],
                [writer._envelope_text for writer in writers],
                [writer.size for writer in writers],
                [writer.into_hold for writer in writers],
                [writer.id for writer in with_octets],
                [next(writer.pieces()) for writer in with_octets],
            ),
        )

    @staticmethod
    def _send_group(conn: psycopg.Connection[Any], writers: Sequence[PostgresWriter]) -> None:
        """Everything but the COMMIT, pipelined: the round trips are paid
        once per :data:`_SYNC_EVERY` octets, not once per statement.  On an
        error the transaction is rolled back (unless the connection is lost)."""
        try:
            with conn.pipeline() as pipeline, conn.cursor() as cursor:
                cursor.execute("BEGIN")
                unsynced = 0
                for writer in writers:
                    cursor.execute(
                        _INSERT_MESSAGE,
                        (writer.id, writer._envelope_text, writer.size, writer.into_hold),
                    )
                    for seq, piece in enumerate(writer.pieces()):
                        cursor.execute(_INSERT_CHUNK, (writer.id, seq, piece))
                        unsynced += len(piece)
                        if unsynced >= _SYNC_EVERY:
                            pipeline.sync()
                            unsynced = 0
        except BaseException:
            if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise

    def _notify_new(self) -> None:
        """Tell the deliverers of new mail, soon after (:class:`_Doorbell`)."""
        self._doorbell.ring()

    def _settle_or_assume_not(self, queue_id: str) -> bool:
        """Whether a message whose commit's outcome is unknown was committed;
        if the database cannot be asked within ``settle_seconds``, not (a
        451: the client sends it again, perhaps twice; never lost)."""
        deadline = time.monotonic() + self._settle_seconds
        while True:
            try:
                return self._settle(queue_id)
            except (QueueError, psycopg.Error) as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "id=%s: cannot learn whether the message was committed (%s):"
                        " answered as not; it may be delivered twice",
                        queue_id,
                        exc,
                    )
                    return False
                time.sleep(0.5)

    def _settle(self, queue_id: str) -> bool:
        """Whether a message is committed, made final: a tombstone with its
        id is inserted, which waits for a transaction holding the id, and
        conflicts with a committed message (True), queued still or gone
        since (its row stays an hour).  If it goes in (False), a late insert
        of the message fails on it."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO mmdf_message (id, envelope, size, held, gone)"
                " VALUES (%s, '', 0, true, %s)"
                " ON CONFLICT (id) DO UPDATE SET gone = mmdf_message.gone RETURNING gone",
                (queue_id, _TAKEN_BACK),
            ).fetchone()
        return row is not None and row[0] != _TAKEN_BACK

    # -- the work ------------------------------------------------------------

    def start_delivering(self) -> PostgresWakeups:
        name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        conn = self._connect(listen=True)
        try:
            self._seen(conn, name)
        except psycopg.Error as exc:
            conn.close()
            raise _error("cannot register as a deliverer", exc) from exc
        return PostgresWakeups(self, conn, name)

    @staticmethod
    def _seen(conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute(
            "INSERT INTO mmdf_deliverer (name, seen) VALUES (%s, now())"
            " ON CONFLICT (name) DO UPDATE SET seen = excluded.seen",
            (name,),
        )

    def claim(
        self,
        limit: int,
        now: datetime,
        *,
        flush_all: bool = False,
        flush_ids: Collection[str] = (),
    ) -> list[Lease]:
        if limit <= 0:
            return []
        holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        with self._newer_lock:
            for queue_id, until in list(self._newer.items()):
                if until <= now:
                    del self._newer[queue_id]
            newer = list(self._newer)
        params = {
            "holder": holder,
            "lease": self.lease,
            "now": now,
            "flush_all": flush_all,
            "flush_ids": list(flush_ids),
            "limit": limit,
            "newer": newer,
        }
        try:
            with self._pool.connection() as conn, conn.transaction():
                claimed = conn.execute(_CLAIM, params).fetchall()
                states: dict[str, list[str]] = {}
                if claimed:
                    rows = conn.execute(
                        "SELECT message_id, state FROM mmdf_recipient"
                        " WHERE message_id = ANY(%s::text[]) ORDER BY message_id, idx",
                        ([row[0] for row in claimed],),
                    ).fetchall()
                    for message_id, state in rows:
                        states.setdefault(message_id, []).append(state)
        except psycopg.Error as exc:
            raise _error("cannot claim messages", exc) from exc
        claimed.sort(key=lambda row: (row[3], row[0]))
        leases: list[Lease] = []
        for queue_id, envelope_text, size, _ in claimed:
            try:
                envelope = envelope_from_text(envelope_text)
                entries = states.get(queue_id)
                state = (
                    DeliveryState([RecipientState.from_json(json.loads(e)) for e in entries])
                    if entries
                    else None
                )
            except NewerFormat as exc:
                warn_newer_format(queue_id, exc)
                self._leave_for_newer(queue_id, holder, now)
                continue
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                self._set_aside(queue_id, f"cannot be read: {exc!r}")
                continue
            leases.append(
                PostgresLease(self, queue_id, envelope, size=size, holder=holder, state=state)
            )
        return leases

    def next_due(self) -> datetime | None:
        try:
            with self._pool.connection() as conn:
                with self._newer_lock:
                    newer = list(self._newer)
                row = conn.execute(_NEXT_DUE, {"lease": self.lease, "newer": newer}).fetchone()
        except psycopg.Error as exc:
            raise _error("cannot read the queue", exc) from exc
        return None if row is None else row[0]

    def rescan_interval(self) -> float:
        return self._rescan

    def _open_body(self, queue_id: str, size: int) -> BinaryIO:
        return io.BufferedReader(_Chunks(self, queue_id, size), CHUNK)

    # -- the administrator ---------------------------------------------------

    def messages(self, *, held: bool = False) -> Iterator[QueuedMessage]:
        """In pages of :data:`_PAGE` by id (ids sort by arrival), each page
        a query of its own: nothing is held open between them."""
        after = ""
        while True:
            try:
                with self._pool.connection() as conn:
                    rows = conn.execute(
                        "SELECT id, envelope, size, held FROM mmdf_message"
                        f" WHERE held = %s AND {_LIVE} AND id > %s ORDER BY id LIMIT {_PAGE}",
                        (held, after),
                    ).fetchall()
            except psycopg.Error as exc:
                raise _error("cannot read the queue", exc) from exc
            for queue_id, envelope, size, is_held in rows:
                needs: tuple[str, ...] = ()
                try:
                    parsed = envelope_from_text(envelope)
                except NewerFormat as exc:
                    if exc.envelope is None:
                        log.warning("id=%s: unreadable envelope: %s", queue_id, exc)
                        continue
                    parsed, needs = exc.envelope, exc.needed
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    # One damaged row must not hide the others; claim sets it aside.
                    log.warning("id=%s: unreadable envelope: %r", queue_id, exc)
                    continue
                yield QueuedMessage(queue_id, parsed, size, held=is_held, needs=needs)
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def read_state(self, queue_id: str) -> DeliveryState | None:
        try:
            with self._pool.connection() as conn, conn.transaction():
                if not self._exists(conn, queue_id):
                    raise KeyError(queue_id)
                rows = conn.execute(
                    "SELECT state FROM mmdf_recipient WHERE message_id = %s ORDER BY idx",
                    (queue_id,),
                ).fetchall()
        except psycopg.Error as exc:
            raise _error("cannot read the queue", exc) from exc
        if not rows:
            return None
        return DeliveryState([RecipientState.from_json(json.loads(row[0])) for row in rows])

    @staticmethod
    def _exists(conn: psycopg.Connection[Any], queue_id: str) -> bool:
        row = conn.execute(
            f"SELECT 1 FROM mmdf_message WHERE id = %s AND {_LIVE}", (queue_id,)
        ).fetchone()
        return row is not None

    def open_message(self, queue_id: str) -> BinaryIO:
        try:
            with self._pool.connection() as conn:
                row = conn.execute(
                    f"SELECT size FROM mmdf_message WHERE id = %s AND {_LIVE}", (queue_id,)
                ).fetchone()
        except psycopg.Error as exc:
            raise _error("cannot read the queue", exc) from exc
        if row is None:
            raise KeyError(queue_id)
        return self._open_body(queue_id, row[0])

    def count_waiting(self) -> tuple[int, str | None]:
        """The messages queued and not held, and the smallest id among them
        (ids begin with the arrival time): for the metrics.  One query, on
        the claim's partial index, bounded by ``statement_timeout``.
        Raises QueueError."""
        try:
            with self._pool.connection() as conn:
                row = conn.execute(
                    f"SELECT count(*), min(id) FROM mmdf_message WHERE NOT held AND {_LIVE}"
                ).fetchone()
        except psycopg.Error as exc:
            raise _error("cannot count the queue", exc) from exc
        assert row is not None
        return int(row[0]), row[1]

    def set_aside(self) -> list[SetAside]:
        """Messages whose envelope or state could not be read (a transaction
        never leaves one torn: only a bug or a hand in the database does)."""
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(
                    "SELECT id, size, gone FROM mmdf_message WHERE gone LIKE %s ORDER BY id",
                    (_SET_ASIDE + "%",),
                ).fetchall()
        except psycopg.Error as exc:
            raise _error("cannot read the queue", exc) from exc
        return [SetAside(i, size, gone.removeprefix(_SET_ASIDE)) for i, size, gone in rows]

    @property
    def name(self) -> str:
        """The connection string without its password, for the administrator."""
        given = conninfo_to_dict(self.dsn)
        given.pop("password", None)
        return make_conninfo(**{k: str(v) for k, v in given.items() if v is not None})

    @property
    def set_aside_place(self) -> str:
        return f"the rows of mmdf_message marked '{_SET_ASIDE.strip()}' in {self.name}"

    @property
    def doorbell(self) -> str:
        return f"LISTEN {CHANNEL} in {self.name}"

    def open_set_aside(self, name: str) -> BinaryIO:
        """A message set aside, whole as stored: its envelope text, a line
        end, then its body.  Raises KeyError."""
        try:
            with self._pool.connection() as conn:
                row = conn.execute(
                    "SELECT envelope, size FROM mmdf_message WHERE id = %s AND gone LIKE %s",
                    (name, _SET_ASIDE + "%"),
                ).fetchone()
        except psycopg.Error as exc:
            raise _error("cannot read the queue", exc) from exc
        if row is None:
            raise KeyError(name)
        envelope, size = row
        body = self._open_body(name, size)
        return io.BufferedReader(_Prefixed(envelope.encode() + b"\n", body))

    def delete_set_aside(self, name: str) -> bool:
        try:
            with self._pool.connection() as conn, conn.transaction():
                deleted = conn.execute(
                    "DELETE FROM mmdf_message WHERE id = %s AND gone LIKE %s",
                    (name, _SET_ASIDE + "%"),
                ).rowcount
                if deleted:
                    conn.execute("DELETE FROM mmdf_chunk WHERE message_id = %s", (name,))
                    conn.execute("DELETE FROM mmdf_recipient WHERE message_id = %s", (name,))
        except psycopg.Error as exc:
            raise _error("cannot change the queue", exc) from exc
        if deleted:
            log.info("id=%s: set-aside message deleted by the administrator", name)
        return bool(deleted)

    def _leave_for_newer(self, queue_id: str, holder: str, now: datetime) -> None:
        """Give back a message a newer version wrote, its row as it was but
        for the lease, and pass it by for :data:`NEWER_WAIT`: this process's
        claims do not hand it out again and again, nor does :meth:`next_due`
        count it.  Not by pushing back its ``due_at``: the newer version,
        rolled forward, is to find it due at once."""
        with self._newer_lock:
            self._newer[queue_id] = now + NEWER_WAIT
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    "UPDATE mmdf_message SET lease_holder = NULL, lease_renewed = NULL"
                    " WHERE id = %s AND lease_holder = %s",
                    (queue_id, holder),
                )
        except (psycopg.Error, QueueError) as exc:
            # Its lease runs out by itself.
            log.warning("id=%s: cannot give it back: %s", queue_id, exc)

    def _set_aside(self, queue_id: str, reason: str) -> None:
        """Keep a message that cannot be read from delivery, for the administrator."""
        log.warning("id=%s: %s; set aside, not delivered", queue_id, reason)
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    "UPDATE mmdf_message SET gone = %s, lease_holder = NULL,"
                    " lease_renewed = NULL WHERE id = %s",
                    (_SET_ASIDE + reason, queue_id),
                )
        except (psycopg.Error, QueueError) as exc:
            log.warning("id=%s: cannot set it aside: %s", queue_id, exc)

    def _unleased(
        self, queue_id: str, wait: float, act: Callable[[psycopg.Connection[Any], bool], T]
    ) -> T:
        """``act(conn, held)`` on a message in a transaction that has its row
        locked, once no live lease is on it.  Raises KeyError, or
        MessageBusy after ``wait`` seconds of leases."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with self._pool.connection() as conn, conn.transaction():
                    row = conn.execute(
                        "SELECT held, lease_holder IS NOT NULL AND lease_renewed > now() - %s"
                        f" FROM mmdf_message WHERE id = %s AND {_LIVE} FOR UPDATE",
                        (self.lease, queue_id),
                    ).fetchone()
                    if row is None:
                        raise KeyError(queue_id)
                    held, leased = row
                    if not leased:
                        return act(conn, bool(held))
            except psycopg.Error as exc:
                raise _error("cannot change the queue", exc) from exc
            if time.monotonic() >= deadline:
                raise MessageBusy(queue_id)
            time.sleep(0.05)  # the lease's holder is at work: not under the row's lock

    def _set_held(self, queue_id: str, wait: float, held: bool) -> bool:
        """Hold (``held``) or release a message; False when it was so already."""

        def act(conn: psycopg.Connection[Any], was_held: bool) -> bool:
            if was_held == held:
                return False
            conn.execute(
                "UPDATE mmdf_message SET held = %s, due_at = NULL,"
                " lease_holder = NULL, lease_renewed = NULL WHERE id = %s",
                (held, queue_id),
            )
            return True

        if not self._unleased(queue_id, wait, act):
            return False
        if not held:
            self._notify_new()
        log.info("id=%s: %s by the administrator", queue_id, "held" if held else "released")
        return True

    def hold(self, queue_id: str, *, wait: float) -> bool:
        return self._set_held(queue_id, wait, held=True)

    def release(self, queue_id: str, *, wait: float) -> bool:
        return self._set_held(queue_id, wait, held=False)

    def delete(self, queue_id: str, *, wait: float) -> None:
        def act(conn: psycopg.Connection[Any], _: bool) -> None:
            conn.execute(f"UPDATE mmdf_message SET {_GONE} WHERE id = %s", (_DELETED, queue_id))
            _delete_parts(conn, queue_id)

        self._unleased(queue_id, wait, act)
        log.info("id=%s: deleted by the administrator", queue_id)

    def flush(self, queue_id: str | None = None) -> bool:
        if queue_id is not None and not _ID.fullmatch(queue_id):
            return False
        try:
            with self._pool.connection() as conn:
                row = conn.execute(
                    "SELECT count(*) FROM mmdf_deliverer WHERE seen > now() - %s",
                    (timedelta(seconds=_DELIVERER_GONE),),
                ).fetchone()
                self._notify(conn, _FLUSH if queue_id is None else _FLUSH_ONE + queue_id)
        except (psycopg.Error, QueueError) as exc:
            log.warning("cannot ask the deliverers to flush: %s", exc)
            return False
        return bool(row and row[0])


class _Unknown(Exception):
    """The connection was lost at COMMIT: the outcome is not known."""


class _Refused(Exception):
    """The server refused the group's data (not a lost connection)."""

    def __init__(self, error: QueueError) -> None:
        super().__init__(str(error))
        self.error = error


def _log_notice(notice: psycopg.errors.Diagnostic) -> None:
    """The server's warnings, such as "canceling wait for synchronous
    replication": a commit made on the primary only."""
    if notice.severity_nonlocalized == "WARNING":
        log.warning("the queue's database: %s %s", notice.message_primary, notice.message_detail)


def _envelope_or_error(line: bytes) -> Envelope:
    try:
        return envelope_from_text(line.decode())
    except (ValueError, TypeError, KeyError) as exc:
        raise QueueError(f"not a message handed over: {exc!r}") from exc


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if TYPE_CHECKING:

    def _is_a_backend(queue: PostgresQueue) -> QueueBackend:
        return queue  # mypy checks that the class keeps the interface


class _Prefixed(io.RawIOBase):
    """A few octets, then a stream: a set-aside message as one file."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._rest.close()
        super().close()
