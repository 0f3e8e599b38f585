"""deliver as a program: beside the daemon, with swaks, a next hop, kill -9 and signals."""

from __future__ import annotations

import mailbox
import shutil
import signal
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from mmdf_smtp.queue import Envelope
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.submission import Request
from peer import Handler, peer
from test_submit import dropped, other_user
from wire import PYTHON, checkque, daemon, env, queued, session_uid, write_config

BODY = (
    b"Subject: over the wire\r\n"
    b"From: sender@example.net\r\n"
    b"To: alice@example.org\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".A line that starts with a dot.\r\n"
    b"\r\n"
    b"Tabs\tand trailing spaces   \r\n"
    b"Last line.\r\n"
)


def configure(directory: Path, extra: str = "", *, at_commit: bool = False) -> Path:
    """A configuration whose Maildirs lie under ``directory/mail``.

    Started as root, deliver creates that folder for the configured
    ``user`` and writes the Maildirs as that user.  ``at_commit``: smtpd
    delivers local mail at commit time; off, all mail goes through the
    queue, as these tests of deliver want.
    """
    (directory / "aliases").write_text("staff: alice, bob\n")
    local = (
        f'maildir = "{directory}/mail/{{user}}/Maildir"\naliases = "{directory}/aliases"\n'
        f"deliver_at_commit = {'true' if at_commit else 'false'}\n"
    )
    return write_config(directory, local + extra)


def deliver_command(config: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "mmdf_smtp.cli.deliver", "-c", str(config), *args]


def run_deliver(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        deliver_command(config, *args), capture_output=True, env=env(), timeout=60, check=False
    )


def wait_for(process: subprocess.Popen[bytes], text: str, count: int = 1) -> list[str]:
    """Read deliver's log until ``count`` lines hold ``text``."""
    assert process.stderr is not None
    found: list[str] = []
    while len(found) < count:
        line = process.stderr.readline().decode()
        assert line, f"deliver ended before logging {text!r}"
        if text in line:
            found.append(line)
    return found


@contextmanager
def deliver_service(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        deliver_command(config), stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env()
    )
    try:
        wait_for(process, "waiting for messages")
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()


def maildir_messages(directory: Path, user: str) -> dict[str, bytes]:
    box = mailbox.Maildir(directory / "mail" / user / "Maildir", factory=None, create=False)
    return {key: box.get_bytes(key) for key in box.iterkeys()}


def test_swaks_to_the_daemon_lands_in_the_maildir(tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    config = configure(tmp_path)
    data = tmp_path / "message.eml"
    data.write_bytes(BODY.removesuffix(b"\r\n"))  # swaks ends the data with CRLF . CRLF
    with deliver_service(config) as deliverer, daemon(config) as server:
        sent = subprocess.run(
            [
                *(swaks, "--server", f"{server.host}:{server.port}"),
                *("--from", "sender@example.net", "--to", "alice@example.org"),
                *("--data", str(data)),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout.decode()
        # Nothing is deferred, so deliver sleeps without a timeout: only the
        # spool's poke can have woken it.
        [line] = wait_for(deliverer, "status=delivered")
    assert "to=<alice@example.org> relay=maildir attempts=1" in line
    [message] = maildir_messages(tmp_path, "alice").values()
    # Started as root, deliver wrote as the configured user, in a folder it made for it.
    [path] = (tmp_path / "mail/alice/Maildir/new").iterdir()
    assert path.stat().st_uid == (tmp_path / "mail").stat().st_uid == session_uid()
    assert message.startswith(
        b"Return-Path: <sender@example.net>\nDelivered-To: alice@example.org\nReceived: from "
    )
    assert message.endswith(b"\n\n" + BODY.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    box = mailbox.Maildir(tmp_path / "mail/alice/Maildir", create=False)
    [parsed] = box
    assert parsed["Subject"] == "over the wire"
    assert parsed.get_payload(
        decode=True
    ) == b"First line.\n.A line that starts with a dot.\n\n" + (
        b"Tabs\tand trailing spaces   \nLast line.\n"
    )
    assert queued(config) == []


def test_a_relayed_message_reaches_the_lmtp_next_hop(tmp_path: Path) -> None:
    handler = Handler(lmtp=True)
    with peer(handler) as (_, port):
        config = configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n')
        with deliver_service(config) as deliverer, daemon(config) as server:
            with smtplib.SMTP(server.host, server.port, timeout=30) as client:
                refused = client.sendmail(
                    "sender@example.net", ["far@relay.test", "staff@example.org"], BODY
                )
            assert refused == {}
            lines = wait_for(deliverer, "status=delivered", count=3)
    assert sorted(line.split(" relay=")[1].split()[0] for line in lines) == [
        f"lmtp:[127.0.0.1]:{port}",
        "maildir",
        "maildir",
    ]
    [received] = handler.messages
    assert received.sender == "sender@example.net"
    assert received.recipients == ["far@relay.test"]
    assert received.content.startswith(b"Received: from ")
    assert received.content.endswith(b"\r\n\r\n" + BODY.split(b"\r\n\r\n", 1)[1])
    assert len(maildir_messages(tmp_path, "alice")) == 1
    assert len(maildir_messages(tmp_path, "bob")) == 1


def test_a_4xx_from_the_peer_defers_and_flush_delivers(tmp_path: Path) -> None:
    replies = {"far@relay.test": "451 4.3.0 Try again later"}
    handler = Handler(data=replies.get, lmtp=True)
    with peer(handler) as (_, port):
        config = configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n')
        queue_many(Spool(tmp_path / "spool"), 1, recipients=("far@relay.test",))
        first = run_deliver(config, "--once")
        assert b"status=deferred (451 4.3.0 Try again later)" in first.stderr
        [shown] = queued(config)
        assert [s["status"] for s in shown["states"]] == ["deferred"]
        again = run_deliver(config, "--once")  # not due for a minute: nothing is tried
        assert b"status=" not in again.stderr
        replies.clear()
        flushed = run_deliver(config, "--once", "--flush")
        assert b"relay=lmtp:[127.0.0.1]:" in flushed.stderr
        assert b"attempts=2 status=delivered (250 2.0.0 OK)" in flushed.stderr
    assert queued(config) == []
    [received] = handler.messages
    assert received.recipients == ["far@relay.test"]


def test_sigterm_lets_the_delivery_under_way_finish(tmp_path: Path) -> None:
    handler = Handler(lmtp=True, release=threading.Event())
    with peer(handler) as (_, port):
        config = configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n')
        # Queued before deliver starts: it gives the spool to its user then.
        queue_many(Spool(tmp_path / "spool"), 1, recipients=("far@relay.test",))
        with deliver_service(config) as deliverer:
            assert handler.arrived.wait(30)
            deliverer.send_signal(signal.SIGTERM)
            assert handler.release is not None
            handler.release.set()
            [line] = wait_for(deliverer, "status=")
            assert "to=<far@relay.test>" in line and "status=delivered" in line
            wait_for(deliverer, "stopped")
            assert deliverer.wait(timeout=30) == 0
    assert len(handler.messages) == 1
    assert queued(config) == []


def queue_many(
    spool: Spool,
    count: int,
    recipients: tuple[str, ...] = ("alice@example.org", "staff@example.org"),
) -> list[str]:
    ids = []
    for n in range(count):
        writer = spool.open(
            Envelope(
                sender="sender@example.net",
                recipients=recipients,
                channel="local",
                remote_host="client.test",
                remote_addr="127.0.0.1",
                helo="client.test",
                received=datetime.now(UTC),
            )
        )
        writer.write(BODY + f"message {n}\r\n".encode())
        writer.commit()
        ids.append(writer.id)
    return ids


# Killed well before the end: a busy machine may let deliver run on a while.
@pytest.mark.parametrize("kill_after", [1, 25, 60])
def test_kill_9_mid_pass_and_a_restart_deliver_each_message_once(
    tmp_path: Path, kill_after: int
) -> None:
    config = configure(tmp_path)
    ids = queue_many(Spool(tmp_path / "spool"), 60)  # 120 deliveries: alice and bob each
    process = subprocess.Popen(deliver_command(config, "--once"), stderr=subprocess.PIPE, env=env())
    wait_for(process, "status=delivered", count=kill_after)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.stderr is not None
    process.stderr.close()
    left = queued(config)
    assert left, "deliver finished before it was killed"
    assert any(s["status"] == "pending" for m in left for s in m["states"])
    again = run_deliver(config, "--once")
    assert again.returncode == 0, again.stderr.decode()
    assert queued(config) == []
    for user in ("alice", "bob"):
        names = sorted(maildir_messages(tmp_path, user))
        delivered = sorted(name.split(".")[1][1:27] for name in names)
        assert delivered == sorted(ids), user
        for name, message in maildir_messages(tmp_path, user).items():
            n = ids.index(name.split(".")[1][1:27])
            assert message.endswith(f"\nmessage {n}\n".encode())


def test_deferred_recipients_in_checkque(tmp_path: Path) -> None:
    config = configure(tmp_path)
    [queue_id] = queue_many(Spool(tmp_path / "spool"), 1)
    writer = Spool(tmp_path / "spool").open(
        Envelope(
            sender="sender@example.net",
            recipients=("far@relay.test",),
            channel="local",
            remote_host="client.test",
            remote_addr="127.0.0.1",
            helo="client.test",
            received=datetime.now(UTC),
        )
    )
    writer.write(BODY)
    writer.commit()
    result = run_deliver(config, "--once")
    assert result.returncode == 0, result.stderr.decode()
    [shown] = queued(config)
    assert shown["id"] == writer.id
    [state] = shown["states"]
    assert state["recipient"] == state["address"] == "far@relay.test"
    assert (state["status"], state["attempts"]) == ("deferred", 1)
    assert state["last_reply"] == "451 4.4.0 No next hop configured for non-local mail"
    tried = datetime.fromisoformat(state["last_try"])
    assert (datetime.fromisoformat(state["next_try"]) - tried).total_seconds() == 60
    table = checkque(config).stdout.decode().splitlines()
    assert table[2].split(";")[0] == "    deferred   far@relay.test"
    assert table[2].endswith("; 451 4.4.0 No next hop configured for non-local mail")
    assert queue_id not in "\n".join(table)  # the local message was delivered and removed


def test_signals_and_a_second_deliver(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with deliver_service(config) as deliverer:
        trigger = tmp_path / "spool/deliver.sock"
        assert trigger.exists()
        second = run_deliver(config)
        assert second.returncode == 75
        assert b"another deliver is running" in second.stderr
        asked = run_deliver(config, "--once", "--flush")
        assert asked.returncode == 0
        assert b"asked the running deliver for a pass" in asked.stderr
        (tmp_path / "aliases").write_text("broken line\n")
        deliverer.send_signal(signal.SIGHUP)
        [line] = wait_for(deliverer, "reload failed")
        assert f"{tmp_path}/aliases:1: expected 'name: target, target'" in line
        (tmp_path / "aliases").write_text("staff: alice\n")
        deliverer.send_signal(signal.SIGHUP)
        wait_for(deliverer, f"configuration reloaded from {config}")
        deliverer.send_signal(signal.SIGTERM)
        wait_for(deliverer, "stopped")
        assert deliverer.wait(timeout=30) == 0
    assert not trigger.exists()


def test_command_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[deliver]\nnext_hop = "pigeon:loft"\n')
    result = run_deliver(bad, "--once")
    assert result.returncode == 78
    assert f"{bad}:2: deliver.next_hop: 'pigeon:loft': expected".encode() in result.stderr
    assert run_deliver(bad, "--bogus").returncode == 64


def test_deliver_picks_up_what_a_user_left_in_the_maildrop(tmp_path: Path) -> None:
    config = configure(tmp_path)
    user = other_user()
    dropped(
        config,
        b"Subject: from a user\n\nhello from the maildrop\n",
        Request(recipients=("alice",)),
        user.pw_uid,
        user.pw_gid,
    )
    result = run_deliver(config, "--once")
    assert result.returncode == 0, result.stderr
    box = mailbox.Maildir(tmp_path / "mail" / "alice" / "Maildir", create=False)
    [message] = list(box)
    assert message["Subject"] == "from a user"
    assert message.get_payload() == "hello from the maildrop\n"
    # The trace names the submitter as pickup found it: the file's owner.
    assert f"(from {user.pw_name}@localhost)" in message["Received"]
    assert queued(config) == []  # delivered, and gone from the queue


def test_a_password_file_only_root_can_read_is_read_before_deliver_gives_up_root(
    tmp_path: Path,
) -> None:
    from test_deliver_security import PASSWORD, USER, Accounts, server_context

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    password = tmp_path / "relay.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)  # root's: the user deliver becomes cannot read it
    accounts = Accounts()
    context = server_context(ca, "relay.test")
    with peer(Handler(), tls=context, authenticator=accounts) as (handler, port):
        config = configure(
            tmp_path,
            f'[deliver]\nnext_hop = "smtp:127.0.0.1:{port}"\ntls = "verify"\n'
            f'tls_ca_file = "{tmp_path / "ca.pem"}"\ntls_name = "relay.test"\n'
            f'auth_user = "{USER}"\nauth_password_file = "{password}"\n',
        )
        queue_many(Spool(tmp_path / "spool"), 1, recipients=("far@relay.test",))
        result = run_deliver(config, "--once")
    assert result.returncode == 0, result.stderr
    assert b"attempts=1 status=delivered (250 2.0.0 OK)" in result.stderr
    assert PASSWORD.encode() not in result.stderr
    [received] = handler.messages
    assert (received.recipients, received.tls, received.login) == (
        ["far@relay.test"],
        True,
        USER.encode(),
    )
    assert accounts.mechanisms == ["PLAIN"]
