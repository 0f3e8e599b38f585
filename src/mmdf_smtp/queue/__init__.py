"""The queue: where a message lies once the channel has answered 250.

The protocol core never imports this package.  Everything else talks to
a queue through the interfaces below, whatever its backend (the spool
directory of :mod:`.spool`; a database shared by several hosts):

- :class:`Queue`, the way in: the session, submit and the notices deliver
  writes put messages in through it, and a 250 comes after its commit;
  a message stored elsewhere (a spool being moved in, a submission
  picked up) comes in whole, id and state kept, by :meth:`Queue.adopt`;
- :class:`DeliveryQueue`, the work: deliver claims due messages under a
  :class:`Lease`, records its recipients' states through it, and completes
  the message once every recipient is done;
- :class:`QueueAdmin`, the administrator's view and commands (checkque).

A backend is one object that is all three (:class:`QueueBackend`).  The
rules every backend keeps are written here, in the methods' documents,
and checked for each backend by the same tests (``tests/queue_contract.py``).

Delivery, and what makes it exactly once where it can be:

1. ``claim`` hands out due messages, each under a lease that no other
   holder (thread, process or host) can have at the same time.  A lease
   ends when its holder ends it, or when its holder dies (the spool: the
   kernel drops a dead process's lock; a database: the lease's time runs
   out and is not renewed).
2. The first holder expands the recipients (aliases) and records that
   list before delivering anything; from then on an entry's index never
   changes, and a Maildir copy is named by it, so a later holder that
   finds a recorded state looks for copies a dead holder left before it
   delivers again (:attr:`Lease.resumed`).
3. After each attempt the holder records the states it changed.  A step
   taken but not recorded is taken again by the next holder: a Maildir
   copy is found, a next hop is sent to again (at least once there).
4. When every entry is done the holder completes the message: removed
   from the queue once, whoever else tries.  A holder whose lease ended
   under it is told so (:class:`LeaseLost`) at its next record or
   completion, and stops working the message.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

if TYPE_CHECKING:
    from ..config import Config


log = logging.getLogger("mmdf_smtp.queue")

# How the 250 reply names a message: "Submitted & queued (msg.<id>)".
ID_PREFIX = "msg."

# The field of a record (an envelope, a recipient's state, a maildrop
# request) that names the fields a reader must understand, as PNG's
# critical chunks and LDAP's critical controls do: a reader ignores a field
# it does not know, unless this list names it (see docs/design.md, "Queue
# format").
MUST_UNDERSTAND = "must_understand"


class NewerFormat(ValueError):
    """A record written by a newer version, naming in its ``must_understand``
    fields that this version does not know: it is neither read as if they
    were not there nor set aside, but left where it is, for the newer
    version to handle when it runs again.

    ``envelope``: for an envelope record, what this version reads of the
    fields it knows (for the administrator's listing), when it can.
    """

    def __init__(self, needed: Iterable[str], *, envelope: Envelope | None = None) -> None:
        self.needed = tuple(sorted(needed))
        self.envelope = envelope
        super().__init__(f"written by a newer version: it needs {', '.join(self.needed)}")


def known_fields(data: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """The fields of a record that this version reads: those in ``known``.

    Others are dropped, unless the record's ``must_understand`` names one:
    then it cannot be read by this version (:class:`NewerFormat`).
    ValueError for a ``must_understand`` that is not a list of names.
    """
    must = data.get(MUST_UNDERSTAND, [])
    if not isinstance(must, list) or not all(isinstance(name, str) for name in must):
        raise ValueError(f"{MUST_UNDERSTAND} is {must!r}, not a list of field names")
    needed = {name for name in must if name not in known and name != MUST_UNDERSTAND}
    if needed:
        raise NewerFormat(needed)
    return {name: value for name, value in data.items() if name in known}


def must_understand(data: dict[str, Any], critical: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its ``must_understand`` list: the ``critical`` fields
    set in it (not at their default, given in ``critical``); none listed,
    no list, so that the record stays as this version wrote it before."""
    named = [name for name, default in critical.items() if data.get(name, default) != default]
    if named:
        data[MUST_UNDERSTAND] = named
    return data


# How long a deliverer leaves a message a newer version wrote before it
# reads it again (an administrator may have rewritten it meanwhile): so
# that a deliverer does not spin on it, claim after claim.
NEWER_WAIT = timedelta(minutes=10)

_newer_warned: set[str] = set()
_newer_lock = threading.Lock()


def warn_newer_format(
    queue_id: str, exc: NewerFormat, *, key: str | None = None, where: str = "the queue"
) -> None:
    """Log, once a message a process, that it is left ``where`` it is: it is
    met again at every scan, and the log is not to fill up.  ``key``: what
    names the message across scans when its id does not (by default its id)."""
    with _newer_lock:
        if (key or queue_id) in _newer_warned:
            return
        _newer_warned.add(key or queue_id)
    log.warning("id=%s: %s; left in %s", queue_id, exc, where)


def queue_id_of(text: str) -> str:
    """A queue id as an administrator may give it: bare, or as the 250
    reply names it (``msg.<id>``)."""
    return text.removeprefix(ID_PREFIX)


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
    # Whether every line of the stored message ends in CRLF.  This version's
    # writers make it so (the SMTP core refuses a bare line end; submit, a
    # milter's changes and the notices convert theirs), and a next hop then
    # gets the message without its line ends being looked at.  False (a
    # queue file from before): they may be LF (CONTRACT.md), and are made CRLF.
    crlf: bool = False

    def __post_init__(self) -> None:
        # Read back from JSON they are lists: tuples, so that envelopes compare and hash.
        for name in ("notify", "orcpt"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def to_data(self) -> dict[str, Any]:
        """The envelope as a JSON object, in the queue's format (both
        backends'), its ``must_understand`` listing :data:`ENVELOPE_CRITICAL`
        fields that are set."""
        # Field by field, not dataclasses.asdict: that deep-copies, once a message.
        data: dict[str, Any] = {name: getattr(self, name) for name in ENVELOPE_FIELDS}
        data["recipients"] = list(self.recipients)
        data["received"] = self.received.isoformat()
        return must_understand(data, ENVELOPE_CRITICAL)

    @classmethod
    def from_data(cls, data: Any) -> Envelope:
        """The envelope of a JSON object :meth:`to_data` (of this version or
        another) wrote.  A field this version does not know is ignored,
        unless its ``must_understand`` names it: :class:`NewerFormat`.
        ValueError, saying why, for anything else that is not an envelope.
        """
        if not isinstance(data, dict):
            raise ValueError(f"not an envelope: {type(data).__name__}, not an object")
        try:
            known = known_fields(data, _ENVELOPE_NAMES)
        except NewerFormat as exc:
            # What it needs may be what keeps this version from reading the rest.
            with contextlib.suppress(ValueError):
                exc.envelope = cls._of_known(data)
            raise
        return cls._of_known(known)

    @classmethod
    def _of_known(cls, data: Mapping[str, Any]) -> Envelope:
        try:
            known = {name: value for name, value in data.items() if name in _ENVELOPE_NAMES}
            known["recipients"] = tuple(known["recipients"])
            known["received"] = datetime.fromisoformat(known["received"])
            return cls(**known)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not an envelope: {exc!r}") from exc


# In the order they are written: a file's envelope line stays as it was.
ENVELOPE_FIELDS = tuple(field.name for field in fields(Envelope))
_ENVELOPE_NAMES = frozenset(ENVELOPE_FIELDS)
# The envelope's fields that a reader must not ignore when they are set,
# with their defaults (docs/design.md, "Queue format"): a quarantined
# message ignored would be delivered; DSN's fields ignored send notices the
# sender did not ask for, or withhold those asked for (RFC 3461, section 5).
ENVELOPE_CRITICAL: Mapping[str, Any] = {
    "quarantine": None,
    "ret": None,
    "envid": None,
    "notify": (),
    "orcpt": (),
}


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    envelope: Envelope
    # Octets of the stored message as queued: the trace header(s) we
    # prepended included, the envelope line not (the log's size=, too).
    size: int
    held: bool = False  # held by the administrator or quarantined: not delivered until released
    # Fields a newer version wrote that this one must understand but does
    # not (:class:`NewerFormat`): the message is left in the queue, undelivered.
    needs: tuple[str, ...] = ()


class MessageBusy(Exception):
    """A deliverer holds the message's lease: it cannot be acted on now."""


PENDING = "pending"  # not tried yet
DEFERRED = "deferred"  # tried; tried again at next_try
DELIVERED = "delivered"
BOUNCED = "bounced"  # failed for good; the sender was told, unless the null sender
FINAL = frozenset({DELIVERED, BOUNCED})


@dataclass(slots=True, kw_only=True)
class RecipientState:
    """Where one destination of a message stands.

    ``recipient`` is the envelope recipient, ``address`` what it became
    after alias expansion; ``mailbox`` the local user whose Maildir takes
    it (None: the next hop).  ``problem`` is a reason known before any
    attempt (no such user, an alias loop).
    """

    recipient: str
    address: str
    mailbox: str | None = None
    problem: str | None = None
    status: str = PENDING  # pending | deferred | delivered | bounced
    attempts: int = 0
    last_reply: str = ""
    last_try: datetime | None = None
    next_try: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def to_json(self) -> dict[str, Any]:
        # No field of today's state is listed in must_understand: each is in
        # every state a version that knows the rule reads (docs/design.md).
        data = asdict(self)
        for key in ("last_try", "next_try"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data

    @classmethod
    def from_json(cls, data: Any) -> RecipientState:
        """A state :meth:`to_json` wrote, by the rule of ``must_understand``
        (:func:`known_fields`): :class:`NewerFormat`, or ValueError, TypeError
        or KeyError for one that is not a state."""
        if not isinstance(data, dict):
            raise ValueError(f"not a recipient's state: {data!r}")
        known = known_fields(data, _STATE_FIELDS)
        for key in ("last_try", "next_try"):
            if known.get(key) is not None:
                known[key] = datetime.fromisoformat(known[key])
        return cls(**known)


_STATE_FIELDS = frozenset(field.name for field in fields(RecipientState))


@dataclass(slots=True)
class DeliveryState:
    """The delivery state of one message: a destination per entry, in order.

    The order is fixed when the state is first written; an entry's index
    names its Maildir file, so that a retry finds what a crash left.
    """

    recipients: list[RecipientState] = field(default_factory=list)

    @classmethod
    def untouched(cls, envelope: Envelope) -> DeliveryState:
        """What a message deliver has not seen yet looks like: all pending."""
        return cls([RecipientState(recipient=r, address=r) for r in envelope.recipients])

    @property
    def done(self) -> bool:
        return all(r.done for r in self.recipients)

    def due(self, now: datetime) -> bool:
        return any(
            r.status == PENDING or (r.status == DEFERRED and (r.next_try or now) <= now)
            for r in self.recipients
        )

    def next_try(self) -> datetime | None:
        tries = [r.next_try for r in self.recipients if r.status == DEFERRED and r.next_try]
        return min(tries, default=None)

    def to_bytes(self) -> bytes:
        data = {"recipients": [r.to_json() for r in self.recipients]}
        return json.dumps(data, ensure_ascii=False, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> DeliveryState:
        """A state :meth:`to_bytes` wrote, by the rule of ``must_understand``
        for the whole and for each entry (:class:`NewerFormat`); ValueError,
        TypeError or KeyError for what is not one."""
        whole = json.loads(data)
        if not isinstance(whole, dict):
            raise ValueError("not a delivery state: not an object")
        entries = known_fields(whole, ("recipients",))["recipients"]
        return cls([RecipientState.from_json(entry) for entry in entries])


class QueueError(Exception):
    """A message could not be queued.  ``full`` is set when storage ran out."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class LeaseLost(QueueError):
    """The lease ended before this step (it ran out, and another deliverer
    may hold the message now): what was not recorded is done again by the
    next holder.  The holder stops working the message."""


class DelivererRunning(QueueError):
    """The backend allows one deliverer at a time (the spool) and another runs."""


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

    def adopt(self, message: QueuedMessage, body: BinaryIO, state: DeliveryState | None) -> bool:
        """Take in a message stored elsewhere (another queue; a submission
        pickup has written out), as it stands there: its id, envelope,
        held flag and recorded delivery ``state`` (None: deliver has not
        seen it), its octets streamed from ``body``, all in one commit.
        False, and nothing written, when this queue holds a message of
        that id, or held one lately (a database keeps a delivered
        message's id an hour): so that whoever adopts and then removes its
        own copy, and crashes between the two, adopts again without a
        duplicate.  May raise :class:`QueueError`, after which nothing of
        the message remains."""
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


@dataclass(frozen=True, slots=True)
class Wakeup:
    """What woke a deliverer: new mail, or an administrator asking for a try now."""

    new_mail: bool = False
    flush_all: bool = False  # every deferred recipient is due now (postqueue -f)
    flush_ids: frozenset[str] = frozenset()  # these messages' deferred recipients are due now


class Wakeups(Protocol):
    """A deliverer's doorbell: readable when :meth:`drain` has something to say.

    A file descriptor, so that a selector or an event loop waits on it
    beside signals and sockets.  It is a hint, never the only way work is
    found: a deliverer also claims when the earliest deferred message is
    due (:meth:`DeliveryQueue.next_due`) and at least every
    :meth:`DeliveryQueue.rescan_interval` seconds, so that a wake-up lost
    (a full socket, a dropped database connection) delays mail, never
    strands it.
    """

    def fileno(self) -> int: ...

    def drain(self) -> Wakeup:
        """Everything that came since the last drain, merged; never blocks."""
        ...

    def close(self) -> None: ...


class Lease(Protocol):
    """One message claimed by one deliverer, until :meth:`end`.

    Methods are blocking and bounded in time (a database call has its
    timeout); a deliverer on an event loop runs them in a thread.
    """

    @property
    def id(self) -> str: ...

    @property
    def envelope(self) -> Envelope: ...

    @property
    def state(self) -> DeliveryState | None:
        """The recipients' states as last recorded; None before the first record."""
        ...

    @property
    def resumed(self) -> bool:
        """Whether a holder before this one may have delivered without
        recording it (a state was recorded; on the spool also a message
        queued before this deliverer started, or given back unrecorded):
        Maildir copies are looked for before they are written."""
        ...

    def open_message(self) -> BinaryIO:
        """The stored message (trace header first, no envelope), from its
        start, streamed: never whole in memory."""
        ...

    def renew(self) -> None:
        """Keep the lease through a long step (a large message to a slow
        hop).  A backend whose leases end only with their holder does
        nothing.  Raises :class:`LeaseLost`."""
        ...

    def record(self, state: DeliveryState, changed: Collection[int] | None = None) -> None:
        """Make ``state`` durable.  The first record fixes the list of
        destinations (its order and length never change after); later
        ones give the indexes of the entries ``changed`` (None: all), and a
        backend may write only those.  Raises :class:`LeaseLost`, or
        :class:`QueueError` when storage fails (nothing recorded)."""
        ...

    def complete(self) -> None:
        """Every recipient is done: take the message out of the queue,
        durably, once.  Ends the lease.  Raises :class:`LeaseLost` when
        the lease ended first (the holder then does nothing more: the next
        holder finds the states and completes it)."""
        ...

    def end(self, *, not_before: datetime | None = None) -> None:
        """Give the message back, due again when its recorded state says
        (its earliest deferred recipient), and not before ``not_before``
        (after a failure that recorded nothing, so that it is not claimed
        again at once).  Safe to call more than once, after
        :meth:`complete`, and after :class:`LeaseLost`."""
        ...


class DeliveryQueue(Protocol):
    """The queue as deliverers see it: due messages, claimed under leases."""

    def start_delivering(self) -> Wakeups:
        """Become a deliverer of this queue, for the life of the process.
        Raises :class:`DelivererRunning` where one deliverer at a time is
        the rule and another runs."""
        ...

    def claim(
        self,
        limit: int,
        now: datetime,
        *,
        flush_all: bool = False,
        flush_ids: Collection[str] = (),
    ) -> list[Lease]:
        """Up to ``limit`` messages due at ``now`` that nobody holds, each
        under a new lease; the longest due first.  Due: deliver has not
        seen it, or a recipient is pending, or deferred with its next try
        at or before ``now`` (any deferred one with ``flush_all``, or for
        the messages of ``flush_ids``).  Never a held (quarantined) one.
        A message that cannot be read whole is set aside, logged, and not
        handed out.  Costs in proportion to ``limit``, not to the queue's
        length: a queue of a hundred thousand messages is claimed from as
        cheaply as one of ten, and memory stays bounded whatever its length.
        """
        ...

    def next_due(self) -> datetime | None:
        """When the earliest message nobody holds is next due (None:
        nothing waits), as far as this deliverer knows: for how long it
        may sleep."""
        ...

    def rescan_interval(self) -> float:
        """The longest a deliverer waits before it claims again without a
        wake-up, in seconds."""
        ...


@dataclass(frozen=True, slots=True)
class SetAside:
    """A file that could not be read whole, kept for the administrator (the spool's corrupt/)."""

    name: str
    size: int
    reason: str


class QueueAdmin(Protocol):
    """The queue as the administrator sees it (checkque)."""

    @property
    def name(self) -> str:
        """The queue in the administrator's words: the spool's directory; a
        database's connection string, its password left out."""
        ...

    @property
    def set_aside_place(self) -> str:
        """Where what :meth:`set_aside` lists is kept (the spool's corrupt/)."""
        ...

    @property
    def doorbell(self) -> str:
        """Where deliverers hear :meth:`flush` (the spool's deliver.sock), to
        name it when none listens."""
        ...

    def messages(self, *, held: bool = False) -> Iterator[QueuedMessage]:
        """The queued messages (the held ones with ``held``), in arrival order, streamed."""
        ...

    def read_state(self, queue_id: str) -> DeliveryState | None:
        """A message's recorded recipients' states (None: deliver has not
        seen it).  Raises KeyError for a message not in the queue."""
        ...

    def open_message(self, queue_id: str) -> BinaryIO:
        """A queued or held message, as :meth:`Lease.open_message` gives
        it.  Raises KeyError."""
        ...

    def set_aside(self) -> list[SetAside]:
        """What could not be read whole; a backend that never tears a
        message has none."""
        ...

    def open_set_aside(self, name: str) -> BinaryIO:
        """One of :meth:`set_aside`'s, whole, as it was found (it may have
        no envelope): for the administrator to look at.  Raises KeyError."""
        ...

    def delete_set_aside(self, name: str) -> bool:
        """Remove one of :meth:`set_aside`'s for good; False when there is
        none of that name."""
        ...

    def hold(self, queue_id: str, *, wait: float) -> bool:
        """Keep a message from delivery until :meth:`release`; False when it
        was held already.  Never under a deliverer's lease: waits up to
        ``wait`` seconds for it to end, then raises :class:`MessageBusy`.
        Raises KeyError for a message not in the queue."""
        ...

    def release(self, queue_id: str, *, wait: float) -> bool:
        """Make a held message deliverable again (due at once); False when
        it was not held.  Raises as :meth:`hold`."""
        ...

    def delete(self, queue_id: str, *, wait: float) -> None:
        """Take a message out of the queue for good, held or not, without
        a notice.  Raises as :meth:`hold`."""
        ...

    def flush(self, queue_id: str | None = None) -> bool:
        """Ask the deliverers to try a message's deferred recipients now
        (every message's with None); False when no deliverer listens."""
        ...


class QueueBackend(Queue, DeliveryQueue, QueueAdmin, Protocol):
    """A queue backend: the way in, the work, and the administrator's view."""


def open_backend(config: Config, *, in_memory: int = 0) -> QueueBackend:
    """The queue the configuration names (``[queue] backend``).

    ``in_memory``: the octets a message being received may reach before
    it is written to storage (smtpd's sessions: the spool's ``IN_MEMORY``).
    The database backend is imported only when asked for, so that a site
    on the spool needs no database driver.  Raises ConfigError when the
    backend cannot be had.
    """
    from ..config import ConfigError

    if config.queue.backend == "postgresql":
        assert config.queue.dsn is not None  # the configuration requires it
        try:
            module = importlib.import_module(".postgres", __name__)
        except ImportError as exc:
            missing = (
                "it is not part of this installation"
                if exc.name == f"{__name__}.postgres"
                else f"it needs {exc.name or exc}"
            )
            raise ConfigError(
                f'{config.source}: queue.backend: "postgresql" cannot be used: {missing}'
            ) from None
        backend: QueueBackend = module.PostgresQueue(
            config.queue.dsn, staging=config.spool, lease_seconds=config.queue.lease_seconds
        )
        return backend
    from .spool import Spool

    return Spool(config.spool, in_memory=in_memory)
