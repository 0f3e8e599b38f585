"""Local mail delivered at commit time, in smtpd's commit process.

A message whose every recipient is a local Maildir's needs no queue: its
commit can write the copies deliver would write, and the 250 can wait
for them instead of for a queue file.  That saves deliver's whole work on
it (a claim, the queue file read back, its unlink and the syncs of
``queue/``), which shared the cores and the disk with smtpd.

:meth:`CommitDelivery.commit_all` takes the place of the spool's for a
group of messages, as the commit process gathered them:

1. each message is looked at (:meth:`_plan`): delivered here only if it
   is not held (quarantine), asks no NOTIFY=SUCCESS notice (deliver sends
   those), and every destination that the aliases and
   ``recipient_delimiter`` make of its recipients is a local mailbox,
   decided by deliver's own :class:`~.local.LocalRecipients`;
2. every copy of the group is written in its Maildir's ``tmp/`` and its
   write-out started, then each is fsynced, then each renamed into
   ``new/``, then each distinct ``new/`` is fsynced once
   (:class:`.maildir.Copy`): the
   names and header deliver would give them (queue id and entry index);
3. a message whose copies are all on stable storage is done: it never
   reaches the queue, and its 250 follows.  The others are committed to
   the spool as usual, together, and deliver does the rest; one with some
   copies linked gets a delivery state first that records those as
   delivered (so that deliver never writes them again, and looks for the
   others before writing them: :attr:`~..queue.Lease.resumed`), its file
   in the spool's ``tmp/`` before that, the sign of a commit under way
   that keeps a deliver starting meanwhile off the state
   (:meth:`~..queue.spool.Spool.forget_orphans`).

What a 250 promises is unchanged: the message is on stable storage, as
the copies in ``new/`` or as a queue file.  A crash before it may leave
copies of a message the client sends again, as a crash between a queue
file's commit and its 250 leaves a queued message: SMTP's known
duplicate (RFC 5321 6.1).  The commit process neither logs nor counts
(its descriptors and shared memory are the worker's): what it did goes
back with the outcome (:class:`Report`), and the worker logs and counts
it as deliver would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from ..config import Config, ConfigError
from ..queue import DELIVERED, DeliveryState, Envelope, MessageWriter, Queue, QueueError
from ..queue.spool import Spool, SpoolWriter
from . import local, maildir
from .local import LocalRecipients
from .nexthop import Outcome

log = logging.getLogger("mmdf_smtp.smtpd")

# A message for more mailboxes than this goes to the queue: deliver writes
# its copies concurrently, and its outcome stays small.
MOST_COPIES = 64


@dataclass(frozen=True, slots=True)
class Report:
    """What a commit delivered: for the worker to log and count."""

    copies: int  # copies on stable storage
    seconds: float  # from the message's arrival to its copies on disk
    lines: tuple[str, ...]  # log lines, deliver's

    def to_bytes(self) -> bytes:
        return "\n".join((f"{self.copies} {self.seconds:.6f}", *self.lines)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Report:
        first, *lines = data.decode(errors="replace").split("\n")
        copies, seconds = first.split()
        return cls(int(copies), float(seconds), tuple(lines))


# A message's outcome in the commit process: committed (None), committed
# with copies delivered (a Report), or why it was not.
Result = Exception | Report | None


@dataclass(slots=True)
class _Copy:
    index: int
    copy: maildir.Copy
    error: OSError | None = None
    linked: bool = False  # in new/


@dataclass(slots=True)
class _Plan:
    writer: SpoolWriter
    envelope: Envelope
    state: DeliveryState
    message: BinaryIO
    start: int
    copies: list[_Copy] = field(default_factory=list)
    state_written: bool = False

    @property
    def whole(self) -> bool:
        return all(c.linked for c in self.copies)


class CommitDelivery:
    """Delivers local mail at commit time into the Maildirs of ``recipients``,
    and commits everything else to ``spool``."""

    def __init__(
        self,
        recipients: LocalRecipients,
        spool: Spool,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.recipients = recipients
        self.spool = spool
        self._clock = clock

    def commit_all(self, writers: Sequence[MessageWriter]) -> list[Result]:
        """Deliver or commit each of ``writers``; for each, its outcome."""
        plans = [self._plan(writer) for writer in writers]
        copies = [c for plan in plans if plan is not None for c in plan.copies]
        several = len(copies) > 1
        for plan in plans:
            if plan is not None:
                self._write(plan, several=several)
        # Each step for all before the next: every fsync before any link,
        # so that one journal commit carries them all.
        for c in copies:
            if c.error is None:
                try:
                    c.copy.sync()
                except OSError as exc:
                    c.error = exc
        for c in copies:
            if c.error is None:
                try:
                    # The names are a new queue id's: none can be in new/
                    # yet, so a rename, which leaves no name in tmp/ to remove.
                    c.copy.move()
                    c.linked = True
                except OSError as exc:
                    c.error = exc
                    c.copy.abort()
        self._sync_new(copies)
        now = self._clock()
        results: list[Result] = [None] * len(writers)
        queued: list[int] = []
        for i, plan in enumerate(plans):
            if plan is None:
                queued.append(i)
                continue
            with contextlib.suppress(OSError):
                plan.message.close()
            report = self._settle(plan, now)
            if plan.whole:
                plan.writer.abort()  # delivered: nothing of it is queued
                results[i] = report
                continue
            if any(c.linked for c in plan.copies):
                try:
                    # Before the message: a crash in between leaves a state
                    # without its message, which deliver removes
                    # (forget_orphans); the other way round the copies
                    # would be written again.  The message's file goes to
                    # tmp/ first: a deliver starting in between keeps the
                    # state of a file there, a commit under way.
                    plan.writer.create_file()
                    self.spool.write_state(plan.writer.id, plan.state)
                    plan.state_written = True
                except QueueError as exc:
                    results[i] = exc  # its file could not be created
                    continue
                except OSError as exc:
                    plan.writer.abort()
                    results[i] = QueueError(f"cannot write a delivery state: {exc}")
                    continue
            results[i] = report
            queued.append(i)
        committed = self.spool.commit_all([writers[i] for i in queued]) if queued else []
        for i, error in zip(queued, committed, strict=True):
            if error is None:
                continue
            results[i] = error
            plan = plans[i]
            if plan is not None and plan.state_written:
                with contextlib.suppress(OSError):
                    os.unlink(self.spool.state / plan.writer.id)
        return results

    def _plan(self, writer: MessageWriter) -> _Plan | None:
        """The copies to write for ``writer``'s message; None: it goes to the queue."""
        if not isinstance(writer, SpoolWriter) or writer.into_hold or writer.claimed:
            return None
        try:
            envelope, message = writer.read_back()
        except (QueueError, ValueError):
            return None  # its commit says what is wrong with it
        state = self._destinations(envelope)
        if state is None:
            message.close()
            return None
        plan = _Plan(writer, envelope, state, message, message.tell())
        for i, entry in enumerate(state.recipients):
            assert entry.mailbox is not None
            folder = self.recipients.maildir_of(entry.mailbox)
            name = self.recipients.copy_name(envelope, writer.id, i)
            plan.copies.append(_Copy(i, maildir.Copy(folder, name)))
        return plan

    def _destinations(self, envelope: Envelope) -> DeliveryState | None:
        """The message's destinations when each is a local mailbox, and no
        notice of its delivery is asked for; otherwise None."""
        if any(notify and "SUCCESS" in notify.split(",") for notify in envelope.notify):
            return None  # RFC 3461: deliver sends the "delivered" notice
        state = self.recipients.expand(envelope)
        if not state.recipients or len(state.recipients) > MOST_COPIES:
            return None
        if any(e.mailbox is None or e.problem is not None for e in state.recipients):
            return None  # a next hop, or a bounce to send: deliver's
        return state

    def _write(self, plan: _Plan, *, several: bool) -> None:
        for c in plan.copies:
            entry = plan.state.recipients[c.index]
            header = local.header(plan.envelope, entry)
            try:
                plan.message.seek(plan.start)
                try:
                    c.copy.write(header, plan.message, start_writeback=several)
                except FileNotFoundError:
                    # A Maildir's first copy: made then, not looked for each time.
                    maildir.create(c.copy.maildir)
                    plan.message.seek(plan.start)
                    c.copy.write(header, plan.message, start_writeback=several)
            except OSError as exc:
                c.error = exc

    def _sync_new(self, copies: list[_Copy]) -> None:
        """Each ``new/`` that got a link fsynced once; a copy whose ``new/``
        could not be is not on stable storage: it counts as not written
        (deliver, resuming, finds it if it survives)."""
        folders: dict[Path, list[_Copy]] = {}
        for c in copies:
            if c.linked:
                folders.setdefault(c.copy.maildir, []).append(c)
        for folder, linked in folders.items():
            try:
                maildir.sync_new(folder)
            except OSError as exc:
                for c in linked:
                    c.linked = False
                    c.error = exc

    def _settle(self, plan: _Plan, now: datetime) -> Report:
        """The delivered entries' states, and the lines that say what became of each copy."""
        lines: list[str] = []
        for c in plan.copies:
            entry = plan.state.recipients[c.index]
            if c.linked:
                entry.status = DELIVERED
                entry.attempts = 1
                entry.last_try = now
                reply = local.written_reply(c.copy.name, written=True)
                entry.last_reply = str(Outcome(250, reply))
                lines.append(local.attempt_line(plan.writer.id, entry, "maildir"))
            else:
                # Left pending for deliver, which tries it at once and logs that.
                reason = c.error.strerror if c.error is not None else None
                lines.append(
                    f"id={plan.writer.id} to=<{entry.address}> not delivered at commit time"
                    f" ({reason or c.error}): queued for deliver"
                )
        copies = sum(c.linked for c in plan.copies)
        seconds = (now - plan.envelope.received).total_seconds()
        return Report(copies, max(seconds, 0.0), tuple(lines))


def commit_delivery(config: Config, queue: Queue) -> CommitDelivery | None:
    """What delivers local mail at commit time for ``queue`` in this process,
    if it may; None: every message goes to the queue.

    Only on the spool (a PostgreSQL queue promises a copy on other hosts
    before the 250, which a Maildir here does not), with ``[local]
    deliver_at_commit`` on, and only when this process owns the folder the
    Maildirs go in, as deliver does (started as root it writes them as
    ``user``, who is given that folder; otherwise as whoever started it).
    """
    if not config.local.deliver_at_commit or not isinstance(queue, Spool):
        return None
    if not _writes_as_deliver(config):
        log.info(
            "local mail is queued for deliver: this process (uid %d) does not own %s",
            os.geteuid(),
            maildir.base_of(config.local.maildir),
        )
        return None
    try:
        recipients = LocalRecipients(config)
    except ConfigError as exc:
        log.error("local mail is queued for deliver: %s", exc)
        return None
    return CommitDelivery(recipients, queue)


def _writes_as_deliver(config: Config) -> bool:
    """Whether the Maildirs' folder is this process's own: deliver writes
    there as its owner too, so the Maildirs keep one owner.  One owned by
    another account (Debian's ``/var/mail``, root's; a deliver run as an
    account of its own) leaves local mail to deliver, decided once here
    rather than found by a failed copy a message."""
    uid = os.geteuid()
    if uid == 0:
        return False  # a process serving clients is never root; deliver neither
    try:
        return maildir.base_of(config.local.maildir).stat().st_uid == uid
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            return False
    # Not there yet: smtpd and deliver started as root make it ``user``'s
    # (maildir.give_base); otherwise it is whoever writes first.
    if not config.user:
        return True
    try:
        return pwd.getpwnam(config.user).pw_uid == uid
    except KeyError:
        return False
