"""The rules every queue backend keeps, as tests each backend's test file runs.

A backend's test module subclasses :class:`QueueContract` (its name starts
with ``Test``) and gives ``make_backend``: each call a new view of the
same queue, as another process or host would have.  What differs between
backends is said by class attributes, not by skipping tests.
"""

from __future__ import annotations

import io
import os
import select
import signal
from datetime import UTC, datetime, timedelta

import pytest

from mmdf_smtp.queue import (
    DEFERRED,
    DELIVERED,
    DelivererRunning,
    DeliveryState,
    Envelope,
    Lease,
    LeaseLost,
    MessageBusy,
    QueueBackend,
    QueuedMessage,
    RecipientState,
)

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
BODY = b"Received: from client by mx; Sun, 6 Dec 2026 12:00:00 +0000\r\n\r\nHello.\r\n"


def envelope(*recipients: str, received: datetime = NOW) -> Envelope:
    return Envelope(
        sender="alice@example.org",
        recipients=recipients or ("bob@example.net",),
        channel="smtp",
        remote_host="client.example.org",
        remote_addr="127.0.0.2",
        helo="client.example.org",
        received=received,
    )


def queue_one(backend: QueueBackend, env: Envelope | None = None, body: bytes = BODY) -> str:
    writer = backend.open(env or envelope())
    writer.write(body)
    writer.commit()
    return writer.id


def deferred(state: DeliveryState, index: int, next_try: datetime) -> DeliveryState:
    entry = state.recipients[index]
    entry.status = DEFERRED
    entry.attempts += 1
    entry.next_try = next_try
    entry.last_reply = "451 4.3.0 try later"
    return state


def expanded(lease: Lease) -> DeliveryState:
    return DeliveryState(
        [RecipientState(recipient=r, address=r) for r in lease.envelope.recipients]
    )


class QueueContract:
    # The backend allows one deliverer at a time (the spool's deliver.lock).
    one_deliverer: bool = False

    def make_backend(self) -> QueueBackend:
        raise NotImplementedError

    @pytest.fixture
    def backend(self) -> QueueBackend:
        return self.make_backend()

    # -- claiming ------------------------------------------------------------

    def test_claim_hands_out_new_messages_oldest_first(self, backend: QueueBackend) -> None:
        # The deliverer starts before the mail comes: a message queued before
        # it may have been tried by an earlier one (the spool counts it resumed).
        assert backend.claim(10, NOW) == []
        first = queue_one(backend, envelope(received=NOW - timedelta(seconds=2)))
        second = queue_one(backend, envelope(received=NOW - timedelta(seconds=1)))
        leases = backend.claim(10, NOW)
        assert [lease.id for lease in leases] == [first, second]
        assert leases[0].state is None and not leases[0].resumed
        assert leases[0].envelope == envelope(received=NOW - timedelta(seconds=2))
        with leases[0].open_message() as message:
            assert message.read() == BODY
        for lease in leases:
            lease.end()

    def test_claim_takes_no_more_than_its_limit(self, backend: QueueBackend) -> None:
        ids = [queue_one(backend) for _ in range(5)]
        leases = backend.claim(2, NOW)
        assert len(leases) == 2
        rest = backend.claim(10, NOW)
        assert sorted(lease.id for lease in leases + rest) == sorted(ids)
        for lease in leases + rest:
            lease.end()

    def test_a_message_has_one_holder_at_a_time(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        other = self.make_backend()
        (lease,) = backend.claim(10, NOW)
        assert other.claim(10, NOW) == []
        lease.end()
        (again,) = other.claim(10, NOW)
        assert again.id == queue_id
        again.end()

    def test_a_recorded_state_comes_back_with_the_next_lease(self, backend: QueueBackend) -> None:
        queue_one(backend, envelope("a@example.net", "b@example.net"))
        (lease,) = backend.claim(10, NOW)
        state = expanded(lease)
        lease.record(state)
        state.recipients[0].status = DELIVERED
        state.recipients[0].attempts = 1
        state.recipients[0].last_reply = "250 2.0.0 ok"
        lease.record(state, changed=[0])
        lease.end()
        (again,) = self.make_backend().claim(10, NOW)
        assert again.resumed
        assert again.state == state
        again.end()

    def test_a_deferred_message_waits_for_its_next_try(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        (lease,) = backend.claim(10, NOW)
        later = NOW + timedelta(minutes=5)
        lease.record(deferred(expanded(lease), 0, later))
        lease.end()
        assert backend.claim(10, NOW) == []
        assert backend.claim(10, later - timedelta(seconds=1)) == []
        (due,) = backend.claim(10, later)
        assert due.id == queue_id
        due.end()

    def test_flush_makes_deferred_recipients_due(self, backend: QueueBackend) -> None:
        flushed, other = queue_one(backend), queue_one(backend)
        for lease in backend.claim(10, NOW):
            lease.record(deferred(expanded(lease), 0, NOW + timedelta(hours=1)))
            lease.end()
        (one,) = backend.claim(10, NOW, flush_ids=[flushed])
        assert one.id == flushed
        one.end()
        leases = backend.claim(10, NOW, flush_all=True)
        assert sorted(lease.id for lease in leases) == sorted([flushed, other])
        for lease in leases:
            lease.end()

    def test_end_not_before_keeps_a_message_from_coming_straight_back(
        self, backend: QueueBackend
    ) -> None:
        queue_id = queue_one(backend)
        (lease,) = backend.claim(10, NOW)
        lease.end(not_before=NOW + timedelta(minutes=1))
        assert backend.claim(10, NOW) == []
        (lease,) = backend.claim(10, NOW + timedelta(minutes=1))
        assert lease.id == queue_id
        lease.end()

    def test_next_due_is_the_earliest_deferred_try(self, backend: QueueBackend) -> None:
        assert backend.next_due() is None
        queue_one(backend)
        queue_one(backend)
        tries = [NOW + timedelta(minutes=7), NOW + timedelta(minutes=3)]
        for lease, when in zip(backend.claim(10, NOW), tries, strict=True):
            lease.record(deferred(expanded(lease), 0, when))
            lease.end()
        assert backend.next_due() == NOW + timedelta(minutes=3)
        assert backend.rescan_interval() > 0

    # -- completing ----------------------------------------------------------

    def test_complete_takes_the_message_out_once(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        (lease,) = backend.claim(10, NOW)
        state = expanded(lease)
        state.recipients[0].status = DELIVERED
        lease.record(state)
        lease.complete()
        lease.end()  # harmless after complete
        assert backend.claim(10, NOW, flush_all=True) == []
        assert [m.id for m in backend.messages()] == []
        with pytest.raises(KeyError):
            backend.read_state(queue_id)
        with pytest.raises(KeyError):
            backend.open_message(queue_id)

    # -- the administrator ---------------------------------------------------

    def test_messages_lists_what_is_queued_with_its_size(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        (listed,) = backend.messages()
        assert listed.id == queue_id
        assert listed.size == len(BODY)
        assert listed.envelope == envelope()
        assert not listed.held
        assert backend.read_state(queue_id) is None

    def test_a_held_message_is_never_claimed(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        assert backend.hold(queue_id, wait=1)
        assert not backend.hold(queue_id, wait=1)
        assert backend.claim(10, NOW, flush_all=True) == []
        assert [m.id for m in backend.messages(held=True)] == [queue_id]
        assert [m.held for m in backend.messages(held=True)] == [True]
        assert backend.release(queue_id, wait=1)
        assert not backend.release(queue_id, wait=1)
        (lease,) = backend.claim(10, NOW)
        assert lease.id == queue_id
        lease.end()

    def test_a_quarantined_message_is_held(self, backend: QueueBackend) -> None:
        from dataclasses import replace

        queue_id = queue_one(backend, replace(envelope(), quarantine="spam score 12"))
        assert backend.claim(10, NOW, flush_all=True) == []
        assert [m.id for m in backend.messages(held=True)] == [queue_id]

    def test_the_administrator_waits_for_a_lease(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        (lease,) = backend.claim(10, NOW)
        admin = self.make_backend()
        with pytest.raises(MessageBusy):
            admin.hold(queue_id, wait=0.1)
        with pytest.raises(MessageBusy):
            admin.delete(queue_id, wait=0.1)
        lease.end()
        admin.delete(queue_id, wait=1)
        assert [m.id for m in admin.messages()] == []
        with pytest.raises(KeyError):
            admin.delete(queue_id, wait=1)
        with pytest.raises(KeyError):
            admin.hold("0" * 26, wait=1)

    # -- deliverers ----------------------------------------------------------

    def test_deliverers(self, backend: QueueBackend) -> None:
        wakeups = backend.start_delivering()
        try:
            if self.one_deliverer:
                with pytest.raises(DelivererRunning):
                    self.make_backend().start_delivering()
            else:
                self.make_backend().start_delivering().close()
        finally:
            wakeups.close()

    def test_new_mail_and_flushes_ring_the_doorbell(self, backend: QueueBackend) -> None:
        wakeups = backend.start_delivering()
        try:
            assert wakeups.drain().new_mail is False
            queue_one(self.make_backend())
            assert _readable(wakeups.fileno())
            assert wakeups.drain().new_mail
            admin = self.make_backend()
            assert admin.flush("0" * 26)
            assert _readable(wakeups.fileno())
            assert wakeups.drain().flush_ids == frozenset({"0" * 26})
            assert admin.flush()
            assert _readable(wakeups.fileno())
            assert wakeups.drain().flush_all
        finally:
            wakeups.close()

    def test_a_dead_holders_message_goes_to_another(self, backend: QueueBackend) -> None:
        """The holder is killed with SIGKILL after it recorded a state: the
        message is claimed again, its state as recorded, and resumed."""
        queue_id = queue_one(backend)
        pid = os.fork()
        if pid == 0:  # the holder
            try:
                (lease,) = self.make_backend().claim(10, NOW)
                lease.record(expanded(lease))
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        lease = self.claim_after_holder_died(backend)
        assert lease.id == queue_id
        assert lease.resumed
        assert lease.state == DeliveryState(
            [RecipientState(recipient="bob@example.net", address="bob@example.net")]
        )
        lease.end()

    def claim_after_holder_died(self, backend: QueueBackend) -> Lease:
        """A backend whose leases run out by time overrides this to wait for that."""
        (lease,) = backend.claim(10, NOW)
        return lease

    def test_a_lost_lease_says_so(self, backend: QueueBackend) -> None:
        """Only where leases run out by time: after the lease ran out and
        another took the message, the first holder's record and complete
        raise LeaseLost and change nothing."""
        lost = self.lose_lease(backend)
        if lost is None:
            assert self.leases_end_with_holder
            return
        first, second = lost
        with pytest.raises(LeaseLost):
            first.record(expanded(first))
        with pytest.raises(LeaseLost):
            first.complete()
        first.end()
        assert second.state is None
        second.end()

    # -- adopting a message stored elsewhere ----------------------------------

    def test_adopt_keeps_id_held_flag_and_state(self, backend: QueueBackend) -> None:
        queue_id = backend.new_id()
        env = envelope("a@example.net", "b@example.net")
        state = DeliveryState([RecipientState(recipient=r, address=r) for r in env.recipients])
        state.recipients[0].status = DELIVERED
        deferred(state, 1, NOW + timedelta(hours=1))
        held_id = backend.new_id()
        for message, given in (
            (QueuedMessage(queue_id, env, len(BODY)), state),
            (QueuedMessage(held_id, envelope(), len(BODY), held=True), None),
        ):
            assert backend.adopt(message, io.BytesIO(BODY), given)
        assert [(m.id, m.envelope, m.size) for m in backend.messages()] == [
            (queue_id, env, len(BODY))
        ]
        assert [m.id for m in backend.messages(held=True)] == [held_id]
        assert backend.read_state(queue_id) == state
        assert backend.read_state(held_id) is None
        with backend.open_message(queue_id) as stored:
            assert stored.read() == BODY

    def test_adopt_of_an_id_present_writes_nothing(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        other = QueuedMessage(queue_id, envelope("z@example.net"), 3, held=True)
        assert not backend.adopt(other, io.BytesIO(b"new"), None)
        assert [(m.id, m.envelope, m.size) for m in backend.messages()] == [
            (queue_id, envelope(), len(BODY))
        ]
        assert list(backend.messages(held=True)) == []

    # The spool's lock is the holder's open file: it ends with the holder only.
    leases_end_with_holder: bool = False

    def lose_lease(self, backend: QueueBackend) -> tuple[Lease, Lease] | None:
        """Two leases on one message, the first run out: None where leases
        cannot run out while their holder lives."""
        return None


def _readable(fd: int, timeout: float = 5.0) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)
