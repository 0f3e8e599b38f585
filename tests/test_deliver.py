"""deliver's runner in-process: Maildir, aliases, the next hop, retries, notifications."""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from io import BytesIO
from pathlib import Path

import pytest
import trustme

from mmdf_smtp.cli import checkque
from mmdf_smtp.config import ConfigError, NextHop, load, parse_next_hop
from mmdf_smtp.delivery import maildir, nexthop
from mmdf_smtp.delivery.nexthop import Outcome, dot_stuffed
from mmdf_smtp.delivery.runner import Runner, backoff
from mmdf_smtp.policy.aliases import Aliases, Destination
from mmdf_smtp.queue import DeliveryState, Envelope
from mmdf_smtp.queue.spool import Spool, SpoolLease
from peer import Handler, peer, unix_lmtp_peer
from wire import write_config

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"caf\xc3\xa9 \x00 bytes as sent\r\n"
    b"\r\n"
    b"last line\r\n"
)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Setup:
    """A configuration, its spool, a clock and a runner over them."""

    def __init__(self, directory: Path, extra: str = "", *, aliases: str = "") -> None:
        (directory / "aliases").write_text(aliases)
        local = f'maildir = "{directory}/mail/{{user}}/Maildir"\naliases = "{directory}/aliases"\n'
        self.config_path = write_config(directory, local + extra)
        self.config = load(str(self.config_path))
        self.spool = Spool(self.config.spool)
        self.clock = Clock()
        self.runner = Runner(self.config, self.spool, clock=self.clock)
        self.directory = directory

    def queue(
        self,
        *recipients: str,
        sender: str = "sender@example.net",
        message: bytes = MESSAGE,
        smtputf8: bool = False,
        body: str | None = None,
    ) -> str:
        writer = self.spool.open(
            Envelope(
                sender=sender,
                recipients=recipients,
                channel="local",
                remote_host="client.test",
                remote_addr="127.0.0.1",
                helo="client.test",
                received=self.clock(),
                smtputf8=smtputf8,
                body=body,
            )
        )
        writer.write(message)
        writer.commit()
        return writer.id

    def maildir(self, user: str) -> mailbox.Maildir:
        return mailbox.Maildir(self.directory / "mail" / user / "Maildir", factory=None)

    def messages(self, user: str) -> list[bytes]:
        box = self.maildir(user)
        return [box.get_bytes(key) for key in sorted(box.keys())]


def as_delivered(recipient: str, sender: str = "sender@example.net") -> bytes:
    header = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()
    return header + MESSAGE.replace(b"\r\n", b"\n")


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def notification(data: bytes) -> tuple[EmailMessage, list[email.message.Message]]:
    """A DSN's top part and its delivery-status blocks, checked for RFC 3464's shape."""
    report = parse(data)
    assert report["Return-Path"] == "<>"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied"
    text, status, headers = report.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: test" in headers.get_content()
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.test"
    return report, blocks


# -- local delivery ------------------------------------------------------------------


def test_a_local_recipient_gets_the_message_in_maildir(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    queue_id = s.queue("alice@example.org", "postmaster")
    assert s.runner.run() is None
    assert s.messages("alice") == [as_delivered("alice@example.org")]
    assert s.messages("postmaster") == [as_delivered("postmaster@example.org")]
    [key] = s.maildir("alice").keys()
    assert key == f"{int(NOW.timestamp())}.M{queue_id}R0.mx.test"
    assert list(s.spool.messages()) == []
    assert list(s.spool.state.iterdir()) == []
    assert list((tmp_path / "mail/alice/Maildir/tmp").iterdir()) == []


def test_aliases_expand_once_per_mailbox(tmp_path: Path) -> None:
    s = Setup(tmp_path, aliases="staff: alice, bob@example.org, Alice\nall: staff, bob\n")
    s.queue("staff@example.org", "all@localhost", "bob@example.org")
    s.runner.run()
    assert s.messages("alice") == [as_delivered("alice@example.org")]
    assert s.messages("bob") == [as_delivered("bob@example.org")]


def test_alias_expansion() -> None:
    aliases = Aliases(
        {
            "staff": ("alice", "bob@example.org", "far@remote.test"),
            "loop1": ("loop2",),
            "loop2": ("loop1",),
            "alice": ("alice", "alice@remote.test"),  # keep a copy and forward one
            "pipe": ("|/usr/bin/vacation",),
            "ghost": ("nobody-here",),
        },
        users={"alice", "bob"},
        local_domains={"example.org"},
        default_domain="example.org",
    )
    assert aliases.expand("Staff@Example.ORG") == [
        Destination("alice@example.org", "alice"),
        Destination("alice@remote.test"),
        Destination("bob@example.org", "bob"),
        Destination("far@remote.test"),
    ]
    assert aliases.expand("loop1") == [
        Destination("loop1@example.org", problem="5.4.6 Alias loop: loop1 -> loop2 -> loop1")
    ]
    pipe = "|/usr/bin/vacation"
    assert aliases.expand("pipe@example.org") == [
        Destination(pipe, problem=f"5.3.5 Alias target not supported: {pipe}")
    ]
    assert aliases.expand("ghost") == [
        Destination("nobody-here@example.org", problem="5.1.1 No such user here")
    ]
    assert aliases.expand('"bob"@example.org') == [Destination("bob@example.org", "bob")]
    assert aliases.expand("postmaster") == [Destination("postmaster@example.org", "postmaster")]
    assert aliases.is_local("x@EXAMPLE.org.") and not aliases.is_local("x@example.net")


def test_alias_nesting_is_bounded() -> None:
    table = {f"a{i}": (f"a{i + 1}",) for i in range(30)}
    [found] = Aliases(table, users=(), local_domains=(), default_domain="d.test").expand("a0")
    assert found.problem == "5.4.6 Alias nesting too deep at a20"


def test_a_delivery_found_in_cur_is_not_repeated(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    queue_id = s.queue("alice@example.org")
    # What a run killed after the Maildir link leaves: the first state, and
    # the file, which a mail reader has since moved to cur/.
    s.spool.write_state(queue_id, s.runner.expand(s.spool.envelope(queue_id)))
    name = maildir.file_name(int(NOW.timestamp()), queue_id, 0, "mx.test")
    folder = tmp_path / "mail/alice/Maildir"
    maildir.create(folder)
    (folder / "cur" / f"{name}:2,S").write_bytes(b"read already")
    s.runner.run()
    assert [p.name for p in (folder / "cur").iterdir()] == [f"{name}:2,S"]
    assert list((folder / "new").iterdir()) == []
    assert list(s.spool.messages()) == []


def state_writes(s: Setup, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids whose delivery state the spool writes from now on, in order."""
    written: list[str] = []
    write_state = s.spool.write_state
    monkeypatch.setattr(
        s.spool, "write_state", lambda i, state: (written.append(i), write_state(i, state))
    )
    return written


def test_a_first_delivery_does_not_search_the_maildir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path)
    s.runner.run()  # the deliverer starts on an empty queue; then mail comes
    queue_id = s.queue("alice@example.org")

    def never(_folder: Path, _name: str) -> bool:
        raise AssertionError("searched cur/ on a first delivery")

    monkeypatch.setattr(maildir, "already_delivered", never)
    written = state_writes(s, monkeypatch)
    s.runner.run()
    assert s.messages("alice") == [as_delivered("alice@example.org")]
    # Delivered whole in its first attempt: completed with no state written.
    assert written == []
    assert not (s.spool.state / queue_id).exists()


def test_a_message_queued_before_the_deliverer_started_is_looked_for_first(
    tmp_path: Path,
) -> None:
    # What a run killed after the Maildir link of a first attempt leaves:
    # no state (it is recorded only after the attempt), and the copy, which
    # a mail reader has since moved to cur/.
    s = Setup(tmp_path)
    queue_id = s.queue("alice@example.org")
    name = maildir.file_name(int(NOW.timestamp()), queue_id, 0, "mx.test")
    folder = tmp_path / "mail/alice/Maildir"
    maildir.create(folder)
    (folder / "cur" / f"{name}:2,S").write_bytes(b"read already")
    s.runner.run()
    assert [p.name for p in (folder / "cur").iterdir()] == [f"{name}:2,S"]
    assert list((folder / "new").iterdir()) == []
    assert list(s.spool.messages()) == []


def test_a_first_attempt_cut_short_unrecorded_is_looked_for_on_its_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message that came after the deliverer started: its first attempt
    # links the copy, then fails before any state is written (a bug); the
    # copy is read meanwhile.  The retry in the same deliverer finds it.
    s = Setup(tmp_path)
    s.runner.run()
    queue_id = s.queue("alice@example.org")
    settle = Runner._settle

    def fail_once(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(Runner, "_settle", settle)
        raise RuntimeError("cut short")

    monkeypatch.setattr(Runner, "_settle", fail_once)
    s.runner.run()
    assert [m.id for m in s.spool.messages()] == [queue_id]
    assert not (s.spool.state / queue_id).exists()
    folder = tmp_path / "mail/alice/Maildir"
    (name,) = [p.name for p in (folder / "new").iterdir()]
    (folder / "new" / name).rename(folder / "cur" / f"{name}:2,S")
    s.runner.run(flush=True)
    assert [p.name for p in (folder / "cur").iterdir()] == [f"{name}:2,S"]
    assert list((folder / "new").iterdir()) == []
    assert list(s.spool.messages()) == []


class Crash(BaseException):
    """What a kill between two steps looks like to the code after it."""


def test_a_crash_after_the_maildir_and_before_the_state_delivers_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path)
    s.queue("alice@example.org", "bob@example.org")

    crashed = threading.Event()

    def crash(_lease: SpoolLease) -> None:
        crashed.set()
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(SpoolLease, "complete", crash)
        Runner(s.config, s.spool, clock=s.clock, stopping=crashed.is_set).run()
    assert crashed.is_set()
    [queued] = s.spool.messages()
    state = s.spool.read_state(queued.id)
    assert state is not None and [r.status for r in state.recipients] == ["pending", "pending"]
    # Another deliver, as after a restart: the files are found, not written again.
    spool = Spool(s.config.spool)
    Runner(s.config, spool, clock=s.clock).run()
    assert s.messages("alice") == [as_delivered("alice@example.org")]
    assert s.messages("bob") == [as_delivered("bob@example.org")]
    assert list(s.spool.messages()) == []


@pytest.mark.parametrize(
    ("template", "base"),
    [
        ("/var/mail/{user}/Maildir", "/var/mail"),
        ("/var/vmail/example.org/{user}", "/var/vmail/example.org"),
        ("/srv/mail/u-{user}/Maildir", "/srv/mail"),
        ("/srv/shared/Maildir", "/srv/shared"),
    ],
)
def test_the_folder_above_the_maildirs(template: str, base: str) -> None:
    assert maildir.base_of(template) == Path(base)


def test_lf_line_ends_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "_CHUNK", 3)
    data = b"ab\r\ncd\r\r\n\r\n\re\rf\n"
    assert b"".join(maildir.lf_line_ends(BytesIO(data))) == b"ab\ncd\r\n\n\re\rf\n"
    assert b"".join(maildir.lf_line_ends(BytesIO(b"end\r"))) == b"end\r"


def test_an_unwritable_maildir_defers(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    (tmp_path / "mail").write_text("a file where the folder should be")
    s.queue("alice@example.org")
    assert s.runner.run() == NOW + timedelta(seconds=60)
    [queued] = s.spool.messages()
    state = s.spool.read_state(queued.id)
    assert state is not None
    [entry] = state.recipients
    assert (entry.status, entry.attempts) == ("deferred", 1)
    assert entry.last_reply.startswith("451 4.3.0 Cannot write to ")


# -- failures and notifications --------------------------------------------------------


def test_an_unknown_user_is_bounced_to_the_sender(tmp_path: Path) -> None:
    s = Setup(tmp_path, aliases="staff: alice, carol\n")
    queue_id = s.queue("staff@example.org", sender="bob@example.org")
    s.runner.run()
    assert s.messages("alice") == [as_delivered("alice@example.org", "bob@example.org")]
    [bounce] = s.messages("bob")
    report, blocks = notification(bounce)
    assert report["To"] == "bob@example.org"
    assert blocks[0]["X-MMDF-Queue-ID"] == queue_id
    [failed] = blocks[1:]
    assert failed["Original-Recipient"] == "rfc822; staff@example.org"
    assert failed["Final-Recipient"] == "rfc822; carol@example.org"
    assert failed["Action"] == "failed"
    assert failed["Status"] == "5.1.1"
    assert failed["Diagnostic-Code"] == "X-MMDF; 550 5.1.1 No such user here"
    assert list(s.spool.messages()) == []


def test_a_notice_is_queued_with_crlf_line_ends(tmp_path: Path) -> None:
    s = hop_setup(tmp_path, "smtp", 9)  # nothing listens there: the notice stays queued
    s.queue("nobody@example.org", sender="bob@remote.test")
    s.runner.run()
    [notice] = s.spool.messages()
    assert (notice.envelope.channel, notice.envelope.crlf) == ("deliver", True)
    with s.spool.open_message(notice.id) as file:
        text = file.read()
    assert text.count(b"\n") == text.count(b"\r\n")


def test_an_international_address_gets_rfc_6533_forms(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.queue("jörg@example.org", sender="alice@example.org")
    s.runner.run()
    [bounce] = s.messages("alice")
    assert b"\nContent-Type: message/global-delivery-status\n" in bounce
    assert "\nFinal-Recipient: utf-8; jörg@example.org\n".encode() in bounce
    assert b"\nContent-Type: message/global-headers\n\nFrom: Sender" in bounce


def test_the_null_sender_never_gets_a_notification(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.queue("carol@example.org", sender="")
    s.runner.run()
    assert list(s.spool.messages()) == []
    assert not (tmp_path / "mail").exists()


def test_backoff_doubles_up_to_the_longest_wait() -> None:
    waits = [backoff(n, first=60, longest=3600).total_seconds() for n in range(1, 9)]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff(10_000, first=60, longest=3600) == timedelta(hours=1)


def test_no_next_hop_defers_with_backoff_until_the_queue_lifetime(tmp_path: Path) -> None:
    s = Setup(tmp_path, "[deliver]\nqueue_lifetime = 300\n")
    queue_id = s.queue("far@remote.test", sender="alice@example.org")
    tries = []
    for _ in range(10):
        next_try = s.runner.run()
        try:
            state = s.spool.read_state(queue_id)
        except KeyError:
            break  # bounced and removed
        assert state is not None
        [entry] = state.recipients
        tries.append((s.clock.now - NOW, entry.status, entry.attempts, next_try))
        assert entry.last_reply == "451 4.4.0 No next hop configured for non-local mail"
        assert next_try is not None
        # Not due yet: a pass before the time changes nothing.
        s.clock.now = next_try - timedelta(seconds=1)
        assert s.runner.run() == next_try
        s.clock.now = next_try
    assert [(t.total_seconds(), status, n) for t, status, n, _ in tries] == [
        (0, "deferred", 1),
        (60, "deferred", 2),
        (180, "deferred", 3),
    ]
    assert tries[-1][3] == NOW + timedelta(seconds=300)  # capped at the lifetime
    [bounce] = s.messages("alice")
    _, [_, failed] = notification(bounce)
    assert failed["Status"] == "4.4.7"
    assert failed["Final-Recipient"] == "rfc822; far@remote.test"
    assert "No next hop configured" in failed["Diagnostic-Code"]
    assert list(s.spool.messages()) == []


def test_flush_tries_deferred_recipients_now(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    queue_id = s.queue("far@remote.test")
    s.runner.run()
    assert s.spool.due(NOW) == ([], {queue_id: NOW + timedelta(seconds=60)})
    s.runner.run(flush=True)
    state = s.spool.read_state(queue_id)
    assert state is not None and state.recipients[0].attempts == 2


def test_an_unreadable_state_is_reported_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    s = Setup(tmp_path)
    broken = s.queue("alice@example.org")
    s.spool.prepare()
    (s.spool.state / broken).write_text("{not json")
    os.utime(s.spool.state / broken, (0, 0))  # a state's mtime is when it is due: now
    s.queue("bob@example.org")
    assert s.runner.run() == NOW + timedelta(seconds=60)
    assert f"{s.spool.state / broken}: unreadable delivery state" in caplog.text
    assert [m.id for m in s.spool.messages()] == [broken]
    assert s.messages("bob") == [as_delivered("bob@example.org")]
    assert checkque.main(["-c", str(s.config_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["states"] == []
    assert "unreadable delivery state" in err


def test_waiting_states_are_not_read_again_until_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path)
    waiting = s.queue("far@remote.test")
    s.runner.run()
    read: list[str] = []
    original = s.spool._state_of_locked

    def counting(queue_id: str) -> DeliveryState | None:
        read.append(queue_id)
        return original(queue_id)

    monkeypatch.setattr(s.spool, "_state_of_locked", counting)
    fresh = s.queue("alice@example.org")
    assert s.runner.run() == NOW + timedelta(seconds=60)
    assert waiting not in read and fresh in read
    s.clock.advance(60)
    s.runner.run()
    assert waiting in read


def test_a_failing_message_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(hop: NextHop, **_: object) -> list[Outcome]:
        raise ValueError("a bug")

    s = hop_setup(tmp_path, "smtp", 9)
    s.runner = Runner(s.config, s.spool, clock=s.clock, send=broken)
    stuck = s.queue("far@remote.test")
    s.queue("alice@example.org")
    assert s.runner.run() == NOW + timedelta(seconds=60)
    assert f"id={stuck}: delivery failed" in caplog.text
    assert [m.id for m in s.spool.messages()] == [stuck]
    assert s.messages("alice") == [as_delivered("alice@example.org")]


# -- the next hop ------------------------------------------------------------------


def hop_setup(tmp_path: Path, protocol: str, port: int, *, aliases: str = "") -> Setup:
    return Setup(
        tmp_path, f'[deliver]\nnext_hop = "{protocol}:127.0.0.1:{port}"\n', aliases=aliases
    )


def stored_message(s: Setup, queue_id: str) -> bytes:
    with s.spool.open_message(queue_id) as file:
        return file.read()


def test_smtp_next_hop_gets_the_message_and_answers_per_recipient(tmp_path: Path) -> None:
    refuse = {"x@remote.test": "550 5.1.1 <x@remote.test>: unknown"}
    with peer(Handler(rcpt=refuse.get)) as (handler, port):
        s = hop_setup(tmp_path, "smtp", port, aliases="team: y@remote.test, x@remote.test\n")
        queue_id = s.queue("team@example.org", "z@remote.test", sender="alice@example.org")
        sent = stored_message(s, queue_id)
        s.runner.run()
    [received] = handler.messages
    assert received.sender == "alice@example.org"
    assert received.recipients == ["y@remote.test", "z@remote.test"]
    assert received.content == sent
    [bounce] = s.messages("alice")
    _, [_, failed] = notification(bounce)
    assert failed["Final-Recipient"] == "rfc822; x@remote.test"
    assert failed["Status"] == "5.1.1"
    assert failed["Remote-MTA"] == "dns; 127.0.0.1"
    assert failed["Diagnostic-Code"] == "smtp; 550 5.1.1 <x@remote.test>: unknown"
    assert list(s.spool.messages()) == []


def test_a_queue_file_whose_line_ends_may_be_lf_goes_out_with_crlf(tmp_path: Path) -> None:
    # An envelope without "crlf" (a queue file from before it was written).
    with peer(Handler()) as (handler, port):
        s = hop_setup(tmp_path, "smtp", port)
        s.queue("z@remote.test", message=b"Subject: old\n\n.dot\r\nlast\n")
        s.runner.run()
    [received] = handler.messages
    assert received.content == b"Subject: old\r\n\r\n.dot\r\nlast\r\n"


def test_lmtp_4xx_defers_and_a_later_success_delivers_once(tmp_path: Path) -> None:
    full = {"b@remote.test": "452 4.2.2 Mailbox full"}
    handler = Handler(data=full.get, lmtp=True)
    with peer(handler) as (_, port):
        s = hop_setup(tmp_path, "lmtp", port)
        queue_id = s.queue("a@remote.test", "b@remote.test")
        sent = stored_message(s, queue_id)
        assert s.runner.run() == NOW + timedelta(seconds=60)
        state = s.spool.read_state(queue_id)
        assert state is not None
        assert [(r.status, r.last_reply) for r in state.recipients] == [
            ("delivered", "250 2.0.0 OK"),
            ("deferred", "452 4.2.2 Mailbox full"),
        ]
        full.clear()
        assert s.runner.run() == NOW + timedelta(seconds=60)  # not due yet: nothing sent
        assert len(handler.messages) == 1
        s.runner.run(flush=True)
    assert [(m.recipients, m.content) for m in handler.messages] == [
        (["a@remote.test"], sent),
        (["b@remote.test"], sent),
    ]
    assert list(s.spool.messages()) == []


def test_a_new_message_for_the_next_hop_alone_is_sent_with_no_state_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = {"b@remote.test": "452 4.2.2 Mailbox full"}
    handler = Handler(data=full.get, lmtp=True)
    with peer(handler) as (_, port):
        s = hop_setup(tmp_path, "lmtp", port)
        s.runner.run()  # the deliverer starts on an empty queue; then mail comes
        written = state_writes(s, monkeypatch)
        whole = s.queue("a@remote.test")
        s.runner.run()
        assert written == []  # sent, then completed: nothing recorded on the way
        assert not (s.spool.state / whole).exists()
        partly = s.queue("a@remote.test", "b@remote.test")
        s.runner.run()
        # One recipient deferred: the first record is the whole list, with both outcomes.
        assert written == [partly]
        state = s.spool.read_state(partly)
        assert state is not None
        assert [(r.address, r.status) for r in state.recipients] == [
            ("a@remote.test", "delivered"),
            ("b@remote.test", "deferred"),
        ]
    assert [m.recipients for m in handler.messages] == [["a@remote.test"], ["a@remote.test"]]


def test_smtputf8_and_8bitmime_are_passed_on(tmp_path: Path) -> None:
    with peer(Handler()) as (handler, port):
        s = hop_setup(tmp_path, "smtp", port)
        s.queue("jörg@remote.test", sender="zoë@example.net", smtputf8=True, body="8BITMIME")
        s.runner.run()
    [received] = handler.messages
    assert (received.sender, received.recipients) == ("zoë@example.net", ["jörg@remote.test"])
    assert sorted(received.mail_options) == ["BODY=8BITMIME", "SMTPUTF8"]


def test_lmtp_5xx_bounces_with_a_notification(tmp_path: Path) -> None:
    handler = Handler(data=lambda r: "550 5.2.1 Mailbox disabled", lmtp=True)
    with peer(handler) as (_, port):
        s = hop_setup(tmp_path, "lmtp", port)
        s.queue("gone@remote.test", sender="bob@example.org")
        s.runner.run()
    assert handler.messages == []
    [bounce] = s.messages("bob")
    _, [_, failed] = notification(bounce)
    assert failed["Status"] == "5.2.1"
    assert failed["Diagnostic-Code"] == "smtp; 550 5.2.1 Mailbox disabled"


def test_starttls_is_used_when_the_next_hop_offers_it(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("peer.test").configure_cert(context)
    with peer(Handler(), tls=context, require_tls=True) as (handler, port):
        s = hop_setup(tmp_path, "smtp", port)
        s.queue("far@remote.test")
        s.runner.run()
    [received] = handler.messages
    assert received.tls
    assert list(s.spool.messages()) == []


def test_a_failed_tls_handshake_falls_back_to_plaintext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server context with no certificate: the peer offers STARTTLS and
    # every handshake fails.
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with peer(Handler(), tls=broken) as (handler, port):
        s = hop_setup(tmp_path, "smtp", port)
        s.queue("far@remote.test")
        s.runner.run()
    [received] = handler.messages
    assert not received.tls
    assert received.recipients == ["far@remote.test"]
    assert "TLS handshake failed" in caplog.text
    assert list(s.spool.messages()) == []


def test_lmtp_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "lmtp"
    with unix_lmtp_peer(Handler(), str(path)) as handler:
        s = Setup(tmp_path, f'[deliver]\nnext_hop = "lmtp:{path}"\n')
        queue_id = s.queue("far@remote.test", "near@remote.test")
        sent = stored_message(s, queue_id)
        s.runner.run()
    [received] = handler.messages
    assert received.recipients == ["far@remote.test", "near@remote.test"]
    assert received.content == sent
    assert list(s.spool.messages()) == []


class Grumpy(Handler):
    """A peer that refuses EHLO and HELO alike."""

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook names
        self, server: object, session: object, envelope: object, name: str, lines: list[str]
    ) -> list[str]:
        return ["550 5.7.1 Not you"]

    async def handle_HELO(  # noqa: N802
        self, server: object, session: object, envelope: object, name: str
    ) -> str:
        return "550 5.7.1 Not you either"


def test_a_next_hop_refusing_to_talk_defers(tmp_path: Path) -> None:
    with peer(Grumpy()) as (_, port):
        s = hop_setup(tmp_path, "smtp", port)
        queue_id = s.queue("far@remote.test")
        s.runner.run()
    state = s.spool.read_state(queue_id)
    assert state is not None
    [entry] = state.recipients
    assert entry.status == "deferred"
    assert entry.last_reply == (
        f"451 4.4.0 smtp:[127.0.0.1]:{port} refused EHLO and HELO: 550 5.7.1 Not you either"
    )


def test_an_unreachable_next_hop_defers(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        s = hop_setup(tmp_path, "smtp", closed.getsockname()[1])
        queue_id = s.queue("far@remote.test")
        s.runner.run()
    state = s.spool.read_state(queue_id)
    assert state is not None
    [entry] = state.recipients
    assert entry.status == "deferred"
    assert entry.last_reply.startswith("451 4.4.1 smtp:[127.0.0.1]:")
    assert "refused" in entry.last_reply.lower()


def test_a_next_hop_that_is_down_is_left_alone_for_retry_min(tmp_path: Path) -> None:
    tries: list[list[str]] = []

    def down(hop: NextHop, *, recipients: list[str], **_: object) -> list[Outcome]:
        tries.append(recipients)
        s.clock.advance(30)  # the connect bound, waited out
        failure = Outcome(451, "4.4.1 smtp:[127.0.0.1]:9: timed out", unreachable=True)
        return [failure] * len(recipients)

    # One at a time, in arrival order: which message meets the hop down is known.
    s = Setup(tmp_path, '[deliver]\nnext_hop = "smtp:127.0.0.1:9"\nconcurrency = 1\n')
    s.runner = Runner(s.config, s.spool, clock=s.clock, send=down)
    first = s.queue("one@remote.test")
    second = s.queue("two@remote.test", "alice@example.org")
    assert s.runner.run() == NOW + timedelta(seconds=60)
    # One connection timeout for the pass, not one for each message.
    assert tries == [["one@remote.test"]]
    suspended = "451 4.4.1 delivery temporarily suspended: smtp:[127.0.0.1]:9: timed out"
    replies = {}
    for queue_id in (first, second):
        state = s.spool.read_state(queue_id)
        assert state is not None
        replies[queue_id] = [(r.status, r.last_reply) for r in state.recipients]
    assert replies[first] == [("deferred", "451 4.4.1 smtp:[127.0.0.1]:9: timed out")]
    assert replies[second][0] == ("deferred", suspended)
    assert replies[second][1][0] == "delivered"
    assert replies[second][1][1].startswith("250 2.0.0 Delivered to maildir as ")
    assert s.messages("alice") == [as_delivered("alice@example.org")]

    # retry_min counts from the failure, 30 s after the pass began: at 60 s
    # the first message is due but not tried, and one that comes meanwhile
    # waits too.  At 90 s the hop is tried again; a flush tries it at once.
    s.clock.now = NOW + timedelta(seconds=60)
    third = s.queue("three@remote.test")
    s.runner.run()
    assert len(tries) == 1
    state = s.spool.read_state(third)
    assert state is not None and state.recipients[0].last_reply == suspended
    s.clock.now = NOW + timedelta(seconds=90)
    s.runner.run()
    assert tries[1:] == [["two@remote.test"]]
    s.runner.run(flush=True)
    assert tries[2:] == [["one@remote.test"]]


def test_connecting_has_a_bound_shorter_than_a_command() -> None:
    # A listener whose backlog is full drops the next SYN, as a host that
    # is down does: the connection neither succeeds nor is refused.
    with socket.socket() as full, socket.socket() as filler:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler.connect(full.getsockname())
        hop = NextHop(protocol="smtp", host="127.0.0.1", port=full.getsockname()[1])
        started = time.monotonic()
        [outcome] = nexthop.send(
            hop,
            hostname="mx.test",
            sender="a@example.org",
            recipients=["far@remote.test"],
            message=BytesIO(MESSAGE),
            connect_timeout=0.5,
        )
        elapsed = time.monotonic() - started
    assert outcome == Outcome(
        451, f"4.4.1 smtp:[127.0.0.1]:{hop.port}: timed out", unreachable=True
    )
    assert 0.4 < elapsed < 5


def test_a_slow_greeting_gets_a_commands_bound() -> None:
    """The greeting comes after the connect bound: the message still goes."""
    received: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                time.sleep(1.0)
                conn.sendall(b"220 slow.test ready\r\n")
                for line in lines:
                    command = line[:4].upper()
                    if command == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        data = b""
                        while not data.endswith(b"\r\n.\r\n"):
                            data += lines.readline()
                        received.append(data)
                        conn.sendall(b"250 2.0.0 Stored\r\n")
                    elif command == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 ok\r\n")

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        [outcome] = nexthop.send(
            NextHop(protocol="smtp", host="127.0.0.1", port=listener.getsockname()[1]),
            hostname="mx.test",
            sender="a@example.org",
            recipients=["far@remote.test"],
            message=BytesIO(b"Subject: slow\r\n\r\n.dot\r\n"),
            timeout=10,
            connect_timeout=0.3,
        )
        server.join(10)
    assert outcome == Outcome(250, "2.0.0 Stored", from_peer=True)
    assert received == [b"Subject: slow\r\n\r\n..dot\r\n.\r\n"]


def test_dot_stuffing_and_line_ends() -> None:
    data = b".one\r\ntwo\n..three\r\n.\r\nno end"
    assert b"".join(dot_stuffed(BytesIO(data))) == b"..one\r\ntwo\r\n...three\r\n..\r\nno end\r\n"


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("lmtp:127.0.0.1:24", NextHop(protocol="lmtp", host="127.0.0.1", port=24)),
        ("smtp:[::1]:25", NextHop(protocol="smtp", host="::1", port=25)),
        ("lmtp:/run/dovecot/lmtp", NextHop(protocol="lmtp", host="/run/dovecot/lmtp", port=0)),
        ("smtps:relay.test:465", NextHop(protocol="smtps", host="relay.test", port=465)),
    ],
)
def test_next_hop_forms(text: str, hop: NextHop) -> None:
    assert parse_next_hop(text) == hop


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('next_hop = "relay.test:25"', "deliver.next_hop: 'relay.test:25': expected"),
        ('next_hop = "smtp:/tmp/socket"', "deliver.next_hop: 'smtp:/tmp/socket': expected"),
        ("retry_min = 0", "deliver.retry_min: must be at least 1"),
        ("retry_min = 600\nretry_max = 60", "deliver.retry_max: must be at least retry_min"),
        ("queue_lifetime = 0", "deliver.queue_lifetime: must be at least 1"),
        ("bounce = true", "deliver.bounce: unknown key"),
    ],
)
def test_deliver_configuration_errors(tmp_path: Path, extra: str, error: str) -> None:
    path = write_config(tmp_path, f"[deliver]\n{extra}\n")
    with pytest.raises(ConfigError, match=f"^{path}:\\d+: {error}"):
        load(str(path))
