"""DSN (RFC 3461, RFC 3464) and address extensions over the wire.

Mail goes to smtpd with smtplib or swaks, with DSN's parameters; deliver's
runner works the queue in-process, on a clock of the test's, so that a
delay is a clock moved, not a sleep; the notices are read back from the
sender's Maildir and parsed with the email package.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import pytest

from mmdf_smtp.config import load
from mmdf_smtp.delivery import dsn
from mmdf_smtp.delivery.runner import Runner
from mmdf_smtp.queue import Envelope
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.submission import Request
from peer import DsnHandler, Handler, peer
from test_submit import dropped, other_user, run_pickup, submit
from wire import Daemon, daemon, write_config

SENDER = "bob@example.org"
MESSAGE = b"From: bob@example.org\r\nSubject: dsn test\r\n\r\nHello.\r\n.dot line\r\n"
LIFETIME = 432_000


class Clock:
    def __init__(self) -> None:
        # From now on: smtpd stamps the envelope with the real time.
        self.now = datetime.now(UTC) + timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Mail:
    """smtpd under a configuration of the test's, and deliver's runner beside it."""

    def __init__(self, directory: Path, server: Daemon, config: Path) -> None:
        self.directory = directory
        self.server = server
        self.config = load(str(config))
        self.spool = Spool(self.config.spool)
        self.clock = Clock()
        self.runner = Runner(self.config, self.spool, clock=self.clock)
        self.arrivals: dict[str, datetime] = {}  # the queue ids sent, and when they arrived

    def send(
        self,
        recipients: dict[str, list[str]],
        *,
        sender: str = SENDER,
        mail_options: tuple[str, ...] = (),
        message: bytes = MESSAGE,
    ) -> str:
        """One transaction, each recipient with its RCPT parameters; the queue id."""
        with smtplib.SMTP(self.server.host, self.server.port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.has_extn("dsn")
            assert client.mail(sender, list(mail_options))[0] == 250
            for recipient, options in recipients.items():
                code, text = client.rcpt(recipient, options)
                assert code == 250, text
            code, text = client.data(message)
            assert code == 250, text
        queue_id = text.decode().split()[-1].strip("()")
        self.arrivals[queue_id] = self.spool.envelope(queue_id).received
        return queue_id

    def settle(self) -> None:
        """The clock just after the last message queued arrived."""
        self.clock.now = max(self.arrivals.values())
        self.clock.advance(1)

    def maildir(self, user: str) -> dict[str, bytes]:
        folder = self.directory / "mail" / user / "Maildir"
        if not folder.exists():
            return {}
        box = mailbox.Maildir(folder, factory=None, create=False)
        return {key: box.get_bytes(key) for key in box.iterkeys()}

    def notices(self) -> list[EmailMessage]:
        return [parse(data) for data in self.maildir("bob").values()]


@contextmanager
def mail_system(directory: Path, extra: str = "", *, aliases: str = "") -> Iterator[Mail]:
    (directory / "aliases").write_text("broken: carol\n" + aliases)
    # The notices are deliver's: all mail goes through the queue to it.
    local = (
        f'maildir = "{directory}/mail/{{user}}/Maildir"\naliases = "{directory}/aliases"\n'
        "deliver_at_commit = false\n"
    )
    config = write_config(directory, local + extra)
    with daemon(config) as server:
        yield Mail(directory, server, config)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def report_of(notice: EmailMessage) -> tuple[dict[str, str], list[dict[str, str]], EmailMessage]:
    """A notice's per-message fields, its per-recipient blocks, and its third part,
    after checking the shape RFC 3464 and RFC 3461 ask for."""
    assert notice["Return-Path"] == "<>"  # the null sender (RFC 3461 6.2)
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert notice["To"] == SENDER
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    text, status, returned = notice.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    fields = [{k: str(v) for k, v in block.items()} for block in blocks]
    assert isinstance(returned, EmailMessage)
    return fields[0], fields[1:], returned


def by_envid(notices: list[EmailMessage]) -> dict[str, list[EmailMessage]]:
    found: dict[str, list[EmailMessage]] = {}
    for notice in notices:
        per_message, _, _ = report_of(notice)
        found.setdefault(per_message.get("Original-Envelope-Id", ""), []).append(notice)
    return found


def per_message(mail: Mail, queue_id: str, envid: str | None) -> dict[str, str]:
    fields = {"Reporting-MTA": "dns; mx.test"}
    if envid is not None:
        fields["Original-Envelope-Id"] = envid
    fields["X-MMDF-Queue-ID"] = queue_id
    fields["Arrival-Date"] = format_datetime(mail.arrivals[queue_id])
    return fields


# -- NOTIFY -----------------------------------------------------------------------

NOTIFY_CASES = {
    "absent": [],
    "never": ["NOTIFY=NEVER"],
    "success": ["NOTIFY=SUCCESS"],
    "failure": ["NOTIFY=FAILURE"],
    "delay": ["NOTIFY=DELAY"],
    "all": ["NOTIFY=SUCCESS,FAILURE,DELAY"],
}
# Which notices each case gets: a success at once for alice, a failure at
# once for broken (an alias of nobody), a delay for far after delay_warning.
EXPECTED = {
    "absent": {"failed", "delayed"},  # NOTIFY absent: failure; delay when delay_warning is set
    "never": set(),
    "success": {"delivered"},
    "failure": {"failed"},
    "delay": {"delayed"},
    "all": {"delivered", "failed", "delayed"},
}


def test_each_notify_value_gets_the_notices_it_asks_for(tmp_path: Path) -> None:
    deferring = Handler(rcpt=lambda _: "451 4.3.0 try again later")
    with peer(deferring) as (_, port):
        hop = f'[deliver]\nnext_hop = "smtp:127.0.0.1:{port}"\ndelay_warning = 600\n'
        with mail_system(tmp_path, hop) as mail:
            ids = {}
            for case, notify in NOTIFY_CASES.items():
                ids[case] = mail.send(
                    {
                        "alice@example.org": [*notify, "ORCPT=rfc822;first+2Blast@example.net"],
                        "broken@example.org": notify,
                        "far@remote.test": notify,
                    },
                    mail_options=(f"ENVID={case}", "RET=HDRS"),
                )
            mail.settle()
            first = mail.clock()
            mail.runner.run()
            mail.clock.advance(300)
            mail.runner.run()  # not yet
            assert {n["Subject"] for n in mail.notices()} <= {
                "Successful Mail Delivery Report",
                "Undelivered Mail Returned to Sender",
            }
            mail.clock.advance(600)
            mail.runner.run()  # delay_warning passed: once
            mail.clock.advance(3600)
            mail.runner.run()  # and not again
            notices = by_envid(mail.notices())
    assert set(notices) <= set(NOTIFY_CASES)
    for case, expected in EXPECTED.items():
        got = notices.get(case, [])
        actions = [block["Action"] for n in got for block in report_of(n)[1]]
        assert sorted(actions) == sorted(expected), case
        assert len(got) == len(expected), f"{case}: one notice per kind"
        for notice in got:
            fields, [block], returned = report_of(notice)
            assert fields == per_message(mail, ids[case], case)
            assert returned.get_content_type() == "text/rfc822-headers"
            assert "Subject: dsn test" in returned.get_content()
            match block["Action"]:
                case "delivered":
                    assert notice["Subject"] == "Successful Mail Delivery Report"
                    name = alice_name(mail, ids[case])
                    assert block == {
                        "Original-Recipient": "rfc822; first+last@example.net",
                        "Final-Recipient": "rfc822; alice@example.org",
                        "Action": "delivered",
                        "Status": "2.0.0",
                        "Diagnostic-Code": f"X-MMDF; 250 2.0.0 Delivered to maildir as {name}",
                        "Last-Attempt-Date": format_datetime(first),
                    }
                case "failed":
                    assert notice["Subject"] == "Undelivered Mail Returned to Sender"
                    assert block == {
                        "Original-Recipient": "rfc822; broken@example.org",
                        "Final-Recipient": "rfc822; carol@example.org",
                        "Action": "failed",
                        "Status": "5.1.1",
                        "Diagnostic-Code": "X-MMDF; 550 5.1.1 No such user here",
                        "Last-Attempt-Date": format_datetime(first),
                    }
                case "delayed":
                    assert notice["Subject"] == "Delayed Mail (still being retried)"
                    received = mail.arrivals[ids[case]]
                    assert block == {
                        "Final-Recipient": "rfc822; far@remote.test",
                        "Action": "delayed",
                        "Status": "4.3.0",
                        "Remote-MTA": "dns; 127.0.0.1",
                        "Diagnostic-Code": "smtp; 451 4.3.0 try again later",
                        "Last-Attempt-Date": format_datetime(first + timedelta(seconds=900)),
                        "Will-Retry-Until": format_datetime(received + timedelta(seconds=LIFETIME)),
                    }


def alice_name(mail: Mail, queue_id: str) -> str:
    [name] = [key for key in mail.maildir("alice") if queue_id in key]
    return name


def test_the_null_sender_gets_no_notice_whatever_it_asks(tmp_path: Path) -> None:
    with mail_system(tmp_path) as mail:
        mail.send({"alice@example.org": ["NOTIFY=SUCCESS"], "broken@example.org": []}, sender="")
        mail.runner.run()
        assert len(mail.maildir("alice")) == 1
        assert list(mail.spool.messages()) == []
        assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["alice"]


# -- RET ---------------------------------------------------------------------------


def test_ret_full_returns_the_message_and_hdrs_its_header(tmp_path: Path) -> None:
    big = MESSAGE + b"x" * 998 + b"\r\n"
    big += b"y" * 998 * 1100  # over dsn.RETURN_LIMIT, in lines of 999
    big = big.replace(b"y" * 998, b"y" * 997 + b"\r\n")
    assert len(big) > dsn.RETURN_LIMIT
    with mail_system(tmp_path) as mail:
        for case, options, message in [
            ("full", ("RET=FULL",), MESSAGE),
            ("hdrs", ("RET=HDRS",), MESSAGE),
            ("none", (), MESSAGE),
            ("full-big", ("RET=FULL",), big),
        ]:
            mail.send(
                {"broken@example.org": []},
                mail_options=(*options, f"ENVID={case}"),
                message=message,
            )
        mail.runner.run()
        notices = {envid: n for envid, [n] in by_envid(mail.notices()).items()}
        raw = {parse(data)["Subject"]: data for data in mail.maildir("bob").values()}
    assert set(notices) == {"full", "hdrs", "none", "full-big"}
    assert raw  # stored with LF line ends, as Maildir files are

    _, _, returned = report_of(notices["full"])
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.iter_parts()
    assert original["Subject"] == "dsn test"
    assert original["Received"].startswith("from client.test")
    assert original.get_content() == "Hello.\n.dot line\n"
    for case in ("hdrs", "none", "full-big"):
        _, _, returned = report_of(notices[case])
        assert returned.get_content_type() == "text/rfc822-headers", case
        header = returned.get_content()
        assert "Subject: dsn test" in header and "Hello." not in header, case
    assert len(notices["full-big"].as_bytes()) < 64 * 1024


# -- the next hop ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_a_next_hop_offering_dsn_gets_the_parameters_as_sent(tmp_path: Path, protocol: str) -> None:
    handler = DsnHandler(lmtp=protocol == "lmtp")
    with peer(handler) as (_, port):
        hop = f'[deliver]\nnext_hop = "{protocol}:127.0.0.1:{port}"\n'
        with mail_system(tmp_path, hop) as mail:
            mail.send(
                {
                    "x@remote.test": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;x+2Bo@remote.test"],
                    "y@remote.test": [],
                    "z@remote.test": ["NOTIFY=NEVER"],
                },
                mail_options=("RET=HDRS", "ENVID=QQ+2B314159"),
            )
            mail.runner.run()
            assert mail.notices() == []  # the next hop reports successes itself
            assert list(mail.spool.messages()) == []
    [received] = handler.messages
    assert received.mail_dsn == ["RET=HDRS", "ENVID=QQ+2B314159"]
    assert received.rcpt_dsn == {
        "x@remote.test": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;x+2Bo@remote.test"],
        "y@remote.test": [],
        "z@remote.test": ["NOTIFY=NEVER"],
    }


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_a_next_hop_without_dsn_makes_a_relayed_notice(tmp_path: Path, protocol: str) -> None:
    handler = Handler(lmtp=protocol == "lmtp")
    with peer(handler) as (_, port):
        hop = f'[deliver]\nnext_hop = "{protocol}:127.0.0.1:{port}"\n'
        with mail_system(tmp_path, hop) as mail:
            queue_id = mail.send(
                {
                    "x@remote.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;x@remote.test"],
                    "y@remote.test": ["NOTIFY=FAILURE"],
                },
                mail_options=("ENVID=relay",),
            )
            mail.settle()
            mail.runner.run()
            [notice] = mail.notices()
    [received] = handler.messages
    # Nothing of DSN to a next hop that does not offer it (RFC 3461 6.1).
    assert received.mail_options == []
    assert notice["Subject"] == "Successful Mail Delivery Report"
    fields, [block], _ = report_of(notice)
    assert fields == per_message(mail, queue_id, "relay")
    assert block == {
        "Original-Recipient": "rfc822; x@remote.test",
        "Final-Recipient": "rfc822; x@remote.test",
        "Action": "relayed",
        "Status": "2.0.0",
        "Remote-MTA": "dns; 127.0.0.1",
        "Diagnostic-Code": "smtp; 250 2.0.0 OK",
        "Last-Attempt-Date": format_datetime(mail.clock()),
    }


def test_a_delay_notice_comes_once_after_delay_warning(tmp_path: Path) -> None:
    deferring = Handler(rcpt=lambda _: "451 4.3.0 try again later")
    with peer(deferring) as (_, port):
        hop = f'[deliver]\nnext_hop = "smtp:127.0.0.1:{port}"\ndelay_warning = 3600\n'
        with mail_system(tmp_path, hop) as mail:
            mail.send({"far@remote.test": []}, mail_options=("ENVID=asked-nothing",))
            mail.send({"far@remote.test": ["NOTIFY=FAILURE"]}, mail_options=("ENVID=failure",))
            mail.settle()
            seen = []
            for step in (0, 1800, 1700, 200, 600, 7200):
                mail.clock.advance(step)
                mail.runner.run(flush=True)
                seen.append(len(mail.notices()))
            [notice] = mail.notices()
    # The retry at 3700 s sends it; those after do not, nor any for NOTIFY=FAILURE.
    assert seen == [0, 0, 0, 1, 1, 1]
    fields, [block], _ = report_of(notice)
    assert fields["Original-Envelope-Id"] == "asked-nothing"
    assert block["Action"] == "delayed"


def test_without_delay_warning_no_delay_notice(tmp_path: Path) -> None:
    deferring = Handler(rcpt=lambda _: "451 4.3.0 try again later")
    with peer(deferring) as (_, port):
        hop = f'[deliver]\nnext_hop = "smtp:127.0.0.1:{port}"\n'
        with mail_system(tmp_path, hop) as mail:
            mail.send({"far@remote.test": ["NOTIFY=DELAY"]})
            for _ in range(3):
                mail.clock.advance(86_400)
                mail.runner.run(flush=True)
            assert mail.notices() == []


# -- address extensions ------------------------------------------------------------


def delivered_to(data: bytes) -> str:
    return str(parse(data)["Delivered-To"])


def test_an_address_extension_reaches_the_user(tmp_path: Path) -> None:
    with mail_system(tmp_path, aliases="alice+list: bob\n") as mail:
        mail.send(
            {
                "alice+tag@example.org": [],
                "alice+list@example.org": [],  # an alias of its own: it wins
                "postmaster+x@example.org": [],
                "Alice+Other@example.org": [],
            }
        )
        with smtplib.SMTP(mail.server.host, mail.server.port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(SENDER)
            assert client.rcpt("carol+x@example.org") == (550, b"5.1.1 No such user here")
            assert client.rcpt("+x@example.org") == (550, b"5.1.1 No such user here")
        mail.runner.run()
        alice = sorted(delivered_to(m) for m in mail.maildir("alice").values())
        bob = [delivered_to(m) for m in mail.maildir("bob").values()]
        postmaster = [delivered_to(m) for m in mail.maildir("postmaster").values()]
    # One copy a mailbox a message (as for aliases); Delivered-To names the
    # address as given, first of those for the mailbox.
    assert alice == ["alice+tag@example.org"]
    assert bob == ["bob@example.org"]
    assert postmaster == ["postmaster+x@example.org"]


def test_an_empty_delimiter_turns_extensions_off(tmp_path: Path) -> None:
    with (
        mail_system(tmp_path, '[deliver]\nrecipient_delimiter = ""\n') as mail,
        smtplib.SMTP(mail.server.host, mail.server.port, timeout=30) as client,
    ):
        client.ehlo("client.test")
        client.mail(SENDER)
        assert client.rcpt("alice+tag@example.org") == (550, b"5.1.1 No such user here")
        assert client.rcpt("alice@example.org")[0] == 250


def test_another_delimiter(tmp_path: Path) -> None:
    with mail_system(tmp_path, '[deliver]\nrecipient_delimiter = "-+"\n') as mail:
        mail.send({"alice-one@example.org": [], "bob+two@example.org": []})
        mail.runner.run()
        assert [delivered_to(m) for m in mail.maildir("alice").values()] == [
            "alice-one@example.org"
        ]
        assert [delivered_to(m) for m in mail.maildir("bob").values()] == ["bob+two@example.org"]


# -- swaks -------------------------------------------------------------------------


def test_swaks_asks_for_a_success_notice(tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    with mail_system(tmp_path) as mail:
        # swaks (20201014) has no DSN options: the parameters ride after the
        # address, and the ">" swaks closes it with ends the last of them.
        sent = subprocess.run(
            [
                *(swaks, "--server", f"{mail.server.host}:{mail.server.port}"),
                *("--from", "bob@example.org> RET=FULL ENVID=swaks"),
                *("--to", "alice+swaks@example.org> NOTIFY=SUCCESS ORCPT=rfc822;alice"),
                *("--header", "Subject: dsn test"),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout.decode()
        mail.runner.run()
        [notice] = mail.notices()
        [message] = mail.maildir("alice").values()
    assert delivered_to(message) == "alice+swaks@example.org"
    fields, [block], returned = report_of(notice)
    assert fields["Original-Envelope-Id"] == "swaks>"
    assert block["Original-Recipient"] == "rfc822; alice>"
    assert block["Final-Recipient"] == "rfc822; alice+swaks@example.org"
    assert block["Action"] == "delivered"
    # RET=FULL is for failures (RFC 3461 4.3): a success returns the header.
    assert returned.get_content_type() == "text/rfc822-headers"


# -- the envelope -------------------------------------------------------------------


def test_the_envelope_keeps_what_dsn_asked(tmp_path: Path) -> None:
    with mail_system(tmp_path) as mail:
        queue_id = mail.send(
            {
                "alice@example.org": ["NOTIFY=DELAY,SUCCESS", "ORCPT=rfc822;a+2Bb@example.net"],
                "bob@example.org": [],
                "postmaster": ["NOTIFY=never"],
            },
            mail_options=("RET=full", "ENVID=id+3Done"),
        )
        envelope = mail.spool.envelope(queue_id)
    assert (envelope.ret, envelope.envid) == ("FULL", "id=one")
    assert envelope.recipients == ("alice@example.org", "bob@example.org", "postmaster")
    assert envelope.notify == ("SUCCESS,DELAY", None, "NEVER")
    assert envelope.orcpt == ("rfc822;a+b@example.net", None, None)
    # Read back from its JSON it is the envelope written, tuples and all.
    assert hash(envelope) == hash(replace(envelope))
    assert dsn.asked_of(envelope, "alice@example.org") == dsn.Asked(
        ("SUCCESS", "DELAY"), "rfc822;a+b@example.net"
    )
    assert dsn.asked_of(envelope, "bob@example.org") == dsn.Asked()


def test_an_envelope_written_before_dsn_reads(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    writer = spool.open(
        Envelope(
            sender="a@example.org",
            recipients=("b@example.org",),
            channel="local",
            remote_host="client.test",
            remote_addr="127.0.0.1",
            helo="client.test",
            received=datetime(2026, 1, 1, tzinfo=UTC),
        )
    )
    writer.write(MESSAGE)
    writer.commit()
    path = spool.queue / writer.id
    line, rest = path.read_bytes().split(b"\n", 1)
    for key in (b',"ret":null', b',"envid":null', b',"notify":[]', b',"orcpt":[]'):
        assert key in line
        line = line.replace(key, b"")
    # The size slot counts the file: pad what was taken out, as blanks JSON allows.
    taken = len(path.read_bytes()) - len(line) - 1 - len(rest)
    path.write_bytes(line[:-1] + b" " * taken + b"}\n" + rest)
    envelope = spool.envelope(writer.id)
    assert (envelope.ret, envelope.envid, envelope.notify, envelope.orcpt) == (None, None, (), ())


# -- submit: sendmail's -N, -R and -V ------------------------------------------------


def test_submit_takes_sendmails_dsn_options(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = submit(config, "-N", "delay,success", "-R", "hdrs", "-V", "id=1 x", "alice", "bob")
    assert result.returncode == 0, result.stderr
    spool = Spool(load(str(config)).spool)
    [message] = spool.messages()
    envelope = message.envelope
    assert (envelope.ret, envelope.envid) == ("HDRS", "id=1 x")
    assert envelope.notify == ("SUCCESS,DELAY", "SUCCESS,DELAY")
    for args, why in [
        (["-N", "never,success"], "-N never,success: NOTIFY=NEVER must stand alone"),
        (["-R", "all"], "-R all: RET takes FULL or HDRS"),
        (["-V", "x" * 101], f"-V {'x' * 101}: ENVID longer than 100 characters"),
    ]:
        result = submit(config, *args, "alice")
        assert result.returncode == 64, args
        assert result.stderr.decode().splitlines()[-1] == f"submit: {why}"


def test_a_maildrop_file_carries_the_dsn_options(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    user = other_user()
    request = Request(recipients=("alice",), notify=("NEVER",), ret="FULL", envid="drop")
    dropped(config, b"Subject: dropped\n\nbody\n", request, user.pw_uid, user.pw_gid)
    [queue_id] = run_pickup(config)
    envelope = Spool(load(str(config)).spool).envelope(queue_id)
    assert (envelope.notify, envelope.ret, envelope.envid) == (("NEVER",), "FULL", "drop")
