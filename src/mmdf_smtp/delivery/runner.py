"""The queue runner: one pass over the messages that are due.

For each message the first pass expands its recipients through the
aliases and writes that list as the message's delivery state, before any
delivery: an entry's place in it names the entry's Maildir file, so a
retry after a crash finds what was already delivered.  Then every
recipient due is tried (local ones into their Maildir, the others in one
transaction with the next hop), the failures that are final are
reported to the sender in one notification, and the state is replaced,
or, when every recipient is done, the message leaves the queue.

Order of the durable steps, and what a crash between them does:
notification queued, then state written (a crash repeats the
notification: at least once); Maildir file linked, then state written (a
crash is noticed by the file name: exactly once); next hop answered, then
state written (a crash sends again: at least once).

The runner holds a message's lock (:meth:`Spool.claim`) from before it
reads the state until the state is written or the message removed, so
that ``checkque`` never holds or deletes a message under it; a message
held or deleted before the lock is had is passed by.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from .. import metrics
from ..config import Config
from ..policy import Policy
from ..policy.aliases import Aliases, Destination, read_aliases
from ..queue import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    PENDING,
    DeliveryState,
    Envelope,
    QueueError,
    RecipientState,
    maildrop,
)
from ..queue.spool import Spool
from . import dsn, maildir, nexthop
from .nexthop import Outcome

log = logging.getLogger("mmdf_smtp.deliver")

Clock = Callable[[], datetime]
Sender = Callable[..., list[Outcome]]
NULL_SENDER = ""
DSN_CHANNEL = "deliver"  # the source channel recorded for notifications


@dataclass(frozen=True, slots=True)
class _Tried:
    index: int
    outcome: Outcome
    relay: str  # "maildir", "local" (no attempt possible), "none" (no next hop), or the next hop
    remote_mta: str | None = None  # the next hop's host


def backoff(attempts: int, *, first: int, longest: int) -> timedelta:
    """The wait after ``attempts`` tries: ``first`` seconds, doubled each try, up to ``longest``."""
    seconds = first * 2 ** min(max(attempts - 1, 0), 32)
    return timedelta(seconds=min(seconds, longest))


class Runner:
    """Delivers what is due in one spool under one configuration."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        clock: Clock = lambda: datetime.now(UTC),
        send: Sender = nexthop.send,
        pickup: Callable[[], object] | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """``pickup`` runs first in every pass and moves locally submitted
        mail into the queue; by default it is the maildrop's, whenever the
        configuration has the ``local`` channel that submit queues under.
        ``stopping`` is asked between messages, so that a stop finishes the
        message under way.

        Raises ConfigError when the aliases file cannot be read.
        """
        self.config = config
        self.spool = spool
        self._clock = clock
        self._send = send
        if pickup is None and "local" in config.channels:
            policy = Policy(config)  # tables read once per runner, not per pass
            pickup = partial(maildrop.pickup, spool, config, policy=policy)
        self._pickup = pickup
        self._stopping = stopping
        self._notices: list[str] = []
        # Next tries this runner wrote: their states need no reading until then.
        self._waiting: dict[str, datetime] = {}
        # A next hop that could not be reached, until when it is left alone,
        # and what its recipients are told meanwhile: like a dead destination
        # in Postfix's queue manager, so that a hop that is down costs one
        # connection timeout, not one for each message.
        self._hop_down: tuple[datetime, Outcome] | None = None
        table = read_aliases(config.local.aliases) if config.local.aliases else {}
        domains = config.local_domains
        self.aliases = Aliases(
            table,
            users=config.local.users,
            local_domains=domains,
            default_domain=domains[0] if domains else config.hostname,
            delimiters=config.deliver.recipient_delimiter,
        )

    def run(self, *, flush: bool = False, flush_ids: Collection[str] = ()) -> datetime | None:
        """One pass over what is due (everything deferred too, with ``flush``;
        the deferred recipients of the messages in ``flush_ids`` too).

        Returns when the earliest deferred recipient is next due, None when
        nothing waits.
        """
        if self._pickup is not None:
            self._pickup()
        if flush or flush_ids:
            self._hop_down = None  # the administrator asks for a try now
        due, self._waiting = self.spool.due(self._clock(), flush=flush, known=self._waiting)
        waiting = [queue_id for queue_id in flush_ids if queue_id in self._waiting]
        if waiting:
            due = sorted({*due, *waiting})
        log.debug("pass: %d messages due, %d waiting", len(due), len(self._waiting))
        self._notices.clear()
        # Notices queued by this pass are delivered by it too: the sender
        # hears of a failure at once, also under --once.
        for queue_id in itertools.chain(due, self._notices):
            if self._stopping():
                break
            try:
                next_try = self.deliver(queue_id, flush=flush or queue_id in flush_ids)
            except (OSError, QueueError) as exc:
                # The spool itself failed (full, unreadable): the message
                # stays as it was and is tried again after a while.
                log.error("id=%s: cannot deliver: %s", queue_id, exc)
                next_try = self._clock() + timedelta(seconds=self.config.deliver.retry_min)
            except Exception:
                # A bug must not stop the other messages' delivery.
                log.exception("id=%s: delivery failed", queue_id)
                next_try = self._clock() + timedelta(seconds=self.config.deliver.retry_min)
            if next_try is not None:
                self._waiting[queue_id] = next_try
            else:
                self._waiting.pop(queue_id, None)
        return min(self._waiting.values(), default=None)

    def deliver(self, queue_id: str, *, flush: bool = False) -> datetime | None:
        """Try the due recipients of one message; when its next try is due.

        Under the message's lock, from before its state is read until it is
        written: checkque waits for it to hold or delete the message.
        """
        claim = self.spool.claim(queue_id)
        if claim is None:
            return None  # held, deleted or delivered meanwhile
        with claim:
            return self._deliver(queue_id, flush=flush)

    def _deliver(self, queue_id: str, *, flush: bool) -> datetime | None:
        try:
            envelope = self.spool.envelope(queue_id)
        except KeyError:
            return None  # delivered and removed meanwhile
        except ValueError as exc:
            # Not whole (storage that lied about a flush): delivering it
            # would hand on a torn message, and retrying it blocks nothing
            # but fills the log.  The administrator decides (README, Queue).
            self.spool.set_aside(queue_id, str(exc))
            return None
        state = self.spool.read_state(queue_id)
        # Only a run that found a state on disk can follow one that crashed
        # after a Maildir delivery: a first run need not look for its files.
        retry = state is not None
        if state is None:
            state = self.expand(envelope)
            self.spool.write_state(queue_id, state)
        now = self._clock()
        due = [
            i
            for i, r in enumerate(state.recipients)
            if r.status == PENDING
            or (r.status == DEFERRED and (flush or r.next_try is None or r.next_try <= now))
        ]
        tried = [
            self._local(queue_id, envelope, state, i, retry=retry)
            for i in due
            if _is_local(state, i)
        ]
        remote = [i for i in due if not _is_local(state, i)]
        if remote:
            tried += self._remote(queue_id, envelope, state, remote)
        reports = [
            r for t in tried if (r := self._record(queue_id, envelope, state, t, now)) is not None
        ]
        for notice in dsn.grouped(reports):
            self._notify(queue_id, envelope, notice, now)
        if state.done:
            self.spool.remove(queue_id)
            log.info("id=%s removed: every recipient is done", queue_id)
            return None
        self.spool.write_state(queue_id, state)
        return state.next_try()

    def expand(self, envelope: Envelope) -> DeliveryState:
        """The message's destinations, in envelope order, aliases expanded."""
        entries: list[RecipientState] = []
        seen: set[str] = set()  # one copy per mailbox or address, as sendmail and Postfix
        for recipient in envelope.recipients:
            destinations = (
                self.aliases.expand(recipient)
                if self.aliases.is_local(recipient)
                else [Destination(recipient)]
            )
            for d in destinations:
                if d.key in seen:
                    continue
                seen.add(d.key)
                entries.append(
                    RecipientState(
                        recipient=recipient,
                        address=d.address,
                        mailbox=d.mailbox,
                        problem=d.problem,
                    )
                )
        return DeliveryState(entries)

    def maildir_of(self, mailbox: str) -> Path:
        return Path(self.config.local.maildir.replace("{user}", mailbox))

    def _local(
        self, queue_id: str, envelope: Envelope, state: DeliveryState, i: int, *, retry: bool
    ) -> _Tried:
        entry = state.recipients[i]
        if entry.problem is not None:
            return _Tried(i, Outcome(550, entry.problem), "local")
        assert entry.mailbox is not None
        folder = self.maildir_of(entry.mailbox)
        name = maildir.file_name(
            int(envelope.received.timestamp()), queue_id, i, self.config.hostname
        )
        header = f"Return-Path: <{envelope.sender}>\nDelivered-To: {entry.address}\n".encode()
        try:
            with self.spool.open_message(queue_id) as message:
                written = maildir.deliver(folder, name, header, message, look_first=retry)
        except OSError as exc:
            return _Tried(i, _maildir_failure(folder, exc), "maildir")
        text = f"2.0.0 Delivered to maildir as {name}"
        if not written:
            text = f"2.0.0 Found already delivered as {name}"
        return _Tried(i, Outcome(250, text), "maildir")

    def _remote(
        self, queue_id: str, envelope: Envelope, state: DeliveryState, due: list[int]
    ) -> list[_Tried]:
        hop = self.config.deliver.next_hop
        if hop is None:
            # A receiving MTA without a relay path holds such mail rather
            # than bouncing it at once: the administrator may add one.
            outcome = Outcome(451, "4.4.0 No next hop configured for non-local mail")
            return [_Tried(i, outcome, "none") for i in due]
        relay, host = nexthop.describe(hop), nexthop.host_of(hop)
        now = self._clock()
        if self._hop_down is not None and now < self._hop_down[0]:
            return [_Tried(i, self._hop_down[1], relay, host) for i in due]
        with self.spool.open_message(queue_id) as message:
            outcomes = self._send(
                hop,
                hostname=self.config.hostname,
                sender=envelope.sender,
                recipients=[state.recipients[i].address for i in due],
                message=message,
                smtputf8=envelope.smtputf8,
                body=envelope.body,
                **dsn.hop_parameters(envelope, [state.recipients[i].recipient for i in due]),
            )
        if outcomes and all(outcome.unreachable for outcome in outcomes):
            pause = self.config.deliver.retry_min
            # From the failure on: finding it out may have taken the connect bound.
            until = self._clock() + timedelta(seconds=pause)
            self._hop_down = (until, nexthop.suspended(outcomes[0]))
            log.warning("%s; delivery to it suspended for %d s", outcomes[0], pause)
        return [_Tried(i, o, relay, host) for i, o in zip(due, outcomes, strict=True)]

    def _record(
        self, queue_id: str, envelope: Envelope, state: DeliveryState, tried: _Tried, now: datetime
    ) -> dsn.Report | None:
        entry = state.recipients[tried.index]
        outcome = tried.outcome
        previous_try = entry.last_try
        entry.attempts += 1
        entry.last_reply = str(outcome)
        entry.last_try = now
        entry.next_try = None
        expires = envelope.received + timedelta(seconds=self.config.deliver.queue_lifetime)
        if not outcome.temporary and not outcome.permanent:
            entry.status = DELIVERED
        elif outcome.permanent or now >= expires:
            entry.status = BOUNCED
        else:
            entry.status = DEFERRED
            wait = backoff(
                entry.attempts,
                first=self.config.deliver.retry_min,
                longest=self.config.deliver.retry_max,
            )
            entry.next_try = min(now + wait, expires)
        asked = dsn.asked_of(envelope, entry.recipient)
        action = dsn.action_for(
            asked,
            entry.status,
            local=tried.relay in ("maildir", "local"),
            hop_offers_dsn=outcome.hop_dsn,
            delay_due=dsn.delay_due(
                envelope.received, previous_try, now, self.config.deliver.delay_warning
            ),
        )
        report = None
        if action is not None:
            report = dsn.Report(
                entry.recipient,
                entry.address,
                entry.last_reply,
                from_peer=outcome.from_peer,
                remote_mta=tried.remote_mta if outcome.from_peer else None,
                expired=entry.status == BOUNCED and not outcome.permanent,
                action=action,
                orcpt=asked.orcpt,
                retry_until=expires if action == "delayed" else None,
            )
        kind = _kind(envelope, tried.relay)
        metrics.count("mmdf_deliveries", (entry.status, kind))
        if entry.status == DELIVERED:
            metrics.observe(
                "mmdf_delivery_seconds", (kind,), (now - envelope.received).total_seconds()
            )
        log.info(
            "id=%s to=<%s>%s relay=%s attempts=%d status=%s (%s)%s",
            queue_id,
            entry.address,
            f" orig_to=<{entry.recipient}>" if entry.recipient != entry.address else "",
            tried.relay,
            entry.attempts,
            entry.status,
            entry.last_reply,
            f" next_try={entry.next_try.isoformat()}" if entry.next_try else "",
        )
        return report

    def _notify(
        self, queue_id: str, envelope: Envelope, reports: list[dsn.Report], now: datetime
    ) -> None:
        kind = reports[0].kind
        if envelope.sender == NULL_SENDER:
            log.info("id=%s: no %s notification: the sender is null", queue_id, kind)
            return
        with self.spool.open_message(queue_id) as message:
            returned, whole = dsn.returned_content(message, ret=envelope.ret, kind=kind)
        report = dsn.build(
            hostname=self.config.hostname,
            queue_id=queue_id,
            sender=envelope.sender,
            arrival=envelope.received,
            now=now,
            reports=reports,
            header=returned,
            whole=whole,
            envid=envelope.envid,
        )
        writer = self.spool.open(
            Envelope(
                sender=NULL_SENDER,
                recipients=(envelope.sender,),
                channel=DSN_CHANNEL,
                remote_host=self.config.hostname,
                remote_addr="",
                helo=self.config.hostname,
                received=now,
                smtputf8=not envelope.sender.isascii(),
                body="8BITMIME",
            )
        )
        try:
            writer.write(report)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self._notices.append(writer.id)
        metrics.count("mmdf_notices")
        log.info(
            "id=%s: %s notice of %d recipients queued as %s",
            queue_id,
            kind,
            len(reports),
            writer.id,
        )


def _kind(envelope: Envelope, relay: str) -> str:
    """For the metrics: a notification of ours, a local delivery, or one to the next hop."""
    if envelope.channel == DSN_CHANNEL and envelope.sender == NULL_SENDER:
        return "bounce"
    return "local" if relay in ("maildir", "local") else "nexthop"


def _is_local(state: DeliveryState, i: int) -> bool:
    entry = state.recipients[i]
    return entry.mailbox is not None or entry.problem is not None


def _maildir_failure(folder: Path, exc: OSError) -> Outcome:
    if exc.errno == errno.EDQUOT:
        return Outcome(452, f"4.2.2 Mailbox full: {folder}")
    if exc.errno == errno.ENOSPC:
        return Outcome(452, f"4.3.1 No space left for {folder}")
    return Outcome(451, f"4.3.0 Cannot write to {folder}: {exc.strerror or exc}")
