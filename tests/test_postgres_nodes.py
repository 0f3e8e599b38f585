"""Many nodes on one replicated queue, with the real programs, over the wire.

A PostgreSQL primary with a synchronous standby (pgcluster), two smtpd
nodes and two deliver processes, each with a spool folder of its own and
the same dsn naming both database hosts (``target_session_attrs=read-write``
finds the promoted standby).  Both delivers write the same Maildir base
with the same hostname, so that the Maildir file of a message has one
name whoever delivers it; mail for other domains goes to an LMTP next hop.

Several smtplib clients stream messages, each with a token of its own in
a header, and note every 250 with the queue id it names, and every
refusal or lost connection.  Meanwhile one smtpd node is killed (its
sessions fail; the clients go on with the other), then one deliver, then
the primary, and the standby is promoted.  At the end every message that
got a 250 is in the Maildir exactly once, under its queue id, and at the
next hop at least once; a message without a 250 is never two messages
(in the Maildir at most once; at the hop one queued message, sent again
only after a death during its send); and the promoted database holds no
queue.
"""

from __future__ import annotations

import email.parser
import itertools
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmdf_smtp.queue.postgres import PostgresQueue
from peer import Handler, peer
from pgcluster import PgServer, primary_and_standby
from test_deliver_wire import deliver_command
from wire import Daemon, checkque, daemon, env, process_tree, write_config

LEASE_SECONDS = 3  # a killed deliver's messages wait this long for the other
CLIENTS = 4
BACKLOG = 40
LOCAL = "alice@example.org"
QUEUED = re.compile(r"Submitted & queued \(([0-9a-f]{26})\)")
TOKEN = "X-Test-Token"


@pytest.fixture
def pair() -> Iterator[tuple[PgServer, PgServer]]:
    with primary_and_standby() as servers:
        yield servers


def node_config(folder: Path, dsn: str, mail: Path, next_hop_port: int) -> Path:
    folder.mkdir()
    return write_config(
        folder,
        f'maildir = "{mail}/{{user}}/Maildir"\n'
        f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{next_hop_port}"\n'
        # A delivery the failover cut short is tried again soon.
        "retry_min = 1\nretry_max = 2\n"
        f'[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\nlease_seconds = {LEASE_SECONDS}\n',
    )


def recipients_of(number: int) -> list[str]:
    """The Maildir, the next hop, or both."""
    return [
        *([LOCAL] if number % 3 != 1 else []),
        *([f"r{number}@relay.example"] if number % 3 != 0 else []),
    ]


@dataclass
class Stream:
    """Clients sending message after message to whichever smtpd answers."""

    ports: list[int]
    # Deliveries made so far (Maildir files and messages at the hop): the
    # clients keep at most BACKLOG ahead of them, so that the end comes soon.
    delivered: Callable[[], int]
    accepted: dict[int, str] = field(default_factory=dict)  # token -> queue id
    failed: dict[int, str] = field(default_factory=dict)  # token -> what happened
    stopping: threading.Event = field(default_factory=threading.Event)
    expected: int = 0  # deliveries the accepted messages are owed
    _tokens: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, client: int) -> None:
        node = client
        connection: smtplib.SMTP | None = None
        while not self.stopping.is_set():
            if self.expected - self.delivered() > BACKLOG:
                time.sleep(0.02)  # flow control, not synchronisation
                continue
            with self._lock:
                token = next(self._tokens)
            try:
                if connection is None:
                    connection = smtplib.SMTP(
                        "127.0.0.1", self.ports[node % len(self.ports)], timeout=30
                    )
                    connection.ehlo("client.test")
                queue_id = self._send(connection, token)
            except (OSError, smtplib.SMTPException) as exc:
                with self._lock:
                    self.failed[token] = repr(exc)
                if connection is not None:
                    connection.close()
                connection = None
                node += 1  # the next message goes to the other node
                continue
            with self._lock:
                if queue_id is None:
                    self.failed[token] = "refused"
                else:
                    self.accepted[token] = queue_id
                    self.expected += len(recipients_of(token))
        if connection is not None:
            try:
                connection.quit()
            except (OSError, smtplib.SMTPException):
                connection.close()

    def _send(self, connection: smtplib.SMTP, token: int) -> str | None:
        code, _ = connection.mail("sender@example.net")
        if code != 250:
            connection.rset()
            return None
        for recipient in recipients_of(token):
            code, _ = connection.rcpt(recipient)
            if code != 250:
                connection.rset()
                return None
        code, reply = connection.data(
            f"{TOKEN}: {token}\r\nSubject: message {token}\r\n\r\nBody of {token}.\r\n".encode()
        )
        if code != 250:
            return None
        match = QUEUED.search(reply.decode())
        assert match is not None, reply
        return match.group(1)

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)


class Deliverer:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                deliver_command(config),
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env={**env(), "PYTHONFAULTHANDLER": "1"},  # SIGABRT: where each thread is
            )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGABRT)
                self.process.wait()
                raise AssertionError(
                    "deliver did not stop on SIGTERM:\n" + self.log.read_text()[-8000:]
                ) from None


def kill_node(node: Daemon) -> None:
    """SIGKILL smtpd's supervisor and its workers at once: the machine died."""
    for pid in process_tree(node.process.pid):
        os.kill(pid, signal.SIGKILL)
    node.process.wait()


def until(
    condition: Callable[[], bool], what: str | Callable[[], str], timeout: float = 40
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what if isinstance(what, str) else what()
        time.sleep(0.05)


def drain(node: Daemon) -> list[str]:
    """The log lines a node has written so far and no one has read."""
    lines = []
    while not node.lines.empty():
        line = node.lines.get_nowait()
        if line is not None:
            lines.append(line)
    return lines


def maildir_tokens(mail: Path) -> dict[str, int]:
    """Each Maildir file's name -> the token in its header."""
    new = mail / "alice" / "Maildir" / "new"
    found = {}
    parser = email.parser.BytesHeaderParser()
    for path in new.iterdir() if new.exists() else ():
        found[path.name] = int(str(parser.parsebytes(path.read_bytes())[TOKEN]))
    return found


def maildir_count(mail: Path) -> int:
    new = mail / "alice" / "Maildir" / "new"
    return len(os.listdir(new)) if new.exists() else 0


def lmtp_tokens(handler: Handler) -> Counter[int]:
    parser = email.parser.BytesHeaderParser()
    return Counter(
        int(str(parser.parsebytes(message.content)[TOKEN])) for message in list(handler.messages)
    )


def hop_queue_ids(handler: Handler) -> dict[int, set[str]]:
    """Each token at the next hop -> the queue ids its copies carry (our Received's ``id``)."""
    parser = email.parser.BytesHeaderParser()
    found: dict[int, set[str]] = {}
    for message in list(handler.messages):
        header = parser.parsebytes(message.content)
        match = re.search(r"\bid ([0-9a-f]{26})\b", str(header["Received"]))
        assert match is not None, header["Received"]
        found.setdefault(int(str(header[TOKEN])), set()).add(match.group(1))
    return found


def test_nodes_die_one_kind_after_the_other_and_every_250_is_delivered(
    pair: tuple[PgServer, PgServer], tmp_path: Path
) -> None:
    primary, standby = pair
    dsn = (
        f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} user=postgres"
        " dbname=postgres target_session_attrs=read-write connect_timeout=2"
    )
    # The schema, made once before the nodes race to make it.
    PostgresQueue(dsn, staging=tmp_path / "staging").prepare()
    mail = tmp_path / "mail"
    handler = Handler(lmtp=True)
    with peer(handler) as (_, hop_port):
        configs = [node_config(tmp_path / f"node{n}", dsn, mail, hop_port) for n in range(2)]
        deliverers = [Deliverer(config, config.parent / "deliver.log") for config in configs]
        stream: Stream | None = None
        clients: list[threading.Thread] = []
        try:
            with daemon(configs[0]) as node0, daemon(configs[1]) as node1:
                stream = Stream(
                    [node0.port, node1.port], lambda: maildir_count(mail) + len(handler.messages)
                )
                clients = [
                    threading.Thread(target=stream.run, args=(n,), daemon=True)
                    for n in range(CLIENTS)
                ]
                for client in clients:
                    client.start()

                def state(what: str) -> Callable[[], str]:
                    def told() -> str:
                        assert stream is not None
                        logs = "".join(
                            f"--- {d.log}\n{d.log.read_text()[-1500:]}" for d in deliverers
                        )
                        logs += "--- smtpd\n" + "".join(drain(node1)[-15:])
                        return (
                            f"{what}: {stream.count()} accepted, {len(stream.failed)} failed"
                            f" ({list(stream.failed.values())[-3:]}), {maildir_count(mail)} in"
                            f" the Maildir, {len(handler.messages)} at the hop\n{logs}"
                        )

                    return told

                def progress(accepted: int, delivered: int) -> Callable[[], bool]:
                    assert stream is not None
                    accepted += stream.count()
                    delivered += maildir_count(mail) + len(handler.messages)
                    return lambda: (
                        stream is not None
                        and stream.count() >= accepted
                        and maildir_count(mail) + len(handler.messages) >= delivered
                    )

                until(progress(40, 20), state("no progress at the start"))
                kill_node(node0)
                until(progress(30, 0), state("no progress after an smtpd node died"))
                deliverers[0].kill()
                until(progress(30, 20), state("no progress after a deliver died"))
                primary.kill()
                standby.promote()
                until(progress(30, 20), state("no progress after the failover"))
                stream.stopping.set()
                for client in clients:
                    client.join(timeout=40)
                    assert not client.is_alive()
            accepted = dict(stream.accepted)

            def all_delivered() -> bool:
                in_maildir = Counter(maildir_tokens(mail).values())
                at_hop = lmtp_tokens(handler)
                return all(
                    (LOCAL not in recipients_of(token) or in_maildir[token] > 0)
                    and (recipients_of(token) == [LOCAL] or at_hop[token] > 0)
                    for token in accepted
                )

            def undelivered() -> str:
                in_maildir = Counter(maildir_tokens(mail).values())
                at_hop = lmtp_tokens(handler)
                missing = {
                    token: accepted[token]
                    for token in accepted
                    if (LOCAL in recipients_of(token) and not in_maildir[token])
                    or (recipients_of(token) != [LOCAL] and not at_hop[token])
                }
                queue = checkque(configs[1], "--json").stdout.decode()
                logs = "".join(
                    line
                    for d in deliverers
                    for line in d.log.read_text().splitlines(keepends=True)
                    if any(queue_id in line for queue_id in missing.values())
                )
                return f"not delivered: {missing}\nqueue: {queue}\n{logs}"

            until(all_delivered, undelivered, timeout=30)
            # The promoted database holds no queue.
            until(
                lambda: checkque(configs[1], "--json").stdout == b"",
                "the queue was not worked off",
                timeout=20,
            )
        finally:
            if stream is not None:
                stream.stopping.set()
            for deliverer in deliverers:
                deliverer.stop()
        result = checkque(configs[1], "--json")
        assert (result.returncode, result.stdout) == (0, b""), result.stderr

    failed = dict(stream.failed)
    assert not set(accepted) & set(failed)
    in_maildir = maildir_tokens(mail)
    maildir_counts = Counter(in_maildir.values())
    hop_counts = lmtp_tokens(handler)
    # Every 250 delivered: in the Maildir exactly once, under the queue id the 250 named.
    for name, token in in_maildir.items():
        if token in accepted:
            assert f".M{accepted[token]}R" in name, (token, name)
    for token in accepted:
        if LOCAL in recipients_of(token):
            assert maildir_counts[token] == 1, token
        if recipients_of(token) != [LOCAL]:
            assert hop_counts[token] >= 1, token
    # Without a 250: never two messages. One whose 250 was lost on the way
    # is queued like any other: in the Maildir at most once, and at the next
    # hop, whose promise is at least once, sent again only as that one
    # queued message, after a death during its send.
    hop_ids = hop_queue_ids(handler)
    for token, queue_id in accepted.items():
        if recipients_of(token) != [LOCAL]:
            assert hop_ids[token] == {queue_id}, (token, hop_ids[token])
    for token in failed:
        assert maildir_counts[token] <= 1, token
        assert len(hop_ids.get(token, ())) <= 1, (token, hop_ids[token])
    # Nothing delivered that no client sent.
    assert set(maildir_counts) | set(hop_counts) <= set(accepted) | set(failed)
    # Each kill cost something: sessions at the dead node, commits at the dead primary.
    assert failed, "no client noticed anything"
    assert len(accepted) >= 130  # the phases above ask that many
    for deliverer in deliverers[1:]:
        assert deliverer.process.returncode == 0, deliverer.log.read_text()
