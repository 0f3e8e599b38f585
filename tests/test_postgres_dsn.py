"""Bounces and DSN notices (RFC 3461, RFC 3464) on the PostgreSQL queue,
as on the spool.

The same sessions as tests/test_dsn.py: mail goes to smtpd over the wire
with DSN's parameters, deliver's runner works the queue in-process on a
clock of the test's, and the notices are read back from the sender's
Maildir.  Each test runs on both backends, and the notices must be
field for field those the test expects, whichever queue held the message;
the database is a real server the tests start (tests/pgcluster.py).
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import pytest

from mmdf_smtp.config import load
from mmdf_smtp.delivery.runner import Runner
from mmdf_smtp.queue import open_backend
from peer import Handler, peer
from test_dsn import MESSAGE, SENDER, Clock, Mail, alice_name, per_message, report_of
from wire import checkque, daemon, write_config

pytest_plugins = ["pgcluster"]

BACKENDS = ["spool", "postgresql"]


class QueueMail(Mail):
    """test_dsn's Mail on the queue the configuration names, not only the spool."""

    def __init__(self, directory: Path, host: str, port: int, config: Path) -> None:
        self.directory = directory
        self.config_path = config
        self.config = load(str(config))
        self.host, self.port = host, port
        self.queue = open_backend(self.config)
        self.clock = Clock()
        self.runner = Runner(self.config, self.queue, clock=self.clock)
        self.arrivals = {}

    def sent(self, queue_id: str) -> None:
        """Note when the message arrived, as the queue holds it."""
        [message] = [m for m in self.queue.messages() if m.id == queue_id]
        self.arrivals[queue_id] = message.envelope.received

    def checkque_lines(self) -> list[str]:
        """What ``checkque --json`` says of the queue, from another process."""
        result = checkque(self.config_path, "--json")
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.decode().splitlines() if line]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The ``[queue]`` section: none for the spool, a fresh database otherwise."""
    if request.param == "spool":
        return ""
    dsn = request.getfixturevalue("pg_dsn")
    return f'\n[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n'


@contextmanager
def mail_system(directory: Path, extra: str, queue: str) -> Iterator[QueueMail]:
    local = f'maildir = "{directory}/mail/{{user}}/Maildir"\n'
    config = write_config(directory, local + extra + queue)
    with daemon(config) as server:
        mail = QueueMail(directory, server.host, server.port, config)
        try:
            yield mail
        finally:
            mail.runner.close()


def send(
    mail: QueueMail,
    recipients: dict[str, list[str]],
    mail_options: tuple[str, ...] = (),
) -> str:
    with smtplib.SMTP(mail.host, mail.port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("dsn")
        assert client.mail(SENDER, list(mail_options))[0] == 250
        for recipient, options in recipients.items():
            code, text = client.rcpt(recipient, options)
            assert code == 250, text
        code, text = client.data(MESSAGE)
        assert code == 250, text
    queue_id = text.decode().split()[-1].strip("()")
    mail.sent(queue_id)
    return queue_id


def only_notice(mail: QueueMail) -> EmailMessage:
    [notice] = mail.notices()
    return notice


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_a_recipient_the_next_hop_refuses_is_bounced(
    tmp_path: Path, backend: str, protocol: str
) -> None:
    refusing = Handler(
        lmtp=protocol == "lmtp",
        rcpt=lambda r: (
            "550 5.1.1 <gone@remote.test>: no such user" if r.startswith("gone") else None
        ),
    )
    with peer(refusing) as (_, port):
        hop = f'[deliver]\nnext_hop = "{protocol}:127.0.0.1:{port}"\n'
        with mail_system(tmp_path, hop, backend) as mail:
            queue_id = send(
                mail, {"gone@remote.test": [], "here@remote.test": []}, ("ENVID=bounce",)
            )
            assert [line for line in mail.checkque_lines() if queue_id in line]
            mail.settle()
            mail.runner.run()
            notice = only_notice(mail)
            assert mail.checkque_lines() == []
            assert list(mail.queue.messages()) == []
    [received] = refusing.messages
    assert received.recipients == ["here@remote.test"]
    assert notice["Subject"] == "Undelivered Mail Returned to Sender"
    fields, [block], returned = report_of(notice)
    assert fields == per_message(mail, queue_id, "bounce")
    assert block == {
        "Final-Recipient": "rfc822; gone@remote.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; 127.0.0.1",
        # An LMTP reply is an SMTP reply: RFC 3464's "smtp" diagnostic type.
        "Diagnostic-Code": "smtp; 550 5.1.1 <gone@remote.test>: no such user",
        "Last-Attempt-Date": format_datetime(mail.clock()),
    }
    assert returned.get_content_type() == "text/rfc822-headers"  # RET absent
    assert "Subject: dsn test" in returned.get_content()


def test_a_success_notice_carries_envid_and_orcpt(tmp_path: Path, backend: str) -> None:
    with mail_system(tmp_path, "", backend) as mail:
        queue_id = send(
            mail,
            {
                "alice@example.org": [
                    "NOTIFY=SUCCESS,FAILURE",
                    "ORCPT=rfc822;first+2Blast@example.net",
                ]
            },
            ("ENVID=QQ+2B314159", "RET=FULL"),
        )
        mail.settle()
        mail.runner.run()
        notice = only_notice(mail)
        name = alice_name(mail, queue_id)
        assert mail.checkque_lines() == []
    assert notice["Subject"] == "Successful Mail Delivery Report"
    fields, [block], returned = report_of(notice)
    assert fields == per_message(mail, queue_id, "QQ+314159")
    assert block == {
        "Original-Recipient": "rfc822; first+last@example.net",
        "Final-Recipient": "rfc822; alice@example.org",
        "Action": "delivered",
        "Status": "2.0.0",
        "Diagnostic-Code": f"X-MMDF; 250 2.0.0 Delivered to maildir as {name}",
        "Last-Attempt-Date": format_datetime(mail.clock()),
    }
    # RET=FULL is for failures (RFC 3461 4.3): a success returns the header.
    assert returned.get_content_type() == "text/rfc822-headers"
