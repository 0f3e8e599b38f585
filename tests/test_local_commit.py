"""Local mail delivered at commit time by smtpd's commit process, over the wire.

A message for local mailboxes only is in its Maildirs when the 250 comes,
and never in the queue; anything else is queued for deliver, which
delivers every copy exactly once, those the commit wrote included.
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
from pathlib import Path

import pytest

from peer import Handler, peer
from test_deliver_wire import BODY, maildir_messages, run_deliver
from test_deliver_wire import configure as configure_deliver
from test_metrics import samples, scrape, value
from wire import daemon, queued, session_uid, stored

SENDER = "sender@example.net"


def configure(directory: Path, extra: str = "") -> Path:
    return configure_deliver(directory, extra, at_commit=True)


def send(port: int, recipients: list[str], *, rcpt_options: tuple[str, ...] = ()) -> str:
    """One message over SMTP; its queue id, from the 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        for recipient in recipients:
            assert client.rcpt(recipient, list(rcpt_options))[0] == 250
        code, text = client.data(BODY)
    assert code == 250, text
    return text.decode().rsplit("(", 1)[1].rstrip(")")


def stored_as(message: bytes, recipient: str) -> bytes:
    """What a Maildir copy of BODY for ``recipient`` holds, after its Received header."""
    head = f"Return-Path: <{SENDER}>\nDelivered-To: {recipient}\n".encode()
    assert message.startswith(head + b"Received: from "), message[:200]
    lines = message[len(head) :].split(b"\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\n".join(lines[i:])


LF_BODY = BODY.replace(b"\r\n", b"\n")


def copies(directory: Path) -> list[Path]:
    """Every Maildir copy under ``directory/mail``."""
    return sorted((directory / "mail").glob("*/Maildir/new/*"))


def test_a_local_message_is_in_the_maildir_when_the_250_comes(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with daemon(config) as server:
        queue_id = send(server.port, ["alice@example.org"])
        # No deliver runs: the copy can only be the commit's.
        [(key, message)] = maildir_messages(tmp_path, "alice").items()
        assert queued(config) == []
        [line] = server.log_lines("status=delivered")
    assert f".M{queue_id}R0." in key
    assert stored_as(message, "alice@example.org") == LF_BODY
    [path] = (tmp_path / "mail/alice/Maildir/new").iterdir()
    assert path.stat().st_uid == session_uid()
    assert list((tmp_path / "mail/alice/Maildir/tmp").iterdir()) == []
    # deliver's line, in smtpd's log.
    assert f"id={queue_id} to=<alice@example.org> relay=maildir attempts=1" in line
    assert f"status=delivered (250 2.0.0 Delivered to maildir as {path.name})" in line


def test_two_local_recipients_and_an_extension(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with daemon(config) as server:
        queue_id = send(server.port, ["alice+news@example.org", "staff@example.org"])
        assert queued(config) == []
    [alice] = maildir_messages(tmp_path, "alice").values()
    [bob] = maildir_messages(tmp_path, "bob").values()
    # alice+news is alice's, named as given; staff is alice (seen already) and bob.
    assert stored_as(alice, "alice+news@example.org") == LF_BODY
    assert stored_as(bob, "bob@example.org") == LF_BODY
    names = sorted(p.name for p in (tmp_path / "mail").glob("*/Maildir/new/*"))
    assert [name.split(".")[1] for name in names] == [f"M{queue_id}R0", f"M{queue_id}R1"]


def test_a_local_and_a_remote_recipient_are_queued_and_the_local_copy_written_once(
    tmp_path: Path,
) -> None:
    handler = Handler(lmtp=True)
    with peer(handler) as (_, port):
        config = configure(tmp_path, f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{port}"\n')
        with daemon(config) as server:
            queue_id = send(server.port, ["alice@example.org", "far@relay.test"])
            assert copies(tmp_path) == []
            [shown] = queued(config)
            assert shown["id"] == queue_id
        delivered = run_deliver(config, "--once")
        assert delivered.stderr.count(b"status=delivered") == 2, delivered.stderr
        assert run_deliver(config, "--once").stderr.count(b"status=") == 0
    assert queued(config) == []
    [message] = maildir_messages(tmp_path, "alice").values()
    assert stored_as(message, "alice@example.org") == LF_BODY
    [received] = handler.messages
    assert received.recipients == ["far@relay.test"]


def test_an_alias_to_a_remote_address_is_queued(tmp_path: Path) -> None:
    config = configure(tmp_path)
    (tmp_path / "aliases").write_text("staff: alice, bob\nfar: someone@relay.test\n")
    with daemon(config) as server:
        queue_id = send(server.port, ["far@example.org"])
        [shown] = queued(config)
    assert shown["id"] == queue_id
    assert copies(tmp_path) == []


def test_notify_success_is_queued_and_deliver_sends_the_notice(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with daemon(config) as server:
        queue_id = send(server.port, ["alice@example.org"], rcpt_options=("NOTIFY=SUCCESS",))
        assert copies(tmp_path) == []
        [shown] = queued(config)
        assert shown["id"] == queue_id
    delivered = run_deliver(config, "--once")
    assert b"status=delivered" in delivered.stderr
    assert b"notice of 1 recipients queued as" in delivered.stderr
    [message] = maildir_messages(tmp_path, "alice").values()
    assert stored_as(message, "alice@example.org") == LF_BODY
    # The notice waits for a next hop (the sender is remote): a null
    # sender's delivery status report on the delivered copy.
    [notice] = queued(config)
    assert notice["sender"] == ""
    assert notice["recipients"] == [SENDER]
    shown_notice = stored(config, notice["id"])
    parsed = email.message_from_bytes(shown_notice, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    assert "Action: delivered" in status.as_string()


def test_a_maildir_that_cannot_be_written_queues_the_message_and_deliver_finishes_it(
    tmp_path: Path,
) -> None:
    config = configure(tmp_path)
    # alice's Maildir is root's: the commit process (the session user) cannot write it.
    broken = tmp_path / "mail/alice/Maildir"
    for folder in ("tmp", "new", "cur"):
        (broken / folder).mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(tmp_path / "mail", session_uid(), -1)
    for path in (broken, *broken.iterdir()):
        path.chmod(0o755 if os.geteuid() == 0 else 0o555)
    with daemon(config) as server:
        queue_id = send(server.port, ["staff@example.org"])
        [line] = server.log_lines("not delivered at commit time")
        assert f"id={queue_id} to=<alice@example.org>" in line
        # bob's copy was written at commit time, and recorded as delivered.
        assert len(maildir_messages(tmp_path, "bob")) == 1
        [shown] = queued(config)
        assert shown["id"] == queue_id
        assert [s["status"] for s in shown["states"]] == ["pending", "delivered"]
    uid = session_uid()
    for path in (broken, *broken.iterdir()):
        if os.geteuid() == 0:
            os.chown(path, uid, -1)
        path.chmod(0o700)
    delivered = run_deliver(config, "--once")
    assert delivered.stderr.count(b"status=delivered") == 1, delivered.stderr
    assert b"to=<alice@example.org>" in delivered.stderr
    assert queued(config) == []
    [alice] = maildir_messages(tmp_path, "alice").values()
    [bob] = maildir_messages(tmp_path, "bob").values()
    assert stored_as(alice, "alice@example.org") == LF_BODY
    assert stored_as(bob, "bob@example.org") == LF_BODY


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the Maildirs' folder to another account")
def test_a_maildir_folder_of_another_owner_leaves_local_mail_to_deliver(tmp_path: Path) -> None:
    config = configure(tmp_path)
    # As Debian's /var/mail: there, but not the session user's.
    (tmp_path / "mail").mkdir(mode=0o775)
    os.chown(tmp_path / "mail", 0, session_uid())
    with daemon(config) as server:
        queue_id = send(server.port, ["alice@example.org"])
        assert server.log_lines(f"does not own {tmp_path / 'mail'}")
        [shown] = queued(config)
    assert shown["id"] == queue_id
    assert copies(tmp_path) == []


def test_switched_off_local_mail_is_queued(tmp_path: Path) -> None:
    config = configure_deliver(tmp_path, at_commit=False)
    with daemon(config) as server:
        queue_id = send(server.port, ["alice@example.org"])
        [shown] = queued(config)
    assert shown["id"] == queue_id
    assert copies(tmp_path) == []


def test_copies_written_at_commit_time_are_counted_as_deliveries(tmp_path: Path) -> None:
    config = configure(tmp_path, '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    with daemon(config) as server:
        [line] = server.log_lines("metrics at http://")
        url = line.split("metrics at ", 1)[1].split()[0]
        send(server.port, ["staff@example.org"])
        server.log_lines("status=delivered", count=2)
        found = samples(scrape(url))
    assert value(found, "mmdf_deliveries_total", status="delivered", kind="local") == 2
    assert value(found, "mmdf_delivery_seconds_count", kind="local") == 2
    assert value(found, "mmdf_messages_accepted_total", channel="local") == 1
