"""The queue: where a message lies once the channel has answered 250.

The protocol core never imports this package.  The session layer talks to
a :class:`Queue` only through the small interface below, so that other
backends can follow the spool directory of :mod:`.spool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    sender: str  # "" for the null reverse path
    recipients: tuple[str, ...]
    channel: str  # the source channel
    remote_host: str  # the client's name, or its address literal
    remote_addr: str  # the client's address, "" when unknown
    helo: str
    received: datetime  # aware, UTC
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; None without TLS
    smtputf8: bool = False
    body: str | None = None  # "7BIT" or "8BITMIME" from MAIL's BODY=
    # Local submission (submit): who handed the message in.  None for SMTP.
    submitter: str | None = None  # the login name
    submitter_uid: int | None = None
    # Why a filter (a milter's SMFIR_QUARANTINE) held the message for an
    # administrator: it is not delivered until released.  None: not held.
    quarantine: str | None = None
    # DSN (RFC 3461), as MAIL and RCPT gave it; all absent in queue files
    # written before.  ``ret``: "FULL" or "HDRS"; ``envid``: xtext decoded.
    ret: str | None = None
    envid: str | None = None
    # Parallel to ``recipients`` (or empty: nothing asked): NOTIFY as
    # "NEVER" or a list like "SUCCESS,DELAY", and ORCPT as
    # "addr-type;address" (xtext decoded); None where the RCPT had none.
    notify: tuple[str | None, ...] = ()
    orcpt: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        # Read back from JSON they are lists: tuples, so that envelopes compare and hash.
        for name in ("notify", "orcpt"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))


class QueueError(Exception):
    """A message could not be queued.  ``full`` is set when storage ran out."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class MessageWriter(Protocol):
    """One message on its way into the queue."""

    @property
    def id(self) -> str:
        """The queue id, known from the start (it goes into Received)."""
        ...

    @property
    def size(self) -> int:
        """The message octets written so far, trace header included: once
        committed, the size of the stored message as queued (checkque's
        size and the log's ``size=``)."""
        ...

    def write(self, data: bytes) -> None:
        """Append message octets.  May raise :class:`QueueError`."""
        ...

    def commit(self) -> None:
        """Make the message durable; returns only when it is on stable
        storage.  May raise :class:`QueueError`, after which nothing of the
        message remains."""
        ...

    def abort(self) -> None:
        """Forget the message.  Safe to call at any time, more than once."""
        ...


class Queue(Protocol):
    def recover(self) -> list[str]:
        """Clean up after writers that crashed; return what was removed.
        Run at start-up, before messages are received."""
        ...

    def prepare(self) -> None:
        """Create the queue's folders if missing.  Raises OSError."""
        ...

    def new_id(self) -> str:
        """A queue id for a message to come, unique in this queue (see :meth:`open`)."""
        ...

    def open(self, envelope: Envelope, *, queue_id: str | None = None) -> MessageWriter:
        """Start a new message.  The envelope is complete when the content
        starts (RFC 5321: DATA follows the last RCPT), so it is written
        first.  ``queue_id``: one :meth:`new_id` gave earlier, when the
        message had to be named before its envelope was known (a milter's
        ``i`` macro at MAIL); by default a new one.  May raise
        :class:`QueueError`."""
        ...

    def hand_over(self, writer: MessageWriter) -> bytes:
        """A message not yet committed, as octets that :meth:`take_over`, in
        another process on this queue, makes a writer of again (the daemon
        commits in a process of its own).  ``writer`` is done with after
        it.  May raise :class:`QueueError`."""
        ...

    def take_over(self, token: bytes) -> MessageWriter:
        """The writer of a message that :meth:`hand_over` gave.  May raise
        :class:`QueueError`, after which nothing of the message remains."""
        ...

    def take_back(self, writer: MessageWriter) -> bool:
        """After :meth:`hand_over`, when the process that took the message
        over has exited with no word of it: True if the message was
        committed; if not, nothing of it remains."""
        ...

    def commit_all(self, writers: Sequence[MessageWriter]) -> list[QueueError | None]:
        """Commit messages of this queue that ended together, sharing what
        can be shared (a directory sync); for each, None once it is on
        stable storage, or the error after which nothing of it remains."""
        ...
