"""Queue administration: hold, release, delete and flush, against a running
deliver where it matters; quarantined messages; checkque's listing."""

from __future__ import annotations

import json
import os
import queue
import re
import smtplib
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.cli import checkque as checkque_module
from mmdf_smtp.cli.checkque import LONGEST, duration
from mmdf_smtp.milter import codec
from mmdf_smtp.queue import Envelope, MessageBusy
from mmdf_smtp.queue.spool import IN_MEMORY, MessageClaim, Spool
from peer import Handler, peer
from test_deliver_wire import BODY, configure, deliver_command, maildir_messages
from test_submit_milters import milter
from wire import PYTHON, checkque, daemon, env, queued, write_config

ENVELOPE = Envelope(
    sender="sender@example.net",
    recipients=("far@relay.test",),
    channel="local",
    remote_host="client.test",
    remote_addr="127.0.0.1",
    helo="client.test",
    received=datetime(2026, 11, 24, 3, 30, 0, tzinfo=UTC),
)


def put(spool: Spool, envelope: Envelope = ENVELOPE, marker: str = "") -> str:
    """Queue a message through the spool's own commit; its id."""
    writer = spool.open(envelope)
    writer.write(BODY + f"marker {marker}\r\n".encode())
    writer.commit()
    return writer.id


def now_envelope(**changes: Any) -> Envelope:
    return replace(ENVELOPE, received=datetime.now(UTC), **changes)


class Deliver:
    """deliver as a service, its log read by a thread, so that waiting for a
    line has a bound (a test that waits for ever proves nothing)."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            deliver_command(config), stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env()
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("waiting for messages")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line.decode(errors="replace"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"deliver did not log {text!r}:\n{''.join(self.seen)}"
                ) from None
            assert line is not None, f"deliver ended before logging {text!r}:\n{''.join(self.seen)}"
            self.seen.append(line)
            if text in line:
                return line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        self.process.stderr.close()


@contextmanager
def running_deliver(config: Path) -> Iterator[Deliver]:
    deliver = Deliver(config)
    try:
        yield deliver
    finally:
        deliver.stop()


Admin = Callable[..., tuple[int, str, str]]


def admin(config: Path, *args: str) -> tuple[int, str, str]:
    """checkque as a program: status, stdout, stderr."""
    result = checkque(config, *args)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.fixture
def here(capsys: pytest.CaptureFixture[str]) -> Admin:
    """checkque run in the test's process (a program's start-up costs more than its work)."""

    def run(config: Path, *args: str) -> tuple[int, str, str]:
        try:
            status = checkque_module.main(["-c", str(config), *args])
        except SystemExit as exc:
            assert isinstance(exc.code, int)
            status = exc.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def lmtp_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    return configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n{extra}')


def markers(handler: Handler) -> list[str]:
    return [m.content.rsplit(b"marker ", 1)[1].strip().decode() for m in handler.messages]


# -- against a running deliver --------------------------------------------------


def test_hold_delete_and_release_beside_a_delivery_under_way(tmp_path: Path) -> None:
    """A message deliver is working is neither held nor deleted (busy); the
    others are, at once; a held one stays until released, then goes."""
    handler = Handler(lmtp=True, release=threading.Event())
    with peer(handler) as (_, port):
        # One at a time: the others are not claimed while the first is at the hop.
        config = lmtp_config(tmp_path, port, "concurrency = 1\n")
        spool = Spool(tmp_path / "spool")
        # Queued before deliver starts: it gives the spool to its user then.
        working, held, deleted, last = (put(spool, now_envelope(), str(n)) for n in range(4))
        with running_deliver(config) as deliver:
            assert handler.arrived.wait(30)  # deliver is in the middle of the first
            for command in ("--hold", "--delete"):
                status, out, err = admin(config, "--wait", "0.2", command, working)
                assert (status, out) == (1, "")
                assert err == f"checkque: {working}: busy: being delivered (waited 0.2 s)\n"
            assert admin(config, "--hold", f"msg.{held}") == (0, f"{held}: held\n", "")
            assert admin(config, "--delete", deleted) == (0, f"{deleted}: deleted\n", "")
            assert handler.release is not None
            handler.release.set()
            deliver.wait_for(f"id={working} removed")
            # In arrival order, in the same pass: the held one was passed by.
            deliver.wait_for(f"id={last} removed")
            assert markers(handler) == ["0", "3"]
            assert (spool.hold_dir / held).exists() and not (spool.queue / held).exists()
            assert not (spool.queue / deleted).exists() and not (spool.state / deleted).exists()
            [shown] = queued(config, "held")
            assert (shown["id"], shown["quarantine"]) == (held, None)
            assert queued(config) == []

            assert admin(config, "--release", held) == (0, f"{held}: released\n", "")
            deliver.wait_for(f"id={held} removed")
            assert markers(handler) == ["0", "3", "1"]
    assert queued(config, "held") == []


def test_flush_retries_a_deferred_recipient_at_once(tmp_path: Path) -> None:
    replies = {"far@relay.test": "451 4.3.0 Try again later"}
    handler = Handler(data=replies.get, lmtp=True)
    with peer(handler) as (_, port):
        # An hour to the next try: only a flush brings the retries now.
        config = lmtp_config(tmp_path, port, "retry_min = 3600\n")
        spool = Spool(tmp_path / "spool")
        first, second = put(spool, now_envelope(), "1"), put(spool, now_envelope(), "2")
        with running_deliver(config) as deliver:
            # Delivered side by side: in either order.
            tried = [deliver.wait_for("to=<far@relay.test> relay=lmtp") for _ in range(2)]
            assert sorted(line.split("id=")[1].split()[0] for line in tried) == [first, second]
            assert [s["states"][0]["status"] for s in queued(config)] == ["deferred"] * 2
            replies.clear()
            assert admin(config, "--flush", f"msg.{first}") == (
                0,
                f"{first}: flush requested\n",
                "",
            )
            line = deliver.wait_for(f"id={first} to=<far@relay.test>")
            assert "attempts=2 status=delivered" in line
            deliver.wait_for(f"id={first} removed")
            # Only the one named was due in that pass.
            [left] = queued(config)
            assert (left["id"], left["states"][0]["attempts"]) == (second, 1)
            assert admin(config, "--flush", "ALL") == (0, "flush requested\n", "")
            deliver.wait_for(f"id={second} removed")
    assert markers(handler) == ["1", "2"]
    status, out, err = admin(config, "--flush", "ALL")
    assert (status, out) == (1, "")
    assert err == f"checkque: no deliver listens on {tmp_path}/spool/deliver.sock\n"


def test_a_quarantined_message_is_held_until_released(tmp_path: Path) -> None:
    """Over the wire: a milter's SMFIR_QUARANTINE; the message goes through
    smtpd's commit process into hold/, and deliver leaves it there."""
    reason = "suspicious attachment"
    end = [codec.Quarantine(reason=reason), codec.Continue()]
    with milter({b"E": end}) as milter_peer:
        config = configure(tmp_path, f'[[milters]]\nsocket = "{milter_peer.socket}"\n')
        with daemon(config) as server:
            with smtplib.SMTP(server.host, server.port, timeout=30) as client:
                client.sendmail("sender@example.net", ["alice@example.org"], BODY)
            [logged] = server.log_lines(" queued id=")
    queue_id = logged.split(" queued id=")[1].split()[0]
    spool = Spool(tmp_path / "spool")
    assert spool.ids() == [] and spool.held_ids() == [queue_id]
    [shown] = queued(config, "held")
    assert (shown["id"], shown["quarantine"]) == (queue_id, reason)
    # One size: the log's is checkque's, the stored message's with its trace header.
    assert f" size={shown['size']} " in logged
    assert shown["size"] == len(checkque(config, "--cat", f"msg.{queue_id}").stdout)
    status, out, _ = admin(config)
    assert status == 0
    assert f"    quarantined: {reason}" in out.splitlines()
    # A message deliver takes, after which its start-up pass has passed the held one by.
    other = put(spool, now_envelope(recipients=("bob@example.org",)))
    owner = (spool.queue).stat()
    os.chown(spool.queue / other, owner.st_uid, owner.st_gid)
    with running_deliver(config) as deliver:
        deliver.wait_for(f"id={other} removed")
        assert spool.held_ids() == [queue_id]
        assert not (tmp_path / "mail/alice").exists()
        assert admin(config, "--release", queue_id) == (0, f"{queue_id}: released\n", "")
        deliver.wait_for(f"id={queue_id} removed")
    [message] = maildir_messages(tmp_path, "alice").values()
    assert message.endswith(b"Last line.\n")


# -- with deliver stopped ---------------------------------------------------------


def test_delete_release_and_their_errors_while_deliver_is_stopped(
    tmp_path: Path, here: Admin
) -> None:
    config = configure(tmp_path)
    spool = Spool(tmp_path / "spool")
    first, second = put(spool), put(spool)
    (spool.state / first).write_text('{"recipients": []}\n')
    missing = "0" * 26
    status, out, err = here(config, "--delete", first, f"msg.{missing}", "nonsense")
    assert (status, out) == (1, f"{first}: deleted\n")
    assert err.splitlines() == [
        f"checkque: msg.{missing}: no such message in the queue",
        "checkque: nonsense: no such message in the queue",
    ]
    assert spool.ids() == [second] and not (spool.state / first).exists()
    assert here(config, "--release", second) == (0, f"{second}: not held\n", "")
    assert here(config, "--hold", second) == (0, f"{second}: held\n", "")
    assert here(config, "--hold", second) == (0, f"{second}: already held\n", "")
    status, _, err = here(config, "--flush", second)
    assert (status, err) == (1, f"checkque: {second}: held: release it first\n")
    assert here(config, "--delete", second) == (0, f"{second}: deleted\n", "")
    assert spool.held_ids() == [] and spool.ids() == []


def test_all_with_filters(tmp_path: Path, here: Admin) -> None:
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    old = datetime.now(UTC) - timedelta(hours=3)
    from_a = put(spool, now_envelope(sender="a@example.net", recipients=("x@one.test",)))
    from_b = put(spool, now_envelope(sender="B@Example.net", recipients=("y@two.test",)))
    bounce = put(spool, now_envelope(sender="", recipients=("x@two.test", "z@one.test")))
    aged = put(spool, replace(ENVELOPE, received=old, recipients=("aged@one.test",)))
    everything = [from_a, from_b, bounce, aged]

    def listed(*filters: str) -> list[str]:
        status, out, err = here(config, "--json", *filters)
        assert status == 0, err
        return [json.loads(line)["id"] for line in out.splitlines()]

    assert listed() == everything
    assert listed("--sender", "b@example.NET") == [from_b]  # exact, but not case
    assert listed("--sender", "example.net") == []  # not a substring
    assert listed("--sender", "@example.net") == [from_a, from_b, aged]
    assert listed("--sender", "<>") == listed("--sender", "") == [bounce]
    assert listed("--recipient", "@one.test") == [from_a, bounce, aged]
    assert listed("--recipient", "x@two.test") == [bounce]
    assert listed("--older-than", "2h") == listed("--older-than", "7200") == [aged]
    assert listed("--older-than", "4h") == []

    status, out, _ = here(config, "--hold", "ALL", "--recipient", "@one.test")
    assert (status, out) == (0, "".join(f"{i}: held\n" for i in (from_a, bounce, aged)))
    assert listed("--state", "held") == [from_a, bounce, aged]
    assert listed("--state", "queued") == [from_b]
    status, out, _ = here(config, "--release", "ALL", "--sender", "@example.net")
    assert (status, out) == (0, "".join(f"{i}: released\n" for i in (from_a, aged)))
    status, out, _ = here(config, "--delete", "ALL", "--older-than", "1h")
    assert (status, out) == (0, f"{aged}: deleted\n")
    assert listed() == [from_a, from_b, bounce]
    status, out, _ = here(config, "--delete", "ALL", "--state", "held")
    assert (status, out) == (0, f"{bounce}: deleted\n")
    status, out, _ = here(config, "--delete", "ALL")
    assert (status, out) == (0, f"{from_a}: deleted\n{from_b}: deleted\n")
    assert here(config, "--delete", "ALL") == (0, "", "")  # nothing left: nothing to fail


def test_deferred_is_a_state_to_select(tmp_path: Path) -> None:
    config = configure(tmp_path)  # no next hop: a remote recipient is deferred
    spool = Spool(tmp_path / "spool")
    deferred = put(spool, now_envelope())
    result = subprocess.run(
        deliver_command(config, "--once"), capture_output=True, env=env(), check=False
    )
    assert result.returncode == 0, result.stderr
    fresh = put(spool, now_envelope())
    shown = checkque(config, "--json", "--state", "deferred").stdout.splitlines()
    assert [json.loads(line)["id"] for line in shown] == [deferred]
    sizes = sum(m.size for m in spool.messages())
    status, out, _ = admin(config, "--state", "queued")  # deferred ones are queued too
    assert status == 0
    assert [line.split()[0] for line in out.splitlines() if line[:26] in (deferred, fresh)] == [
        deferred,
        fresh,
    ]
    assert out.endswith(f"2 messages, {sizes} bytes\n")


def test_usage_errors(tmp_path: Path, here: Admin) -> None:
    config = write_config(tmp_path)
    for args in (
        ("--hold", "ALL", "0" * 26),
        ("--hold", "0" * 26, "--sender", "a@example.net"),
        ("--cat", "0" * 26, "--state", "held"),
        ("--older-than", "2 fortnights"),
        ("--state", "lost"),
        ("--hold", "ALL", "--delete", "ALL"),
        ("--wait", "-1", "--hold", "ALL"),
    ):
        status, out, err = here(config, *args)
        assert (status, out) == (64, ""), args
        assert err.startswith("usage: checkque"), args


# -- checkque's listing -------------------------------------------------------------


def test_the_listing_of_queued_and_held_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    queued_id = put(spool, replace(ENVELOPE, recipients=("far@relay.test", "other@relay.test")))
    held_id = put(
        spool,
        replace(
            ENVELOPE,
            sender="a.much.longer.sender@example.net",
            channel="smtp",
            quarantine="a milter's reason",
        ),
    )
    sizes = {m.id: m.size for m in [*spool.messages(), *spool.messages(held=True)]}
    assert checkque_module.main(["-c", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "id                          size  received (UTC)       channel  state   from"
        "                                to",
        f"{queued_id}  {sizes[queued_id]:>4}  2026-11-24 03:30:00  local    queued  "
        "<sender@example.net>                far@relay.test (+1)",
        "    pending    far@relay.test",
        "    pending    other@relay.test",
        f"{held_id}  {sizes[held_id]:>4}  2026-11-24 03:30:00  smtp     held    "
        "<a.much.longer.sender@example.net>  far@relay.test",
        "    quarantined: a milter's reason",
        "    pending    far@relay.test",
        f"2 messages (1 held), {sizes[queued_id] + sizes[held_id]} bytes",
    ]
    assert checkque_module.main(["-c", str(config), "--state", "held"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"1 message (1 held), {sizes[held_id]} bytes"
    assert checkque_module.main(["-c", str(config), "--sender", "nobody@example.net"]) == 0
    assert capsys.readouterr().out == f"no message in queue {spool.directory} matches\n"
    assert checkque_module.main(["-c", str(config), "--cat", f"msg.{held_id}"]) == 0
    assert capsys.readouterr().out.endswith("marker \r\n")


def test_one_byte_and_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    writer = Spool(tmp_path / "spool").open(ENVELOPE)
    writer.write(b"x")
    writer.commit()
    assert checkque_module.main(["-c", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 message, 1 byte"


def test_without_c_the_empty_queue_names_its_spool(tmp_path: Path) -> None:
    """No -c: $MMDF_CONFIG, else /etc/mmdf/mmdf.toml, else the embedded default."""
    config = write_config(tmp_path)
    result = subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.checkque"],
        capture_output=True,
        env={**env(), "MMDF_CONFIG": str(config)},
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"queue {tmp_path}/spool is empty\n".encode())


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["", "s", "m", "h", "d", "w"]))
def test_durations(number: int, unit: str) -> None:
    seconds = number * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    if seconds > LONGEST:
        with pytest.raises(ValueError, match="longer than a century"):
            duration(f"{number}{unit}")
    else:
        assert duration(f" {number}{unit}") == timedelta(seconds=seconds)


@given(st.text(max_size=12))
def test_a_duration_is_a_number_and_a_unit_or_nothing(text: str) -> None:
    try:
        parsed = duration(text)
    except ValueError:
        return
    assert re.fullmatch(r"[0-9]+[smhdw]?", text.strip())
    assert parsed >= timedelta(0)


# -- the spool underneath --------------------------------------------------------------


@pytest.mark.parametrize("size", [10, IN_MEMORY * 3])
def test_a_quarantined_message_is_committed_into_hold(tmp_path: Path, size: int) -> None:
    spool = Spool(tmp_path / "spool", in_memory=IN_MEMORY)
    writer = spool.open(replace(ENVELOPE, quarantine="held by a filter"))
    writer.write(b"x" * size)
    writer.commit()
    assert spool.ids() == [] and spool.held_ids() == [writer.id]
    assert writer.size == size
    assert spool.envelope(writer.id).quarantine == "held by a filter"
    with spool.open_message(writer.id) as stored:
        assert stored.read() == b"x" * size
    [message] = spool.messages(held=True)
    assert (message.size, message.held, message.envelope.quarantine) == (
        size,
        True,
        "held by a filter",
    )
    assert oct((spool.hold_dir / writer.id).stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.parametrize("size", [10, IN_MEMORY * 3])
def test_a_quarantined_message_handed_over_is_committed_into_hold(
    tmp_path: Path, size: int
) -> None:
    """As smtpd's commit process takes a message: the token says where it goes."""
    spool = Spool(tmp_path / "spool", in_memory=IN_MEMORY)
    for quarantine in ("spam", None):
        writer = spool.open(replace(ENVELOPE, quarantine=quarantine))
        writer.write(b"y" * size)
        taken = Spool(tmp_path / "spool", in_memory=IN_MEMORY).take_over(spool.hand_over(writer))
        taken.commit()
        assert spool.take_back(writer)
    assert len(spool.held_ids()) == len(spool.ids()) == 1


def test_recovery_finishes_a_commit_into_hold_and_keeps_held_states(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    writer = spool.open(replace(ENVELOPE, quarantine="spam"))
    writer.write(b"body\r\n")
    writer.commit()
    os.chmod(spool.hold_dir / writer.id, 0o200)  # as a crash after the rename leaves it
    assert spool.held_ids() == []
    spool.recover()
    assert spool.held_ids() == [writer.id]
    (spool.state / writer.id).write_text('{"recipients": []}\n')
    (spool.state / ("f" * 26)).write_text('{"recipients": []}\n')
    assert spool.forget_orphans() == ["f" * 26]
    assert (spool.state / writer.id).exists()  # the held message's state stays


def test_deliver_holds_a_message_and_the_administrator_does_not_wait_for_ever(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    queue_id = put(spool)
    claim = spool.claim_one(queue_id)
    assert claim is not None
    with claim:
        for act in (spool.hold, spool.release, spool.delete):
            with pytest.raises(MessageBusy):
                act(queue_id, wait=0)
    assert spool.hold(queue_id, wait=0)
    assert spool.claim_one(queue_id) is None  # deliver passes a held message by
    assert spool.release(queue_id, wait=0)
    spool.delete(queue_id, wait=0)
    for act in (spool.hold, spool.release, spool.delete):
        with pytest.raises(KeyError):
            act(queue_id, wait=0)
    assert spool.claim_one(queue_id) is None


def test_the_log_and_checkque_give_one_size(tmp_path: Path) -> None:
    """size=: the stored message as queued, our Received header included."""
    config = write_config(tmp_path)
    with daemon(config) as server:
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            reply = client.sendmail("sender@example.net", ["alice@example.org"], BODY)
            assert reply == {}
        [logged] = server.log_lines(" queued id=")
    [shown] = queued(config)
    stored = checkque(config, "--cat", f"msg.{shown['id']}").stdout
    assert stored.startswith(b"Received: from ")
    assert f" queued id={shown['id']} " in logged
    assert f" size={len(stored)} " in logged
    assert shown["size"] == len(stored)


def test_a_lock_had_on_a_file_since_moved_or_removed_is_let_go(tmp_path: Path) -> None:
    """The lock is on the file, not its name: who gets it after the file was
    moved (held) or removed (delivered) under the name it opened finds out."""
    spool = Spool(tmp_path / "spool")
    queue_id = put(spool)
    results: list[object] = []

    def deliver_side() -> None:
        results.append(spool.claim_one(queue_id))

    # The administrator has the lock when deliver asks for it: deliver
    # waits, and finds the name gone once it has the lock.
    locked = threading.Event()
    real_lock = spool._lock_for_admin

    def lock_then_start_deliver(queue_id: str, *, wait: float) -> MessageClaim:
        claim = real_lock(queue_id, wait=wait)
        thread.start()  # it waits for the lock, or comes after the move: either way...
        locked.set()
        return claim

    thread = threading.Thread(target=deliver_side)
    spool._lock_for_admin = lock_then_start_deliver  # type: ignore[method-assign]
    try:
        assert spool.hold(queue_id, wait=0)
    finally:
        del spool._lock_for_admin
    assert locked.is_set()
    thread.join(30)
    assert results == [None]  # ...it does not deliver a held message

    assert spool.release(queue_id, wait=0)
    delivering = spool.claim_one(queue_id)
    assert delivering is not None

    def administrator_side() -> None:
        try:
            spool.delete(queue_id, wait=30)
        except KeyError:
            results.append("gone")

    thread = threading.Thread(target=administrator_side)
    thread.start()
    with delivering:
        spool.remove(queue_id)  # delivered
    thread.join(30)
    assert results == [None, "gone"]
