"""The rules every queue backend keeps, as tests each backend's test file runs.

A backend's test module subclasses :class:`QueueContract` (its name starts
with ``Test``) and gives ``make_backend``: each call a new view of the
same queue, as another process or host would have.  What differs between
backends is said by class attributes, not by skipping tests.
"""

from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mmdf_smtp.queue import (
    DEFERRED,
    DELIVERED,
    MUST_UNDERSTAND,
    NEWER_WAIT,
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
from mmdf_smtp.queue.spool import SIZE_SLOT, Spool, size_field

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


Record = dict[str, Any]
Edit = Callable[[Record], None]

# -- records as stored, read and changed as a newer version (or an
# administrator) would write them: the spool's files, the database's rows.


def _spool_file(spool: Spool, queue_id: str) -> Path:
    for folder in (spool.queue, spool.hold_dir):
        if (folder / queue_id).exists():
            return folder / queue_id
    raise KeyError(queue_id)


def spool_envelope(spool: Spool, queue_id: str) -> Record:
    """The stored envelope line's fields, ``file_size`` left out."""
    with open(_spool_file(spool, queue_id), "rb") as file:
        data: Record = json.loads(file.readline())
    data.pop("file_size")
    return data


def edit_spool_envelope(spool: Spool, queue_id: str, edit: Edit) -> None:
    """Rewrite a queue file's envelope line, sealed with its new size."""
    path = _spool_file(spool, queue_id)
    line, rest = path.read_bytes().split(b"\n", 1)
    data = json.loads(line)
    data.pop("file_size")
    edit(data)
    fields = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    head = b'{"file_size":' + size_field(0) + b"," + fields[1:] + b"\n"
    size = len(head) + len(rest)
    head = head[:SIZE_SLOT] + size_field(size) + head[SIZE_SLOT + len(size_field(0)) :]
    path.write_bytes(head + rest)


def edit_spool_state(spool: Spool, queue_id: str, index: int, edit: Edit) -> None:
    """Rewrite one entry of a message's state file, its mtime (when due) kept."""
    path = spool.state / queue_id
    due = path.stat().st_mtime_ns
    data = json.loads(path.read_bytes())
    edit(data["recipients"][index])
    path.write_text(json.dumps(data))
    os.utime(path, ns=(due, due))


def _sql(dsn: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg  # a site on the spool has no driver: only these functions need it

    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


def pg_envelope(dsn: str, queue_id: str) -> Record:
    [(text,)] = _sql(dsn, "SELECT envelope FROM mmdf_message WHERE id = %s", queue_id)
    data: Record = json.loads(text)
    return data


def edit_pg_envelope(dsn: str, queue_id: str, edit: Edit) -> None:
    data = pg_envelope(dsn, queue_id)
    edit(data)
    _sql(dsn, "UPDATE mmdf_message SET envelope = %s WHERE id = %s", json.dumps(data), queue_id)


def edit_pg_state(dsn: str, queue_id: str, index: int, edit: Edit) -> None:
    [(text,)] = _sql(
        dsn, "SELECT state FROM mmdf_recipient WHERE message_id = %s AND idx = %s", queue_id, index
    )
    data = json.loads(text)
    edit(data)
    _sql(
        dsn,
        "UPDATE mmdf_recipient SET state = %s WHERE message_id = %s AND idx = %s",
        json.dumps(data),
        queue_id,
        index,
    )


def with_field(name: str, value: Any, *, critical: bool) -> Edit:
    """An edit adding a field this version does not know, as a newer version
    would write it: listed in ``must_understand`` when ``critical``."""

    def edit(data: Record) -> None:
        data[name] = value
        if critical:
            data[MUST_UNDERSTAND] = [*data.get(MUST_UNDERSTAND, []), name]

    return edit


def without_field(name: str) -> Edit:
    """The roll-forward's work, done by hand: the field and its listing gone."""

    def edit(data: Record) -> None:
        del data[name]
        listed = [n for n in data.get(MUST_UNDERSTAND, []) if n != name]
        if listed:
            data[MUST_UNDERSTAND] = listed
        else:
            data.pop(MUST_UNDERSTAND, None)

    return edit


def newer_warnings(caplog: pytest.LogCaptureFixture, queue_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.getMessage().startswith(f"id={queue_id}: written by a newer version")
    ]


class QueueContract:
    # The backend allows one deliverer at a time (the spool's deliver.lock).
    one_deliverer: bool = False

    def make_backend(self) -> QueueBackend:
        raise NotImplementedError

    def stored_envelope(self, queue_id: str) -> Record:
        """The envelope's fields as the backend stores them."""
        raise NotImplementedError

    def edit_envelope(self, queue_id: str, edit: Edit) -> None:
        raise NotImplementedError

    def edit_state(self, queue_id: str, index: int, edit: Edit) -> None:
        raise NotImplementedError

    @staticmethod
    def assert_left_until(backend: QueueBackend, when: datetime) -> None:
        """Nothing is due before ``when`` for this deliverer: it sleeps."""
        due = backend.next_due()
        assert due is None or due >= when - timedelta(seconds=1), due

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

    # -- records of another version (forward compatibility) ---------------------

    def test_a_plain_envelope_names_nothing_a_quarantined_one_names_quarantine(
        self, backend: QueueBackend
    ) -> None:
        plain = queue_one(backend)
        assert MUST_UNDERSTAND not in self.stored_envelope(plain)
        held = queue_one(backend, replace(envelope(), quarantine="spam score 12"))
        assert self.stored_envelope(held)[MUST_UNDERSTAND] == ["quarantine"]
        dsn = queue_one(backend, replace(envelope(), ret="HDRS", notify=("NEVER",)))
        assert self.stored_envelope(dsn)[MUST_UNDERSTAND] == ["ret", "notify"]

    def test_a_field_it_does_not_know_is_ignored(self, backend: QueueBackend) -> None:
        queue_id = queue_one(backend)
        self.edit_envelope(queue_id, with_field("line_hint", {"x": 1}, critical=False))
        (listed,) = backend.messages()
        assert (listed.id, listed.envelope, listed.needs) == (queue_id, envelope(), ())
        (lease,) = backend.claim(10, NOW)
        assert lease.envelope == envelope()
        lease.record(deferred(expanded(lease), 0, NOW + timedelta(minutes=1)))
        lease.end()
        self.edit_state(queue_id, 0, with_field("hop_hint", "b", critical=False))
        (again,) = backend.claim(10, NOW + timedelta(minutes=2))
        assert again.state is not None and again.state.recipients[0].attempts == 1
        again.end()
        assert backend.set_aside() == []

    def test_a_field_it_must_understand_leaves_the_message_in_the_queue(
        self, backend: QueueBackend, caplog: pytest.LogCaptureFixture
    ) -> None:
        queue_id = queue_one(backend)
        self.edit_envelope(queue_id, with_field("hold_for", "legal", critical=True))
        with caplog.at_level(logging.WARNING, logger="mmdf_smtp.queue"):
            assert backend.claim(10, NOW) == []
            # Not due again at once, though nothing was recorded: a deliverer
            # does not claim it again and again.
            self.assert_left_until(backend, NOW + NEWER_WAIT)
            assert backend.claim(10, NOW) == []
            assert self.make_backend().claim(10, NOW) == []
        assert newer_warnings(caplog, queue_id) == [
            f"id={queue_id}: written by a newer version: it needs hold_for; left in the queue"
        ]
        assert backend.set_aside() == []
        (listed,) = backend.messages()
        assert (listed.id, listed.envelope, listed.needs) == (queue_id, envelope(), ("hold_for",))
        # Rolled forward, the field done with: the message is claimed once
        # it is due again.
        self.edit_envelope(queue_id, without_field("hold_for"))
        (lease,) = backend.claim(10, NOW + NEWER_WAIT + timedelta(seconds=1))
        assert lease.id == queue_id and lease.envelope == envelope()
        lease.complete()

    def test_a_state_field_it_must_understand_leaves_the_message_in_the_queue(
        self, backend: QueueBackend, caplog: pytest.LogCaptureFixture
    ) -> None:
        queue_id = queue_one(backend, envelope("a@example.net", "b@example.net"))
        (lease,) = backend.claim(10, NOW)
        lease.record(deferred(expanded(lease), 1, NOW))
        lease.end()
        self.edit_state(queue_id, 1, with_field("relay_via", "mx2", critical=True))
        with caplog.at_level(logging.WARNING, logger="mmdf_smtp.queue"):
            assert backend.claim(10, NOW) == []
            self.assert_left_until(backend, NOW + NEWER_WAIT)
            assert backend.claim(10, NOW) == []
        assert len(newer_warnings(caplog, queue_id)) == 1
        assert "it needs relay_via" in newer_warnings(caplog, queue_id)[0]
        assert backend.set_aside() == []
        assert [m.id for m in backend.messages()] == [queue_id]

    # The spool's lock is the holder's open file: it ends with the holder only.
    leases_end_with_holder: bool = False

    def lose_lease(self, backend: QueueBackend) -> tuple[Lease, Lease] | None:
        """Two leases on one message, the first run out: None where leases
        cannot run out while their holder lives."""
        return None


def _readable(fd: int, timeout: float = 5.0) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)
