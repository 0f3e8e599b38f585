"""The PostgreSQL queue on a real server the tests start (tests/pgcluster.py):
the rules every backend keeps, then what is its own (big messages, group
commit, a commit whose taker died, the LISTEN connection's loss)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mmdf_smtp.queue import NEWER_WAIT, Lease, LeaseLost, QueueError
from mmdf_smtp.queue.postgres import (
    _NOTIFY_GAP,
    CHANNEL,
    CHUNK,
    PostgresQueue,
    PostgresWriter,
)
from queue_contract import (
    BODY,
    NOW,
    Edit,
    QueueContract,
    Record,
    _readable,
    deferred,
    edit_pg_envelope,
    edit_pg_state,
    envelope,
    expanded,
    pg_envelope,
    queue_one,
    with_field,
    without_field,
)

pytest_plugins = ["pgcluster"]

QUICK_LEASE = 0.2  # seconds: how long the tests' lease-ending claimers let a lease live


class PostgresCase:
    @pytest.fixture(autouse=True)
    def _database(self, pg_dsn: str, tmp_path: Path) -> Iterator[None]:
        self.dsn = pg_dsn
        self.staging = tmp_path / "staging"
        self.made: list[PostgresQueue] = []
        yield
        for backend in self.made:
            backend.close()

    def make_backend(self, **options: Any) -> PostgresQueue:
        backend = PostgresQueue(self.dsn, staging=self.staging, **options)
        self.made.append(backend)
        return backend

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(statement, params or None)
            return cursor.fetchall() if cursor.description else []


def _claim_once_the_lease_runs_out(claimer: PostgresQueue) -> Lease:
    """Leases end by time: claim until the dead or slow holder's has run out."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leases = claimer.claim(10, NOW)
        if leases:
            (lease,) = leases
            return lease
        time.sleep(QUICK_LEASE / 4)
    raise AssertionError("the lease never ran out")


class TestPostgresContract(PostgresCase, QueueContract):
    leases_end_with_holder = False

    def stored_envelope(self, queue_id: str) -> Record:
        return pg_envelope(self.dsn, queue_id)

    def edit_envelope(self, queue_id: str, edit: Edit) -> None:
        edit_pg_envelope(self.dsn, queue_id, edit)

    def edit_state(self, queue_id: str, index: int, edit: Edit) -> None:
        edit_pg_state(self.dsn, queue_id, index, edit)

    def claim_after_holder_died(self, backend: Any) -> Lease:
        return _claim_once_the_lease_runs_out(self.make_backend(lease_seconds=QUICK_LEASE))

    def lose_lease(self, backend: Any) -> tuple[Lease, Lease]:
        queue_one(backend)
        (first,) = backend.claim(10, NOW)
        second = _claim_once_the_lease_runs_out(self.make_backend(lease_seconds=QUICK_LEASE))
        return first, second


def _piece(number: int, size: int = 64 * 1024) -> bytes:
    """Octets that differ from piece to piece, made again for the check."""
    return hashlib.sha256(number.to_bytes(8, "big")).digest() * (size // 32)


class TestPostgresQueue(PostgresCase):
    def test_a_newer_versions_message_is_passed_by_its_row_untouched(self) -> None:
        """Its ``due_at`` is not pushed back: rolled forward, the newer
        version finds it due at once.  This deliverer passes it by for
        NEWER_WAIT, in its claims and in when it next has work."""
        backend = self.make_backend()
        queue_id = queue_one(backend)
        edit_pg_envelope(self.dsn, queue_id, with_field("hold_for", "legal", critical=True))
        row = "SELECT envelope, due_at, held, gone, lease_holder FROM mmdf_message WHERE id = %s"
        before = self.sql(row, queue_id)
        assert backend.claim(10, NOW) == []
        assert self.sql(row, queue_id) == before
        assert backend.next_due() is None
        assert self.make_backend().next_due() is not None  # another process's business
        later = NOW + NEWER_WAIT
        edit_pg_envelope(self.dsn, queue_id, without_field("hold_for"))
        assert backend.claim(10, later - timedelta(seconds=1)) == []
        (lease,) = backend.claim(10, later)
        lease.complete()

    def test_a_35_mib_message_is_never_whole_in_memory(self) -> None:
        backend = self.make_backend()
        pieces = 35 * 16  # of 64 KiB
        expected = hashlib.sha256()
        tracemalloc.start()
        try:
            writer = backend.open(envelope())
            for number in range(pieces):
                piece = _piece(number)
                expected.update(piece)
                writer.write(piece)
            writer.commit()
            _, peak_in = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            (lease,) = backend.claim(10, NOW)
            got = hashlib.sha256()
            with lease.open_message() as message:
                while piece := message.read(64 * 1024):
                    got.update(piece)
            _, peak_out = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got.digest() == expected.digest()
        assert (peak_in, peak_out) < (4 * 1024 * 1024, 4 * 1024 * 1024)
        assert writer.size == pieces * 64 * 1024
        assert [m.size for m in backend.messages()] == [writer.size]
        chunks = self.sql(
            "SELECT count(*), max(length(data)) FROM mmdf_chunk WHERE message_id = %s", writer.id
        )
        assert chunks == [(35 * 4, CHUNK)]
        assert os.listdir(self.staging) == []  # the staging file went with the commit
        lease.end()

    def test_a_claimed_message_is_read_again_from_where_it_is_sought(self) -> None:
        """The next hop's client goes back to the start to send again (plaintext
        after a failed TLS handshake); a DSN to the body after the headers."""
        backend = self.make_backend()
        whole = b"".join(_piece(number) for number in range(9))  # over two chunks
        writer = backend.open(envelope())
        writer.write(whole)
        writer.commit()
        (lease,) = backend.claim(10, NOW)
        with lease.open_message() as message:
            assert message.seekable()
            start = message.tell()
            assert message.read() == whole[start:]
            for position in (start, start + 7, CHUNK, 2 * CHUNK + 3, len(whole) - 1):
                assert message.seek(position) == position
                assert message.read(CHUNK + 11) == whole[position : position + CHUNK + 11]
                assert message.tell() == min(len(whole), position + CHUNK + 11)
            message.seek(-5, os.SEEK_END)
            assert message.read() == whole[-5:]
        lease.end()

    def test_a_group_commits_in_one_transaction(self) -> None:
        backend = self.make_backend()
        writers = []
        for number in range(50):
            writer = backend.open(envelope())
            writer.write(b"message %d\r\n" % number)
            writers.append(writer)
        assert backend.commit_all(writers) == [None] * 50
        assert self.sql("SELECT count(DISTINCT xmin::text), count(*) FROM mmdf_message") == [
            (1, 50)
        ]
        assert [m.id for m in backend.messages()] == [w.id for w in writers]
        with backend.open_message(writers[7].id) as message:
            assert message.read() == b"message 7\r\n"

    def test_groups_from_many_threads_all_arrive(self) -> None:
        backend = self.make_backend()
        committed: list[str] = []
        errors: list[object] = []

        def commit_groups() -> None:
            for _ in range(5):
                writers = [backend.open(envelope()) for _ in range(4)]
                for writer in writers:
                    writer.write(b"x" * 1024)
                results = backend.commit_all(writers)
                errors.extend(result for result in results if result is not None)
                committed.extend(writer.id for writer in writers)

        threads = [threading.Thread(target=commit_groups) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sorted(m.id for m in backend.messages()) == sorted(committed)
        assert len(set(committed)) == 200

    def test_one_message_refused_does_not_fail_its_group(self) -> None:
        backend = self.make_backend()
        taken = queue_one(backend)
        writers = [backend.open(envelope()), backend.open(envelope(), queue_id=taken)]
        writers.append(backend.open(envelope()))
        for writer in writers:
            writer.write(b"body\r\n")
        results = backend.commit_all(writers)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], QueueError)
        assert sorted(m.id for m in backend.messages()) == sorted(
            [taken, writers[0].id, writers[2].id]
        )

    def test_messages_are_listed_page_after_page(self) -> None:
        backend = self.make_backend()
        writers = [backend.open(envelope()) for _ in range(450)]
        assert backend.commit_all(writers) == [None] * 450
        assert [m.id for m in backend.messages()] == [w.id for w in writers]
        assert list(backend.messages(held=True)) == []

    # -- handed over to another process --------------------------------------

    def _hand_over(self, backend: PostgresQueue, pieces: int = 4) -> tuple[PostgresWriter, bytes]:
        """A message of ``pieces`` of 64 KiB: beyond one, past in_memory, in a staging file."""
        writer = backend.open(envelope())
        for number in range(pieces):
            writer.write(_piece(number))
        token = backend.hand_over(writer)
        assert len(os.listdir(self.staging)) == (pieces > 1)
        return writer, token

    def _taker(self, token: bytes, *, commit: bool) -> None:
        """In a child: take the message over, commit it or not, and die by SIGKILL."""
        pid = os.fork()
        if pid == 0:
            try:
                writer = self.make_backend().take_over(token)
                if commit:
                    writer.commit()
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)

    def test_take_back_after_the_taker_died_before_its_commit(self) -> None:
        backend = self.make_backend()
        writer, token = self._hand_over(backend)
        self._taker(token, commit=False)
        assert backend.take_back(writer) is False
        assert list(backend.messages()) == []
        assert os.listdir(self.staging) == []
        # What the dead taker might still send can no longer be committed.
        again = backend.open(envelope(), queue_id=writer.id)
        again.write(b"late\r\n")
        with pytest.raises(QueueError):
            again.commit()
        assert list(backend.messages()) == []

    @pytest.mark.parametrize("pieces", [1, 4, 5])
    def test_take_back_after_the_taker_died_after_its_commit(self, pieces: int) -> None:
        backend = self.make_backend()
        writer, token = self._hand_over(backend, pieces)
        self._taker(token, commit=True)
        assert backend.take_back(writer) is True
        (queued,) = backend.messages()
        assert (queued.id, queued.size) == (writer.id, pieces * 64 * 1024)
        with backend.open_message(writer.id) as message:
            assert message.read() == b"".join(_piece(number) for number in range(pieces))
        assert os.listdir(self.staging) == []

    @pytest.mark.parametrize("outcome", ["COMMIT", "ROLLBACK"])
    def test_take_back_waits_for_a_commit_in_flight(self, outcome: str) -> None:
        """The taker's transaction is still open when take_back asks: the
        answer is the transaction's outcome, whatever it turns out to be."""
        backend = self.make_backend()
        writer, _ = self._hand_over(backend)
        backend.prepare()  # the schema
        answer: list[bool] = []
        with psycopg.connect(self.dsn) as taker:
            taker.execute(
                "INSERT INTO mmdf_message (id, envelope, size) VALUES (%s, %s, 0)",
                (writer.id, writer._envelope_text),
            )
            thread = threading.Thread(target=lambda: answer.append(backend.take_back(writer)))
            thread.start()
            deadline = time.monotonic() + 10
            while not self.sql(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                "INSERT INTO mmdf_message%",
            ):
                assert time.monotonic() < deadline, "take_back did not wait for the row"
                time.sleep(0.01)
            taker.execute(outcome)
            thread.join()
        assert answer == [outcome == "COMMIT"]
        assert [m.id for m in backend.messages()] == ([writer.id] if outcome == "COMMIT" else [])

    # -- the doorbell --------------------------------------------------------

    def test_the_doorbell_rings_again_after_its_connection_is_cut(self) -> None:
        backend = self.make_backend()
        wakeups = backend.start_delivering()
        try:
            fd = wakeups.fileno()
            (killed,) = self.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'mmdf-smtp-listen'",
            )
            assert killed == (True,)
            assert _readable(fd)
            # Rung once connected and listening again: notices may have been missed.
            assert wakeups.drain().new_mail
            queue_one(self.make_backend())
            assert _readable(fd)
            assert wakeups.drain().new_mail
            assert wakeups.fileno() == fd
        finally:
            wakeups.close()

    def test_the_commits_of_a_moment_share_one_notify(self) -> None:
        """New mail's NOTIFY comes after the commits, and those of the next
        _NOTIFY_GAP share it: a hundred commits in a row, a few NOTIFYs,
        and every commit's sent before close() returns."""
        with psycopg.connect(self.dsn, autocommit=True) as listener:
            listener.execute(f"LISTEN {CHANNEL}")
            backend = self.make_backend()
            writers = []
            for _ in range(100):
                writer = backend.open(envelope())
                writer.write(BODY)
                writers.append(writer)
            started = time.monotonic()
            for writer in writers:  # as the commit process does, group by group
                assert backend.commit_all([writer]) == [None]
            backend.close()
            took = time.monotonic() - started
            notices = [n.payload for n in listener.notifies(timeout=1.0)]
        assert notices, "no wake-up for new mail"
        assert set(notices) == {"new"}
        # Without the sharing, a hundred; with it, one a gap at most.
        assert len(notices) < 100
        assert len(notices) <= took / _NOTIFY_GAP + 2

    def test_flush_without_deliverers_says_so(self) -> None:
        backend = self.make_backend()
        assert backend.flush() is False
        backend.start_delivering().close()
        assert backend.flush() is False  # it said goodbye

    # -- leases ----------------------------------------------------------------

    def _age_leases(self) -> None:
        """As if the lease's time had passed: its renewal put ten minutes back."""
        self.sql("UPDATE mmdf_message SET lease_renewed = lease_renewed - interval '10 minutes'")

    def test_a_renewed_lease_is_not_taken(self) -> None:
        backend, other = self.make_backend(), self.make_backend()
        queue_one(backend)
        (lease,) = backend.claim(10, NOW)
        self._age_leases()
        lease.renew()
        assert other.claim(10, NOW) == []
        self._age_leases()
        (taken,) = other.claim(10, NOW)
        with pytest.raises(LeaseLost):
            lease.renew()
        lease.end()  # does not touch the new holder's lease
        assert other.claim(10, NOW) == []
        assert backend.next_due() is None  # nothing free waits
        taken.end()
        assert backend.next_due() is not None

    def test_a_record_renews_the_lease_and_sets_when_due(self) -> None:
        backend, other = self.make_backend(), self.make_backend()
        queue_one(backend)
        (lease,) = backend.claim(10, NOW)
        self._age_leases()
        later = NOW + timedelta(minutes=10)
        lease.record(deferred(expanded(lease), 0, later))
        assert other.claim(10, NOW, flush_all=True) == []
        # Its holder dies without ending it: due when its state says, not at once.
        self._age_leases()
        assert other.claim(10, NOW) == []
        (again,) = other.claim(10, later)
        assert again.resumed
        again.end()

    # -- rows of messages gone, and what cannot be read ------------------------

    def test_a_gone_messages_row_is_purged_after_an_hour(self) -> None:
        backend = self.make_backend()
        done, deleted, kept = queue_one(backend), queue_one(backend), queue_one(backend)
        (lease, *others) = backend.claim(10, NOW)
        assert lease.id == done
        lease.complete()
        for other in others:
            other.end()
        backend.delete(deleted, wait=1)
        assert self.sql("SELECT id, gone FROM mmdf_message ORDER BY id") == [
            (done, "completed"),
            (deleted, "deleted"),
            (kept, None),
        ]
        backend.recover()
        assert len(self.sql("SELECT id FROM mmdf_message")) == 3  # not an hour yet
        self.sql("UPDATE mmdf_message SET arrived = arrived - interval '61 minutes'")
        backend.recover()
        assert self.sql("SELECT id FROM mmdf_message") == [(kept,)]

    def test_a_message_that_cannot_be_read_is_set_aside(self) -> None:
        backend = self.make_backend()
        broken, whole = queue_one(backend), queue_one(backend)
        self.sql("UPDATE mmdf_message SET envelope = '{\"sender\": 1' WHERE id = %s", broken)
        assert [m.id for m in backend.messages()] == [whole]
        (lease,) = backend.claim(10, NOW)
        assert lease.id == whole
        lease.end()
        (aside,) = backend.set_aside()
        assert (aside.name, aside.size) == (broken, len(BODY))
        assert aside.reason.startswith("cannot be read: JSONDecodeError")
        assert backend.claim(10, NOW, flush_all=True)[0].id == whole
        self.sql("UPDATE mmdf_message SET arrived = arrived - interval '1 day'")
        backend.recover()
        assert [a.name for a in backend.set_aside()] == [broken]  # kept for the administrator
        with backend.open_set_aside(broken) as whole_file:
            assert whole_file.read() == b'{"sender": 1\n' + BODY
        with pytest.raises(KeyError):
            backend.open_set_aside(whole)
        assert not backend.delete_set_aside(whole)
        assert backend.delete_set_aside(broken)
        assert backend.set_aside() == []
        assert self.sql("SELECT message_id FROM mmdf_chunk WHERE message_id = %s", broken) == []
        assert not backend.delete_set_aside(broken)

    def test_the_administrator_sees_the_queue_named_without_its_password(self) -> None:
        backend = PostgresQueue(self.dsn + " password=secret", staging=self.staging)
        assert "secret" not in backend.name
        assert "password" not in backend.name
        assert backend.name in backend.doorbell

    # -- the schema ----------------------------------------------------------

    def test_the_schema_is_made_once_with_its_version(self) -> None:
        self.make_backend().prepare()
        self.make_backend().prepare()
        assert self.sql("SELECT version FROM mmdf_schema") == [(1,)]

    def test_a_newer_schema_is_refused(self) -> None:
        self.make_backend().prepare()
        self.sql("INSERT INTO mmdf_schema (version) VALUES (2)")
        with pytest.raises(OSError, match="schema version 2"):
            self.make_backend().prepare()
