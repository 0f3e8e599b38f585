"""The queue runner: deliveries under way at once, each message under a lease.

The runner claims due messages from the queue (:class:`DeliveryQueue`),
each under a lease that no one else holds meanwhile, and works each in
two steps on a pool of threads.  The first expands the recipients
through the aliases and records that list as the message's delivery
state, before any delivery (an entry's place in it names the entry's
Maildir file, so a retry after a crash finds what was already
delivered), then delivers the local recipients into their Maildirs and
records that.  A message that no deliverer can have tried before (on the
spool: one that came after this deliverer started, and was not given
back unrecorded) skips the first record: its Maildir names cannot be
taken yet; its state is recorded once, after the attempt, and not at all
when the attempt finishes it (the commonest case: two fsyncs and an
unlink a message fewer).  A crash in that attempt leaves no state, and
the next deliverer, which counts the message among those queued before
it started, looks for each copy before it writes it.  Such a message
whose every destination is the next hop's has nothing to do in the
first step but find them: that is done where it is claimed, not in the
pool.  The second, for the recipients left for the next hop,
waits for a free place among the hop's ``destination_concurrency_limit``
(never more than ``concurrency`` less one), so that a slow or dead hop
holds only those places: local mail and new mail go on beside it.  The
failures that are final are reported to the sender, one notification a
step; when every recipient is done, the message leaves the queue.

Why threads: deliver's time goes to fsync (half of it on one message at a
time; three a local message now, five before) and to the next hop's replies, both spent outside
the interpreter's lock; threads let the fsyncs of many messages share
journal commits, and their Python work (about 2 ms a message) is shared
out by the one lock.

Order of the durable steps, and what a crash between them does:
notification queued, then state recorded (a crash repeats the
notification: at least once); Maildir file linked, then state recorded
(a crash is noticed by the file name, looked for first when the lease is
``resumed``: exactly once); next hop answered, then state recorded (a
crash sends again: at least once).

The lease (on the spool, a flock on the message's file) is held from
before the state is read until it is recorded or the message removed,
so that ``checkque`` never holds or deletes a message under a delivery.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

from .. import metrics
from ..config import Config
from ..policy import Policy
from ..queue import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    PENDING,
    DeliveryQueue,
    DeliveryState,
    Envelope,
    Lease,
    LeaseLost,
    Queue,
    QueueError,
    Wakeups,
    maildrop,
    open_backend,
)
from . import dsn, local, maildir, nexthop
from .local import LocalRecipients
from .nexthop import Outcome

log = logging.getLogger("mmdf_smtp.deliver")

Clock = Callable[[], datetime]
Sender = Callable[..., list[Outcome]]
NULL_SENDER = ""
DSN_CHANNEL = "deliver"  # the source channel recorded for notifications
# Leases held waiting for the next hop, per place of ``concurrency``: a
# backlog for a slow hop, bounded, so that new claims always find room.
_BACKLOG_PER_SLOT = 4
# How long a message whose turn for a full hop's backlog did not come
# waits before it is claimed again (its local recipients are done).
HOP_BUSY_WAIT = timedelta(seconds=5)
# How long a hop may take no step at all before it counts as stalled.
HOP_STALL = 1.0
# A queue that cannot be reached (a database primary gone, its standby not
# yet promoted) is asked again after this long; the deliveries under way go on.
QUEUE_RETRY = timedelta(seconds=1)
# Renewals a lease gets within its lifetime while a send runs: one that
# fails (the database slow or failing over) leaves time for the next.
_RENEWALS_A_LEASE = 3


@dataclass(frozen=True, slots=True)
class _Tried:
    index: int
    outcome: Outcome
    relay: str  # "maildir", "local" (no attempt possible), "none" (no next hop), or the next hop
    remote_mta: str | None = None  # the next hop's host


@dataclass(slots=True)
class _Work:
    """One claimed message between its steps."""

    lease: Lease
    remote: list[int] = field(default_factory=list)  # entries left for the next hop
    state: DeliveryState | None = None  # as the first step left it
    unrecorded: bool = False  # no state written yet: the next record is the whole list
    finished: bool = False  # the lease is ended or the message completed
    to_hop: bool = False  # the step that ran was the next hop's


def backoff(attempts: int, *, first: int, longest: int) -> timedelta:
    """The wait after ``attempts`` tries: ``first`` seconds, doubled each try, up to ``longest``."""
    seconds = first * 2 ** min(max(attempts - 1, 0), 32)
    return timedelta(seconds=min(seconds, longest))


class DeliveryBackend(Queue, DeliveryQueue, Protocol):
    """What the runner needs of a queue: the work, the way in for its
    notifications, and a message by its id (to quote in them)."""

    def open_message(self, queue_id: str) -> BinaryIO: ...


def open_queue(config: Config) -> DeliveryBackend:
    """The queue deliver works, as the configuration names it (``[queue]``).
    Raises ConfigError when that backend cannot be had."""
    return open_backend(config)


class Runner:
    """Delivers what is due in one queue under one configuration."""

    def __init__(
        self,
        config: Config,
        spool: DeliveryBackend,
        *,
        clock: Clock = lambda: datetime.now(UTC),
        send: Sender | None = None,
        pickup: Callable[[], object] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        security: nexthop.Security | None = None,
    ) -> None:
        """``pickup`` runs at the start of :meth:`run` and on new mail, and
        moves locally submitted mail into the queue; by default it is the
        maildrop's, whenever the configuration has the ``local`` channel
        that submit queues under.  ``stopping`` is asked between steps: a
        stop finishes the deliveries under way and claims no more.
        ``send``: the next hop's client (by default one that keeps its
        connections for the next message, :class:`nexthop.Connections`).
        ``security``: the next hop's TLS and AUTH, as
        :func:`nexthop.security_of` makes them (by default, now).

        Raises ConfigError when the aliases file, the next hop's password
        file or its trusted CAs cannot be read.
        """
        self.config = config
        if security is None:
            security = (
                nexthop.security_of(config)
                if config.deliver.next_hop is not None
                else nexthop.OPPORTUNISTIC
            )
        self.security = security
        self.spool = spool
        self._clock = clock
        self.connections: nexthop.Connections | None = None
        if send is None:
            self.connections = nexthop.Connections(
                idle=config.deliver.connection_cache_time,
                reuse=config.deliver.connection_reuse_limit,
            )
            send = self.connections.send
        self._send = send
        if pickup is None and "local" in config.channels:
            from ..queue.spool import Spool

            policy = Policy(config)  # tables read once per runner, not per pass
            if isinstance(spool, Spool):
                pickup = partial(maildrop.pickup, spool, config, policy=policy)
            else:
                # The maildrop is a folder of this host's spool; what it
                # holds goes into the shared queue.
                drop = Spool(config.spool)
                pickup = partial(maildrop.pickup, drop, config, policy=policy, into=spool)
        self._pickup = pickup
        self._stopping = stopping
        # A lease that runs out by time (the database's) is renewed a few
        # times a lease while a send to the next hop runs: a large message
        # to a slow hop must not be claimed and sent by another deliverer
        # meanwhile.  The spool's leases end only with their holder.
        self._renewer = (
            _Renewer(config.queue.lease_seconds / _RENEWALS_A_LEASE)
            if config.queue.backend == "postgresql"
            else None
        )
        self.concurrency = config.deliver.concurrency
        # One place at least stays free of the next hop, for local mail.
        self.hop_limit = max(
            1, min(config.deliver.destination_concurrency_limit, self.concurrency - 1)
        )
        self._notices: list[str] = []
        # A next hop that could not be reached, until when it is left alone,
        # and what its recipients are told meanwhile: like a dead destination
        # in Postfix's queue manager, so that a hop that is down costs one
        # connection timeout, not one for each message.
        self._hop_down: tuple[datetime, Outcome] | None = None
        self._hop_lock = threading.Lock()
        self.local = LocalRecipients(config)
        self.aliases = self.local.aliases

    def close(self) -> None:
        """Close the connections kept to the next hop."""
        if self.connections is not None:
            self.connections.close()

    def run(
        self,
        *,
        flush: bool = False,
        flush_ids: Collection[str] = (),
        wakeups: Wakeups | None = None,
        interrupt: socket.socket | None = None,
    ) -> datetime | None:
        """Deliver what is due, up to ``concurrency`` messages at once.

        Without ``wakeups``, returns once nothing due is left (``--once``);
        with them, runs until ``stopping``, claiming again on new mail,
        flushes, and when the earliest deferred message is due.
        ``interrupt``: a socket that signals write to (set_wakeup_fd), so
        that ``stopping`` is asked at once.  ``flush``: every deferred
        recipient now; ``flush_ids``: these messages' deferred recipients.
        Deliveries under way are finished before it returns.

        Returns when the earliest deferred message is next due, None when
        nothing waits.
        """
        if self._pickup is not None:
            self._pickup()
        if flush or flush_ids:
            self._hop_down = None  # the administrator asks for a try now
        results: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        done_read, done_write = socket.socketpair()
        done_read.setblocking(False)
        done_write.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(done_read, selectors.EVENT_READ)
        if wakeups is not None:
            selector.register(wakeups.fileno(), selectors.EVENT_READ, "wakeups")
        if interrupt is not None:
            selector.register(interrupt, selectors.EVENT_READ, "interrupt")
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="deliver")
        to_hop: collections.deque[_Work] = collections.deque()
        held = running = at_hop = 0
        most_held = self.concurrency * (1 + _BACKLOG_PER_SLOT)
        flush_all, flush_these = flush, set(flush_ids)
        hop_busy_until: datetime | None = None
        hop_moved = time.monotonic()  # when a step at the hop last ended
        unreachable_until: datetime | None = None  # the queue failed to answer: not before

        def submit(step: Callable[[_Work], None], work: _Work) -> None:
            def step_and_report() -> None:
                try:
                    step(work)
                finally:
                    results.put(work)
                    # A full socket: the main loop has bytes to read already.
                    with contextlib.suppress(BlockingIOError):
                        done_write.send(b".")

            pool.submit(step_and_report)

        def wait_for_hop(work: _Work) -> None:
            """Into the next hop's backlog, or back to the queue when it is full."""
            nonlocal held, hop_busy_until
            if len(to_hop) >= _BACKLOG_PER_SLOT * self.concurrency:
                hop_busy_until = self._clock() + HOP_BUSY_WAIT
                log.debug("id=%s: the next hop's backlog is full", work.lease.id)
                self._give_back(work.lease, hop_busy_until)
                held -= 1
            else:
                to_hop.append(work)

        try:
            while True:
                while not results.empty():
                    work = results.get()
                    running -= 1
                    if work.to_hop:
                        at_hop -= 1
                        hop_moved = time.monotonic()
                    if work.finished:
                        held -= 1
                    elif not work.remote or work.to_hop:
                        # A step cut short by what it did not catch: the
                        # message as last recorded, for a later claim.
                        retry = timedelta(seconds=self.config.deliver.retry_min)
                        self._give_back(work.lease, self._clock() + retry)
                        held -= 1
                    else:
                        wait_for_hop(work)
                stopping = self._stopping()
                if stopping:
                    while to_hop:
                        self._give_back(to_hop.popleft().lease, None)
                        held -= 1
                while to_hop and running < self.concurrency and at_hop < self.hop_limit:
                    work = to_hop.popleft()
                    work.to_hop = True
                    running += 1
                    at_hop += 1
                    submit(self._hop_step, work)
                claimed = 0
                room = min(self.concurrency - running, most_held - held)
                # A full backlog for a hop that is moving: what is claimed now
                # would mostly be given back; wait for the hop.  One that has
                # not moved for HOP_STALL is slow or stuck: local mail goes on.
                backlog = _BACKLOG_PER_SLOT * self.concurrency - len(to_hop)
                backlog_full = backlog <= 0
                stalled = time.monotonic() - hop_moved >= HOP_STALL
                if not stalled:
                    # No more than the backlog can take, were all for the hop.
                    room = min(room, backlog - (running - at_hop))
                if not stopping and room > 0:
                    self._notices.clear()
                    try:
                        leases = self.spool.claim(
                            room, self._clock(), flush_all=flush_all, flush_ids=flush_these
                        )
                    except QueueError as exc:
                        log.warning("cannot claim messages, trying again: %s", exc)
                        leases, unreachable_until = [], self._clock() + QUEUE_RETRY
                    else:
                        flush_all, flush_these = False, set()
                    for lease in leases:
                        held += 1
                        work = _Work(lease)
                        if self._for_the_hop_alone(work):
                            wait_for_hop(work)
                        else:
                            running += 1
                            submit(self._local_step, work)
                    claimed = len(leases)
                if stopping and running == 0:
                    break
                now = self._clock()
                if unreachable_until is not None and unreachable_until > now:
                    next_due: datetime | None = unreachable_until
                else:
                    unreachable_until = None
                    try:
                        next_due = self.spool.next_due()
                    except QueueError as exc:
                        log.warning("cannot read the queue, trying again: %s", exc)
                        next_due = unreachable_until = now + QUEUE_RETRY
                more_now = next_due is not None and next_due <= now
                # Claimed for the hop alone, with a place free at it: sent next.
                hop_free = bool(to_hop) and running < self.concurrency and at_hop < self.hop_limit
                if (claimed == room and room > 0) or (more_now and room > claimed) or hop_free:
                    timeout: float | None = 0.0
                elif backlog_full and not stalled:
                    timeout = HOP_STALL  # a step's end, or the hop found stalled
                elif held or stopping:
                    timeout = None  # a step's end is what comes next
                elif wakeups is None:
                    if self._notices:
                        continue  # notices this run queued: delivered by it too
                    if hop_busy_until is None or hop_busy_until <= now:
                        break
                    # Given back while the hop was busy: theirs too before the end.
                    timeout = (hop_busy_until - now).total_seconds()
                else:
                    timeout = self.spool.rescan_interval()
                    if next_due is not None:
                        timeout = min(timeout, max(0.0, (next_due - now).total_seconds()))
                if self.connections is not None:
                    # Idle connections to the next hop go when their time is up.
                    self.connections.sweep()
                    if self.connections.idle():
                        cache_time = self.config.deliver.connection_cache_time
                        timeout = cache_time if timeout is None else min(timeout, cache_time)
                for key, _ in selector.select(timeout):
                    if key.data == "wakeups":
                        assert wakeups is not None
                        wakeup = wakeups.drain()
                        if wakeup.new_mail and self._pickup is not None:
                            self._pickup()
                        if wakeup.flush_all or wakeup.flush_ids:
                            self._hop_down = None
                        flush_all = flush_all or wakeup.flush_all
                        flush_these |= wakeup.flush_ids
                    else:
                        _drain(key.fileobj)  # type: ignore[arg-type]
        finally:
            pool.shutdown(wait=True)
            while not results.empty():
                work = results.get()
                if not work.finished:
                    self._give_back(work.lease, None)
            while to_hop:
                self._give_back(to_hop.popleft().lease, None)
            selector.close()
            done_read.close()
            done_write.close()
        return self.spool.next_due()

    def _give_back(self, lease: Lease, not_before: datetime | None) -> None:
        try:
            lease.end(not_before=not_before)
        except (OSError, QueueError) as exc:
            log.error("id=%s: cannot give the message back: %s", lease.id, exc)

    def _local_step(self, work: _Work) -> None:
        self._step(work, self._deliver_local)

    def _hop_step(self, work: _Work) -> None:
        self._step(work, self._deliver_remote)

    def _step(self, work: _Work, step: Callable[[_Work], None]) -> None:
        """Run one step of a message's delivery; a failure leaves it for a later try."""
        lease = work.lease
        try:
            step(work)
            return
        except LeaseLost as exc:
            log.warning("id=%s: %s", lease.id, exc)
        except (OSError, QueueError) as exc:
            # The queue itself failed (full, unreadable): the message
            # stays as it was and is tried again after a while.
            log.error("id=%s: cannot deliver: %s", lease.id, exc)
        except Exception:
            # A bug must not stop the other messages' delivery.
            log.exception("id=%s: delivery failed", lease.id)
        work.finished = True
        self._give_back(lease, self._clock() + timedelta(seconds=self.config.deliver.retry_min))

    def _for_the_hop_alone(self, work: _Work) -> bool:
        """The first step in place, for a new message whose every destination
        is the next hop's: then it records nothing and delivers nothing, and
        a turn through the pool (two thread hand-overs, each contending for
        the interpreter's lock) would cost more than the step.  Whether it
        was; if not, ``work.state`` holds the destinations if they were
        found, for the first step to take."""
        lease = work.lease
        if lease.state is not None or not _unattempted(lease):
            return False
        try:
            state = self.expand(lease.envelope)
        except Exception:  # the pool's step meets it again, and says so
            return False
        work.state = state
        due = _due(state, self._clock())
        if not due or any(_is_local(state, i) for i in due):
            return False
        work.remote = due
        work.unrecorded = True
        return True

    def _deliver_local(self, work: _Work) -> None:
        """The first step: the list of destinations recorded, the local ones delivered."""
        lease = work.lease
        envelope = lease.envelope
        state = lease.state
        unrecorded = state is None
        if state is None:
            state = work.state if work.state is not None else self.expand(envelope)
            if not _unattempted(lease):
                lease.record(state)
                unrecorded = False
        now = self._clock()
        due = _due(state, now)
        local = [i for i in due if _is_local(state, i)]
        work.remote = [i for i in due if not _is_local(state, i)]
        if local:
            tried = [self._local(lease, envelope, state, i) for i in local]
            self._settle(lease, envelope, state, tried, now, first=unrecorded)
            unrecorded = unrecorded and state.done
        # A message for the next hop alone that no one can have tried goes
        # to it with nothing recorded: no Maildir name is at stake, and a
        # crash before the record only sends it again (at least once).
        work.state = state
        work.unrecorded = unrecorded
        if not work.remote:
            self._finish(work, state)

    def _deliver_remote(self, work: _Work) -> None:
        """The second step: the next hop's recipients, in one transaction."""
        lease = work.lease
        # The message may have waited for the hop's place since its first
        # step: a lease that runs out by time is renewed before the send
        # (LeaseLost: another deliverer has it, and this one stops).
        lease.renew()
        state = work.state
        assert state is not None
        now = self._clock()
        renewing = self._renewer.during(lease) if self._renewer else contextlib.nullcontext()
        with renewing:
            tried = self._remote(lease, lease.envelope, state, work.remote)
        self._settle(lease, lease.envelope, state, tried, now, first=work.unrecorded)
        self._finish(work, state)

    def _settle(
        self,
        lease: Lease,
        envelope: Envelope,
        state: DeliveryState,
        tried: list[_Tried],
        now: datetime,
        *,
        first: bool = False,
    ) -> None:
        """Outcomes into the state; the notices they call for queued (RFC 3461:
        failure, delay, success, relayed), then the state recorded: whole
        when it is the ``first`` record, and not at all once every
        recipient is done (the message is completed instead)."""
        reports = [
            r for t in tried if (r := self._record(lease.id, envelope, state, t, now)) is not None
        ]
        for notice in dsn.grouped(reports):
            self._notify(lease.id, envelope, notice, now)
        if not state.done:
            lease.record(state, changed=None if first else [t.index for t in tried])

    def _finish(self, work: _Work, state: DeliveryState) -> None:
        lease = work.lease
        if state.done:
            lease.complete()
            log.info("id=%s removed: every recipient is done", lease.id)
        else:
            lease.end()
        work.finished = True

    def expand(self, envelope: Envelope) -> DeliveryState:
        """The message's destinations, in envelope order, aliases expanded."""
        return self.local.expand(envelope)

    def maildir_of(self, mailbox: str) -> Path:
        return self.local.maildir_of(mailbox)

    def _local(self, lease: Lease, envelope: Envelope, state: DeliveryState, i: int) -> _Tried:
        entry = state.recipients[i]
        if entry.problem is not None:
            return _Tried(i, Outcome(550, entry.problem), "local")
        assert entry.mailbox is not None
        folder = self.maildir_of(entry.mailbox)
        name = self.local.copy_name(envelope, lease.id, i)
        try:
            with lease.open_message() as message:
                written = maildir.deliver(
                    folder, name, local.header(envelope, entry), message, look_first=lease.resumed
                )
        except OSError as exc:
            return _Tried(i, _maildir_failure(folder, exc), "maildir")
        text = local.written_reply(name, written=written)
        return _Tried(i, Outcome(250, text), "maildir")

    def _remote(
        self, lease: Lease, envelope: Envelope, state: DeliveryState, due: list[int]
    ) -> list[_Tried]:
        hop = self.config.deliver.next_hop
        if hop is None:
            # A receiving MTA without a relay path holds such mail rather
            # than bouncing it at once: the administrator may add one.
            outcome = Outcome(451, "4.4.0 No next hop configured for non-local mail")
            return [_Tried(i, outcome, "none") for i in due]
        relay, host = nexthop.describe(hop), nexthop.host_of(hop)
        now = self._clock()
        down = self._hop_down
        if down is not None and now < down[0]:
            return [_Tried(i, down[1], relay, host) for i in due]
        with lease.open_message() as message:
            outcomes = self._send(
                hop,
                hostname=self.config.hostname,
                sender=envelope.sender,
                recipients=[state.recipients[i].address for i in due],
                message=message,
                smtputf8=envelope.smtputf8,
                body=envelope.body,
                crlf=envelope.crlf,
                **dsn.hop_parameters(envelope, [state.recipients[i].recipient for i in due]),
                security=self.security,
            )
        if outcomes and all(outcome.unreachable for outcome in outcomes):
            pause = self.config.deliver.retry_min
            # From the failure on: finding it out may have taken the connect bound.
            until = self._clock() + timedelta(seconds=pause)
            with self._hop_lock:
                first = self._hop_down is None or self._hop_down[0] <= now
                self._hop_down = (until, nexthop.suspended(outcomes[0]))
            if first:
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
        log.info("%s", local.attempt_line(queue_id, entry, tried.relay))
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
                crlf=True,
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


class _Renewer:
    """Renews, every ``every`` seconds, the leases whose sends to the next hop
    are running, from one thread for the whole deliverer (started at the
    first such send), not one a send.  A renewal that fails is tried again
    at the next turn (the lease lives on for the rest of its time); a lease
    lost is renewed no more, and its step finds it lost when it records."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._leases: dict[int, Lease] = {}  # by id(): a lease need not be hashable
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def during(self, lease: Lease) -> Iterator[None]:
        with self._lock:
            self._leases[id(lease)] = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="renew", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._leases.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            with self._lock:
                leases = list(self._leases.values())
            for lease in leases:
                try:
                    lease.renew()
                except LeaseLost as exc:
                    log.warning("id=%s: %s", lease.id, exc)
                    with self._lock:
                        self._leases.pop(id(lease), None)
                except (OSError, QueueError) as exc:
                    log.warning("id=%s: cannot renew the lease: %s", lease.id, exc)


def _kind(envelope: Envelope, relay: str) -> str:
    """For the metrics: a notification of ours, a local delivery, or one to the next hop."""
    if envelope.channel == DSN_CHANNEL and envelope.sender == NULL_SENDER:
        return "bounce"
    return "local" if relay in ("maildir", "local") else "nexthop"


def _due(state: DeliveryState, now: datetime) -> list[int]:
    """The entries to try now: pending, or deferred and due; every deferred
    one when none is (a message claimed early: flushed by the administrator)."""
    due = [
        i
        for i, r in enumerate(state.recipients)
        if r.status == PENDING
        or (r.status == DEFERRED and (r.next_try is None or r.next_try <= now))
    ]
    if due:
        return due
    return [i for i, r in enumerate(state.recipients) if r.status == DEFERRED]


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def _unattempted(lease: Lease) -> bool:
    """Whether no one can have tried ``lease``'s message before: then its
    list of destinations need not be recorded before the local deliveries
    (their Maildir names cannot be taken yet), and a message delivered
    whole in its first attempt is completed with no state ever written
    (two fsyncs and an unlink fewer a message).  Only the spool knows
    this of its messages (SpoolLease.unattempted); elsewhere the list is
    recorded first."""
    from ..queue.spool import SpoolLease

    return isinstance(lease, SpoolLease) and lease.unattempted


def _is_local(state: DeliveryState, i: int) -> bool:
    entry = state.recipients[i]
    return entry.mailbox is not None or entry.problem is not None


def _maildir_failure(folder: Path, exc: OSError) -> Outcome:
    if exc.errno == errno.EDQUOT:
        return Outcome(452, f"4.2.2 Mailbox full: {folder}")
    if exc.errno == errno.ENOSPC:
        return Outcome(452, f"4.3.1 No space left for {folder}")
    return Outcome(451, f"4.3.0 Cannot write to {folder}: {exc.strerror or exc}")
