"""Milters through the real servers: smtpd (the asyncio shell) and smtpsrvr on pipes.

A scripted milter (milterpeer.py) runs on its own event loop in a thread;
the servers run as the subprocesses they are in production, with
``[[milters]]`` pointing at it.  What each test checks: what the SMTP client
is answered, what the milter was sent (commands and macros, in order), and
what the queue holds afterwards, octet for octet.

Most servers are started once for the module (one per configuration) and
serve many sessions; each test sets the milter's script before its session.
The queue is shared by the tests of one server, so what a session queued is
told by the ids in its 250 replies and by the spool's contents before and
after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import trustme

from milterpeer import CLOSE, HANG, NO_FLAGS, Delay, Item, MilterPeer, Replies, Session
from mmdf_smtp.milter import codec
from mmdf_smtp.milter.codec import ProtocolFlag
from mmdf_smtp.queue.spool import Spool
from wire import (
    PYTHON,
    Daemon,
    certificate,
    checkque,
    daemon,
    env,
    process_tree,
    write_config,
)

T = TypeVar("T")

HEADER = (
    b"From: Sender <s@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: hi\r\n"
    b"X-Twice: one\r\n"
    b"X-Twice: two\r\n"
    b"\tfolded\r\n"
)
BODY = b"body line 1\r\n.a line the client dot-stuffs\r\nbody line 2\r\n"
MESSAGE = HEADER + b"\r\n" + BODY
# Several body chunks' worth: a milter hears it in more than one piece.
LONG_BODY = b"".join(b"%06d " % n + b"x" * 70 + b"\r\n" for n in range(3000))
LONG_MESSAGE = HEADER + b"\r\n" + LONG_BODY

TIMEOUT = 0.5  # the failure tests' milter timeouts, in seconds
BOUND = TIMEOUT * 4 + 5  # what a session with a failing milter may take at most

RECEIVED = re.compile(rb"Received: from [^\r]*\r\n(?:\t[^\r]*\r\n)*")
QUEUED = re.compile(r"Submitted & queued \((\S+)\)")


# -- the milter, on a loop of its own ---------------------------------------------


class LoopThread:
    """An asyncio loop in a thread, for the milters the servers talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


class Peer(MilterPeer):
    """The scripted milter, and what the test thread needs of it: to wait
    until its conversations are over, and to cut one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loop = loop
        self._changed = threading.Condition()
        self._writers: list[asyncio.StreamWriter] = []
        self.finished = 0

    def reset(
        self, replies: dict[bytes, Replies] | None = None, protocol: ProtocolFlag = NO_FLAGS
    ) -> None:
        """A new script, for the next test; earlier conversations are forgotten.

        Connections kept from earlier tests are closed: they were negotiated
        under the old script.
        """
        asyncio.run_coroutine_threadsafe(self.drop_kept_connections(), self._loop).result(30)
        self.replies = replies or {}
        self.negotiation = codec.Negotiate(
            version=6, actions=self.negotiation.actions, protocol=protocol
        )
        with self._changed:
            self.sessions.clear()
            self._writers.clear()
            self.finished = 0
            self.connections = 0

    def session_started(self, session: Session, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)

    def session_ended(self, session: Session) -> None:
        with self._changed:
            self.finished += 1
            self._changed.notify_all()

    def wait_finished(self, count: int = 1, timeout: float = 20) -> None:
        """Until ``count`` conversations have ended (the MTA's QUIT or QUIT_NC, or a close)."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.finished >= count, timeout), (
                f"{self.finished} of {count} milter conversations ended"
            )

    def cut(self, conversation: int) -> None:
        """Close a conversation from the milter's side: it died."""
        self._loop.call_soon_threadsafe(self._writers[conversation].close)

    def commands(self) -> list[codec.Command]:
        return [c for c in super().commands() if not isinstance(c, codec.Negotiate)]

    def kinds(self) -> list[str]:
        return [type(c).__name__ for c in self.commands()]


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


class Peers:
    """Scripted milters on the module's loop, closed at its end."""

    def __init__(self, thread: LoopThread) -> None:
        self.thread = thread
        self.started: list[Peer] = []

    def start(self, **kwargs: Any) -> Peer:
        async def started() -> Peer:
            peer = Peer(asyncio.get_running_loop(), **kwargs)
            await peer.__aenter__()
            return peer

        peer = self.thread.run(started())
        self.started.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.started:
            self.thread.run(peer.__aexit__(None, None, None))


@pytest.fixture(scope="module")
def peers(loop_thread: LoopThread) -> Iterator[Peers]:
    started = Peers(loop_thread)
    yield started
    started.close()


@pytest.fixture(scope="module")
def shared_peer(peers: Peers) -> Peer:
    """The milter of the module's usual configuration."""
    return peers.start()


@pytest.fixture
def peer(shared_peer: Peer) -> Peer:
    shared_peer.reset()
    return shared_peer


# -- the SMTP side ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    lines: tuple[str, ...]

    @property
    def code(self) -> int:
        return int(self.lines[-1][:3])

    @property
    def text(self) -> str:
        return self.lines[-1][4:]

    def queue_id(self) -> str:
        match = QUEUED.search(self.text)
        assert self.code == 250 and match, self.lines
        return match.group(1)


class Client:
    """One SMTP client session, turn by turn, over a socket or smtpsrvr's pipes."""

    def __init__(
        self,
        incoming: IO[bytes],
        send: Callable[[bytes], None],
        finish: Callable[[], str],
        port: int,
    ) -> None:
        self._incoming = incoming
        self._send = send
        self._finish = finish
        self.port = port  # the client's port as the server sees it; 0 on pipes
        self.started = time.monotonic()

    def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            line = self._incoming.readline()
            assert line.endswith(b"\r\n"), f"connection ended after {lines}: {line!r}"
            lines.append(line[:-2].decode())
            if line[3:4] != b"-":
                return Reply(tuple(lines))

    def send(self, line: str) -> None:
        self._send(line.encode() + b"\r\n")

    def send_raw(self, data: bytes) -> None:
        self._send(data)

    def at_end(self) -> bool:
        """Whether the server closed the session (waits for what comes)."""
        return self._incoming.readline() == b""

    def command(self, line: str) -> Reply:
        self.send(line)
        return self.reply()

    def message(self, data: bytes) -> Reply:
        """After DATA's 354: the message, dot-stuffed, and its end."""
        stuffed = re.sub(rb"(^|\r\n)\.", rb"\1..", data)
        self._send(stuffed + b".\r\n")
        return self.reply()

    def transaction(
        self, recipients: Sequence[str] = ("alice@example.org",), data: bytes = MESSAGE
    ) -> list[Reply]:
        """MAIL, RCPT each, DATA and the message: every reply, as long as they go on."""
        answers = [self.command("MAIL FROM:<s@example.net>")]
        if answers[-1].code != 250:
            return answers
        answers += [self.command(f"RCPT TO:<{r}>") for r in recipients]
        answers.append(self.command("DATA"))
        if answers[-1].code == 354:
            answers.append(self.message(data))
        return answers

    def readable(self) -> bool:
        """Whether a reply has come, without waiting."""
        # Replies are read whole: nothing waits in the buffer, only on the socket.
        return bool(select.select([self._incoming.fileno()], [], [], 0)[0])

    def quit(self) -> str:
        """QUIT (221), the end of the session; its log when the server is smtpsrvr."""
        assert self.command("QUIT").code == 221
        return self.close()

    def close(self) -> str:
        self.elapsed = time.monotonic() - self.started
        return self._finish()


class Server:
    """smtpd (started once, on first use) or smtpsrvr (started per session) on a configuration."""

    def __init__(self, kind: str, config: Path, channels: str) -> None:
        self.kind = kind
        self.config = config
        self.channels = channels
        self.spool = Spool(config.parent / "spool")
        self._daemon: Daemon | None = None
        self._running = contextlib.ExitStack()
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def daemon(self) -> Daemon:
        if self._daemon is None:
            self._daemon = self._running.enter_context(daemon(self.config, channels=self.channels))
        return self._daemon

    def stop(self) -> None:
        self._running.close()

    def open(self, source: str = "127.0.0.1") -> Client:
        if self.kind == "smtpd":
            return self._connect(source)
        return self._spawn(source)

    def _connect(self, source: str) -> Client:
        sock = self.daemon.connect(source)
        incoming = sock.makefile("rb")

        def finish() -> str:
            incoming.close()
            sock.close()
            return ""

        return Client(incoming, sock.sendall, finish, sock.getsockname()[1])

    def _spawn(self, source: str) -> Client:
        log = self.config.parent / f"smtpsrvr.{len(self._processes)}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "mmdf_smtp.cli.smtpsrvr",
                    "-c",
                    str(self.config),
                    f"[{source}]",
                    "mx.test",
                    self.channels,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env(),
            )
        self._processes.append(process)
        assert process.stdin is not None and process.stdout is not None
        stdin = process.stdin

        def send(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        def finish() -> str:
            stdin.close()
            assert process.wait(timeout=60) == 0
            assert process.stdout is not None
            process.stdout.close()
            return log.read_text()

        return Client(process.stdout, send, finish, 0)

    def pids(self) -> list[int]:
        """The processes that may serve a session now."""
        if self.kind == "smtpd":
            return process_tree(self.daemon.process.pid)
        return [p.pid for p in self._processes if p.poll() is None]

    def logged(self, text: str, log: str) -> str:
        """The log line holding ``text``: smtpd's, or the session's ``log`` (smtpsrvr)."""
        if self.kind == "smtpd":
            return self.daemon.log_lines(text)[0]
        found = [line for line in log.splitlines() if text in line]
        assert found, log
        return found[0]

    # -- the queue

    def ids(self) -> set[str]:
        return set(self.spool.ids())

    def stored(self, queue_id: str) -> bytes:
        with self.spool.open_message(queue_id) as message:
            return message.read()

    def in_tmp(self) -> list[str]:
        return os.listdir(self.spool.tmp) if self.spool.tmp.exists() else []


class Servers:
    """The module's servers, one per configuration and kind, made on first use."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._made: dict[tuple[str, str, str, bool], Server] = {}
        self.ca = trustme.CA()

    def get(
        self,
        kind: str,
        extra: str,
        *,
        channels: str = "local,smtp",
        tls: bool = False,
        edit: Callable[[str], str] = lambda text: text,
    ) -> Server:
        key = (kind, extra, channels, tls)
        if key not in self._made:
            directory = self._factory.mktemp("milterwire")
            config = write_config(
                directory, extra, tls=certificate(self.ca, directory) if tls else None
            )
            config.write_text(edit(config.read_text()))
            self._made[key] = Server(kind, config, channels)
        return self._made[key]

    def stop(self) -> None:
        for server in self._made.values():
            server.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    made = Servers(tmp_path_factory)
    yield made
    made.stop()


def milters(*sockets: str, **settings: object) -> str:
    tables = []
    for socket_name in sockets:
        lines = [f'socket = "{socket_name}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        tables.append("[[milters]]\n" + "\n".join(lines) + "\n")
    return "\n".join(tables)


def failing(socket_name: str, action: str) -> str:
    return milters(
        socket_name,
        default_action=action,
        connect_timeout=TIMEOUT,
        command_timeout=TIMEOUT,
        content_timeout=TIMEOUT,
    )


SHELLS = ["smtpd", "smtpsrvr"]


@pytest.fixture(params=SHELLS)
def server(request: pytest.FixtureRequest, servers: Servers, shared_peer: Peer) -> Server:
    """The module's usual configuration (one milter, default settings), each shell."""
    return servers.get(request.param, milters(shared_peer.socket))


@pytest.fixture
def smtpd(servers: Servers, shared_peer: Peer) -> Server:
    return servers.get("smtpd", milters(shared_peer.socket))


def received_field(stored: bytes) -> bytes:
    match = RECEIVED.search(stored)
    assert match, stored[:200]
    return match.group(0)


def fields(header: bytes) -> list[tuple[str, str]]:
    """A header's fields as a milter is sent them: value without the space, folds as LF."""
    result = []
    for text in re.findall(rb"[^\r\n]+:[^\r]*\r\n(?:[ \t][^\r]*\r\n)*", header):
        name, _, value = text.decode().removesuffix("\r\n").partition(":")
        result.append((name, value.removeprefix(" ").replace("\r\n", "\n")))
    return result


def session(
    server: Server, *, recipients: Sequence[str] = ("alice@example.org",), data: bytes = MESSAGE
) -> tuple[list[Reply], str]:
    """A whole session with one transaction: its replies (greeting first) and log."""
    client = server.open()
    answers = [client.reply()]
    if answers[0].code != 220:
        return answers, client.close()
    answers.append(client.command("EHLO client.example"))
    answers += client.transaction(recipients, data)
    return answers, client.quit()


# -- a milter that lets everything through ---------------------------------------------


def test_a_milter_that_continues_sees_the_whole_session_in_order(
    server: Server, peer: Peer
) -> None:
    before = server.ids()
    client = server.open()
    assert client.reply().code == 220
    assert client.command("EHLO client.example").code == 250
    assert client.command("MAIL FROM:<s@example.net> SIZE=200 BODY=8BITMIME").code == 250
    assert client.command("RCPT TO:<alice@example.org>").code == 250
    assert client.command("RCPT TO:<nobody@example.org>").code == 550  # no such user
    assert client.command("RCPT TO:<bob@example.org>").code == 250
    assert client.command("DATA").code == 354
    queue_id = client.message(MESSAGE).queue_id()
    client.quit()
    peer.wait_finished()

    assert server.ids() - before == {queue_id}
    stored = server.stored(queue_id)
    received = received_field(stored)
    assert stored == received + MESSAGE  # as without milters: our trace field, then the message
    assert received.startswith(b"Received: from client.example ([127.0.0.1])\r\n")
    assert f"\twith ESMTP id {queue_id};".encode() in received

    assert peer.commands() == [
        codec.Connect(
            hostname="[127.0.0.1]",
            family=codec.Family.INET,
            port=client.port,
            address="127.0.0.1",
        ),
        codec.Helo(name="client.example"),
        codec.MailFrom(sender="<s@example.net>", arguments=("SIZE=200", "BODY=8BITMIME")),
        codec.RcptTo(recipient="<alice@example.org>"),
        codec.RcptTo(recipient="<bob@example.org>"),
        codec.Data(),
        *[codec.Header(name=n, value=v) for n, v in fields(received + HEADER)],
        codec.EndOfHeaders(),
        codec.BodyChunk(data=BODY),
        codec.EndOfMessage(),
        # The session ended right after a message the milter let through:
        # the connection is kept for the next one.
        codec.Quit(),
    ]
    assert peer.commands()[6] == codec.Header(
        name="Received", value=received[len(b"Received: ") : -2].decode().replace("\r\n", "\n")
    )
    assert peer.sessions[0].closed_by_mta

    connect = peer.macros(b"C")[0]
    assert connect["j"] == "mx.test"
    assert connect["{daemon_name}"] == "mmdf-smtp"
    assert connect["{client_addr}"] == "127.0.0.1"
    assert connect.get("{client_port}", "") == (str(client.port) if client.port else "")
    (mail,) = peer.macros(b"M")
    assert mail["i"] == queue_id
    assert mail["{mail_addr}"] == "s@example.net"
    assert [m["{rcpt_addr}"] for m in peer.macros(b"R")] == [
        "alice@example.org",
        "bob@example.org",
    ]
    assert peer.macros(b"T") == [{"i": queue_id}]
    assert all(m["i"] == queue_id for m in peer.macros(b"E"))


def test_tls_macros_after_starttls(servers: Servers, shared_peer: Peer) -> None:
    import smtplib
    import ssl

    peer = shared_peer
    peer.reset()
    server = servers.get("smtpd", milters(peer.socket), tls=True)
    context = ssl.create_default_context()
    servers.ca.configure_trust(context)
    with smtplib.SMTP(server.daemon.host, server.daemon.port, timeout=30) as client:
        client.ehlo("client.example")
        client.starttls(context=context)
        client.ehlo("client.example")
        assert isinstance(client.sock, ssl.SSLSocket)
        version, cipher = client.sock.version(), client.sock.cipher()
        assert cipher is not None
        client.sendmail("s@example.net", ["alice@example.org"], MESSAGE)
    peer.wait_finished()
    assert [c for c in peer.commands() if isinstance(c, codec.Helo)] == [
        codec.Helo(name="client.example")
    ] * 2
    # Before STARTTLS there is nothing to say; after it, the protocol and cipher.
    assert peer.macros(b"H") == [{"{tls_version}": version, "{cipher}": cipher[0]}]


# -- each reply, at each stage ------------------------------------------------------------

REJECTED = ("550 5.7.1 Command rejected",)
TEMPFAILED = ("451 4.7.1 Service unavailable - try again later",)
# smtpsrvr costs a process start a session: it gets the first case of each stage.
DAEMON_REFUSALS = [
    ("smtpd", codec.Reject(), REJECTED),
    ("smtpd", codec.TempFail(), TEMPFAILED),
]
REFUSALS = [*DAEMON_REFUSALS, ("smtpsrvr", codec.Reject(), REJECTED)]


def test_reject_at_connect_leaves_the_client_only_quit(server: Server, peer: Peer) -> None:
    peer.reset({b"C": [codec.Reject()]})
    before = server.ids()
    client = server.open()
    assert client.reply().lines == ("554 5.7.1 Command rejected",)
    assert client.command("EHLO client.example").code == 503
    assert client.command("MAIL FROM:<s@example.net>").code == 503
    assert client.command("RCPT TO:<alice@example.org>").code == 503
    assert client.command("DATA").code == 503
    client.quit()
    peer.wait_finished()
    assert peer.kinds() == ["Connect"]  # and no more: the session had nothing to filter
    assert server.ids() == before


def test_tempfail_at_connect_closes_with_421(server: Server, peer: Peer) -> None:
    peer.reset({b"C": [codec.TempFail()]})
    client = server.open()
    assert client.reply().lines == ("421 4.7.1 Service unavailable - try again later",)
    assert client.at_end()  # closed
    client.close()
    peer.wait_finished()
    assert peer.kinds() == ["Connect"]


@pytest.mark.parametrize(("server", "item", "lines"), DAEMON_REFUSALS, indirect=["server"])
def test_refusal_at_helo(server: Server, peer: Peer, item: Item, lines: tuple[str]) -> None:
    peer.reset({b"H": [item]})
    before = server.ids()
    client = server.open()
    assert client.reply().code == 220
    assert client.command("EHLO client.example").lines == lines
    # Refused at HELO, refused for the rest of the session (as in Postfix).
    assert client.command("HELO client.example").lines == lines
    client.quit()
    peer.wait_finished()
    assert server.ids() == before


@pytest.mark.parametrize(("server", "item", "lines"), REFUSALS, indirect=["server"])
def test_refusal_at_mail_refuses_that_transaction(
    server: Server, peer: Peer, item: Item, lines: tuple[str]
) -> None:
    peer.reset(
        {b"M": lambda c: [item] if "bad" in getattr(c, "sender", "") else [codec.Continue()]}
    )
    before = server.ids()
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<bad@example.net>").lines == lines
    assert client.command("RCPT TO:<alice@example.org>").code == 503  # no transaction
    # The next transaction is asked anew, and goes through.
    queue_id = client.transaction()[-1].queue_id()
    client.quit()
    peer.wait_finished()
    assert server.ids() - before == {queue_id}
    assert peer.kinds()[:5] == ["Connect", "Helo", "MailFrom", "Abort", "MailFrom"]


@pytest.mark.parametrize(("server", "item", "lines"), REFUSALS, indirect=["server"])
def test_refusal_at_rcpt_refuses_only_that_recipient(
    server: Server, peer: Peer, item: Item, lines: tuple[str]
) -> None:
    peer.reset(
        {b"R": lambda c: [item] if "bob" in getattr(c, "recipient", "") else [codec.Continue()]}
    )
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    answers = client.transaction(["alice@example.org", "bob@example.org"])
    assert [a.code for a in answers[:4]] == [250, 250, int(lines[0][:3]), 354]
    assert answers[2].lines == lines
    queue_id = answers[-1].queue_id()
    client.quit()
    peer.wait_finished()
    assert server.spool.envelope(queue_id).recipients == ("alice@example.org",)
    assert server.stored(queue_id).endswith(MESSAGE)


@pytest.mark.parametrize(("server", "item", "lines"), DAEMON_REFUSALS, indirect=["server"])
def test_refusal_at_data(server: Server, peer: Peer, item: Item, lines: tuple[str]) -> None:
    peer.reset({b"T": [item]})
    before = server.ids()
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.transaction()[-1].lines == lines
    assert client.command("RSET").code == 250
    client.quit()
    peer.wait_finished()
    assert server.ids() == before
    assert "Header" not in peer.kinds()


@pytest.mark.parametrize(("server", "item", "lines"), DAEMON_REFUSALS, indirect=["server"])
def test_refusal_at_a_header_then_a_new_connection_for_the_next_transaction(
    server: Server, peer: Peer, item: Item, lines: tuple[str]
) -> None:
    """The content goes pipelined: after a refusal at a header, the fields
    already sent after it leave the connection out of step, so the next
    transaction gets a new one, told CONNECT and HELO again."""
    refused = False

    def at_header(command: codec.Command) -> Sequence[Item]:
        nonlocal refused
        if isinstance(command, codec.Header) and command.name == "Subject" and not refused:
            refused = True
            return [item]
        return [codec.Continue()]

    peer.reset({b"L": at_header})
    before = server.ids()
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.transaction()[-1].lines == lines
    queue_id = client.transaction()[-1].queue_id()
    client.quit()
    peer.wait_finished(2)
    assert server.ids() - before == {queue_id}
    assert peer.connections == 2
    first, second = peer.sessions
    kinds = [type(c).__name__ for c in second.received if not isinstance(c, codec.DefineMacros)]
    assert kinds[:4] == ["Negotiate", "Connect", "Helo", "MailFrom"]
    assert first.connection == 0 and second.connection == 1
    assert [c for c in first.received if isinstance(c, codec.Connect)] == [
        c for c in second.received if isinstance(c, codec.Connect)
    ]


def test_discard_at_a_header_answers_250_and_queues_nothing(server: Server, peer: Peer) -> None:
    peer.reset({b"L": [codec.Discard()]})
    before = server.ids()
    answers, _ = session(server)
    assert [a.code for a in answers] == [220, 250, 250, 250, 354, 250]
    peer.wait_finished()
    assert server.ids() == before
    assert server.in_tmp() == []


@pytest.mark.parametrize(
    ("server", "item", "lines"),
    [
        *DAEMON_REFUSALS,
        ("smtpd", codec.ReplyCode(text="554 5.7.0 Spam, thanks"), ("554 5.7.0 Spam, thanks",)),
        *[
            (
                kind,
                codec.ReplyCode(text="550-5.7.1 first line\r\n550 5.7.1 second line"),
                ("550-5.7.1 first line", "550 5.7.1 second line"),
            )
            for kind in SHELLS
        ],
    ],
    indirect=["server"],
)
def test_refusal_at_end_of_message_queues_nothing(
    server: Server, peer: Peer, item: Item, lines: tuple[str]
) -> None:
    peer.reset({b"E": [item]})
    before = server.ids()
    answers, _ = session(server)
    assert answers[-1].lines == lines
    peer.wait_finished()
    assert server.ids() == before
    assert server.in_tmp() == []


def test_replycode_at_rcpt_and_mail_passed_on_exactly(smtpd: Server, peer: Peer) -> None:
    server = smtpd
    peer.reset(
        {
            b"M": lambda c: (
                [codec.ReplyCode(text="451-4.3.0 not now\r\n451 4.3.0 try later")]
                if "later" in getattr(c, "sender", "")
                else [codec.Continue()]
            ),
            b"R": [codec.ReplyCode(text="550 5.1.1 <alice@example.org>: no thanks")],
        }
    )
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<later@example.net>").lines == (
        "451-4.3.0 not now",
        "451 4.3.0 try later",
    )
    assert client.command("MAIL FROM:<s@example.net>").code == 250
    assert client.command("RCPT TO:<alice@example.org>").lines == (
        "550 5.1.1 <alice@example.org>: no thanks",
    )
    assert client.command("DATA").code == 554  # no valid recipients
    client.quit()
    peer.wait_finished()


@pytest.mark.parametrize(
    ("server", "stage"), [("smtpd", b"R"), ("smtpd", b"E"), ("smtpsrvr", b"E")], indirect=["server"]
)
def test_discard_answers_250_and_queues_nothing(server: Server, peer: Peer, stage: bytes) -> None:
    peer.reset({stage: [codec.Discard()]})
    before = server.ids()
    answers, log = session(server)
    assert [a.code for a in answers] == [220, 250, 250, 250, 354, 250]
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    assert queue_id == peer.macros(b"M")[0]["i"]  # the id the message would have had
    assert server.ids() == before
    assert server.in_tmp() == []
    assert f"discarded id={queue_id} " in server.logged(f"discarded id={queue_id}", log)
    if stage == b"R":  # the milter hears no more of the message
        assert not {"Data", "Header", "BodyChunk", "EndOfMessage"} & set(peer.kinds())


def test_accept_the_milter_hears_no_more_of_the_message(smtpd: Server, peer: Peer) -> None:
    server = smtpd
    peer.reset({b"R": [codec.Accept()]})
    answers, _ = session(server)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    assert server.stored(queue_id).endswith(b"\r\n" + MESSAGE)
    kinds = peer.kinds()
    assert kinds[: kinds.index("RcptTo") + 1] == ["Connect", "Helo", "MailFrom", "RcptTo"]
    assert not {"Data", "Header", "EndOfHeaders", "BodyChunk", "EndOfMessage"} & set(kinds)
    assert kinds[-1] == "Quit"


def test_skip_during_the_body_sends_no_more_of_it(server: Server, peer: Peer) -> None:
    peer.reset({b"B": [codec.Skip()]}, protocol=ProtocolFlag.SKIP)
    answers, _ = session(server, data=LONG_MESSAGE)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    stored = server.stored(queue_id)
    assert stored == received_field(stored) + LONG_MESSAGE
    chunks = [c for c in peer.commands() if isinstance(c, codec.BodyChunk)]
    assert len(chunks) == 1 and LONG_BODY.startswith(chunks[0].data)
    assert len(LONG_BODY) > 2 * len(chunks[0].data)  # there was more to send
    assert peer.kinds()[-2:] == ["EndOfMessage", "Quit"]


# -- modifications at end of message ---------------------------------------------------


@dataclass(frozen=True)
class Change:
    """Modifications a milter sends at end of message, and what the queue should hold."""

    modifications: tuple[codec.Response, ...]
    stored: Callable[[bytes], bytes]  # from our Received field, the queued copy
    recipients: tuple[str, ...] = ("alice@example.org",)
    queued_for: tuple[str, ...] = ("alice@example.org",)


CHANGES = {
    "add header": Change(
        (codec.AddHeader(name="X-Added", value="yes"),),
        lambda received: received + HEADER + b"X-Added: yes\r\n\r\n" + BODY,
    ),
    # Our Received field is field 0, as Sendmail and Postfix count.
    "insert header at 0": Change(
        (codec.InsertHeader(index=0, name="X-Top", value="first"),),
        lambda received: b"X-Top: first\r\n" + received + MESSAGE,
    ),
    "insert header at 1": Change(
        (codec.InsertHeader(index=1, name="X-Second", value="below Received"),),
        lambda received: received + b"X-Second: below Received\r\n" + MESSAGE,
    ),
    "change the second of two": Change(
        (codec.ChangeHeader(index=2, name="X-Twice", value="changed\n\tand folded"),),
        lambda received: (
            received
            + MESSAGE.replace(
                b"X-Twice: two\r\n\tfolded\r\n", b"X-Twice: changed\r\n\tand folded\r\n"
            )
        ),
    ),
    "delete header": Change(
        (codec.ChangeHeader(index=1, name="Subject", value=""),),
        lambda received: received + MESSAGE.replace(b"Subject: hi\r\n", b""),
    ),
    "add recipient": Change(
        (codec.AddRecipient(recipient="<bob@example.org>"),),
        lambda received: received + MESSAGE,
        queued_for=("alice@example.org", "bob@example.org"),
    ),
    "add recipient with arguments": Change(
        (codec.AddRecipientWithArguments(recipient="<bob@example.org>", arguments="NOTIFY=NEVER"),),
        lambda received: received + MESSAGE,
        queued_for=("alice@example.org", "bob@example.org"),
    ),
    "delete recipient": Change(
        (codec.DeleteRecipient(recipient="<bob@example.org>"),),
        lambda received: received + MESSAGE,
        recipients=("alice@example.org", "bob@example.org"),
    ),
    # The milter's LF line ends become CRLF; its pieces are one body.
    "replace body": Change(
        (codec.ReplaceBody(data=b"new\nbo"), codec.ReplaceBody(data=b"dy\r\nend\n")),
        lambda received: received + HEADER + b"\r\nnew\r\nbody\r\nend\r\n",
    ),
}


@pytest.mark.parametrize("name", CHANGES)
def test_each_modification_in_the_queued_copy(smtpd: Server, peer: Peer, name: str) -> None:
    change = CHANGES[name]
    peer.reset({b"E": [*change.modifications, codec.Continue()]})
    answers, _ = session(smtpd, recipients=change.recipients)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    stored = smtpd.stored(queue_id)
    assert stored == change.stored(received_field(stored))
    envelope = smtpd.spool.envelope(queue_id)
    assert envelope.recipients == change.queued_for
    assert envelope.sender == "s@example.net"


def test_several_modifications_over_pipes(servers: Servers, shared_peer: Peer) -> None:
    server = servers.get("smtpsrvr", milters(shared_peer.socket))
    peer = shared_peer
    peer.reset(
        {
            b"E": [
                codec.InsertHeader(index=1, name="X-Second", value="below Received"),
                codec.ChangeHeader(index=2, name="X-Twice", value="changed"),
                codec.ChangeHeader(index=1, name="Subject", value=""),
                codec.AddHeader(name="X-Added", value="yes"),
                codec.AddRecipient(recipient="<bob@example.org>"),
                codec.ReplaceBody(data=b"new body\n"),
                codec.Continue(),
            ]
        }
    )
    answers, _ = session(server)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    stored = server.stored(queue_id)
    header = HEADER.replace(b"Subject: hi\r\n", b"").replace(
        b"X-Twice: two\r\n\tfolded\r\n", b"X-Twice: changed\r\n"
    )
    assert stored == (
        received_field(stored)
        + b"X-Second: below Received\r\n"
        + header
        + b"X-Added: yes\r\n\r\nnew body\r\n"
    )
    assert server.spool.envelope(queue_id).recipients == ("alice@example.org", "bob@example.org")


def queued_json(server: Server, queue_id: str) -> dict[str, Any]:
    result = checkque(server.config, "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any]
    (found,) = [
        m for line in result.stdout.splitlines() if (m := json.loads(line))["id"] == queue_id
    ]
    return found


def test_change_sender(smtpd: Server, peer: Peer) -> None:
    peer.reset({b"E": [codec.ChangeSender(sender="<new@example.net>"), codec.Continue()]})
    answers, _ = session(smtpd)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    assert queued_json(smtpd, queue_id)["sender"] == "new@example.net"
    stored = smtpd.stored(queue_id)
    assert stored == received_field(stored) + MESSAGE


def test_quarantine_queues_the_message_on_hold(smtpd: Server, peer: Peer) -> None:
    peer.reset({b"E": [codec.Quarantine(reason="looks like phish"), codec.Continue()]})
    answers, _ = session(smtpd)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    assert smtpd.spool.envelope(queue_id).quarantine == "looks like phish"
    assert queued_json(smtpd, queue_id)["quarantine"] == "looks like phish"
    stored = smtpd.stored(queue_id)
    assert stored == received_field(stored) + MESSAGE


def test_deleting_every_recipient_queues_nothing(smtpd: Server, peer: Peer) -> None:
    peer.reset(
        {
            b"E": [
                codec.DeleteRecipient(recipient="<alice@example.org>"),
                codec.DeleteRecipient(recipient="bob@example.org"),  # brackets or not
                codec.Continue(),
            ]
        }
    )
    before = smtpd.ids()
    answers, _ = session(smtpd, recipients=("alice@example.org", "bob@example.org"))
    peer.wait_finished()
    assert answers[-1].queue_id() == peer.macros(b"M")[0]["i"]
    assert smtpd.ids() == before
    assert smtpd.in_tmp() == []


def test_a_chain_of_milters_each_adding_a_field(
    servers: Servers, peers: Peers, shared_peer: Peer
) -> None:
    chain = [shared_peer, *(peers.start() for _ in range(2))]
    for n, peer in enumerate(chain, 1):
        peer.reset({b"E": [codec.AddHeader(name="X-Milter", value=f"{n}"), codec.Continue()]})
    server = servers.get("smtpd", milters(*(p.socket for p in chain)))
    answers, _ = session(server)
    queue_id = answers[-1].queue_id()
    for peer in chain:
        peer.wait_finished()
        assert peer.kinds()[-2:] == ["EndOfMessage", "Quit"]
    stored = server.stored(queue_id)
    added = b"X-Milter: 1\r\nX-Milter: 2\r\nX-Milter: 3\r\n"
    assert stored == received_field(stored) + HEADER + added + b"\r\n" + BODY


# -- a milter that fails --------------------------------------------------------------

DEFAULTS = {
    "tempfail": ("451 4.7.1 Service unavailable - try again later",),
    "reject": ("550 5.7.1 Service unavailable",),
    "accept": None,  # as if there were no milter
}

# How the milter breaks, and the stage whose reply tells.
BREAKS: dict[str, tuple[dict[bytes, Replies], str]] = {
    "hangs at a command": ({b"M": [HANG]}, "MAIL"),
    "hangs in the body": ({b"B": [HANG]}, "end of data"),
    "dies mid-body": ({b"B": [codec.Continue(), CLOSE]}, "end of data"),
    "sends garbage": ({b"R": [b"\x00\x00\x00\x03zzz"]}, "RCPT"),
    "sends an absurd length": ({b"T": [b"\x7f\xff\xff\xf0c"]}, "DATA"),
}
STAGES = ["greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data"]


def check_failure(server: Server, action: str, stage: str, before: set[str]) -> None:
    """One session with a failing milter: the default action at ``stage``, in bounded time."""
    client = server.open()
    answers = [client.reply()]
    if answers[0].code == 220:
        answers.append(client.command("EHLO client.example"))
        answers += client.transaction(data=LONG_MESSAGE)
    if answers[0].code != 421:
        assert client.command("RSET").code == (503 if answers[0].code == 554 else 250)
        client.quit()
    else:
        client.close()
    assert client.elapsed < BOUND

    refusal = DEFAULTS[action]
    if refusal is None:
        assert [a.code for a in answers] == [220, 250, 250, 250, 354, 250]
        queue_id = answers[-1].queue_id()
        assert server.ids() - before == {queue_id}
        stored = server.stored(queue_id)
        assert stored == received_field(stored) + LONG_MESSAGE
    else:
        refused = answers[STAGES.index(stage)]
        if stage == "greeting":  # before the greeting: the session ends or only QUIT is left
            code = 421 if refusal[0].startswith("4") else 554
            assert refused.lines == (f"{code}{refusal[0][3:]}",)
        else:
            assert refused.lines == refusal
            assert all(a.code < 400 for a in answers[: STAGES.index(stage)])
        assert server.ids() == before  # nothing queued
    assert server.in_tmp() == []  # nothing half-queued


@pytest.mark.parametrize("action", DEFAULTS)
@pytest.mark.parametrize("how", BREAKS)
def test_a_failing_milter_costs_bounded_time_and_gets_the_default_action(
    servers: Servers, peer: Peer, how: str, action: str
) -> None:
    replies, stage = BREAKS[how]
    peer.reset(replies)
    server = servers.get("smtpd", failing(peer.socket, action))
    check_failure(server, action, stage, server.ids())
    peer.wait_finished()


@pytest.fixture(scope="module")
def nobody_listening() -> str:
    """A milter socket where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"inet:127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    ("kind", "action"),
    [*(("smtpd", action) for action in DEFAULTS), ("smtpsrvr", "tempfail")],
)
def test_a_milter_not_listening(
    servers: Servers, nobody_listening: str, kind: str, action: str
) -> None:
    server = servers.get(kind, failing(nobody_listening, action))
    check_failure(server, action, "greeting", server.ids())


def test_a_milter_that_hangs_in_the_body_over_pipes(servers: Servers, peer: Peer) -> None:
    peer.reset({b"B": [HANG]})
    server = servers.get("smtpsrvr", failing(peer.socket, "tempfail"))
    check_failure(server, "tempfail", "end of data", server.ids())
    peer.wait_finished()


# -- sessions do not wait on each other ---------------------------------------------------

WORKER = re.compile(r"^smtpd\((\d+)\): ")


def test_no_session_waits_on_another_sessions_milter(servers: Servers, peer: Peer) -> None:
    """A milter that hangs for one session holds that session only, not its worker's loop."""
    hung = threading.Event()

    def at_mail(command: codec.Command) -> Sequence[Item]:
        assert isinstance(command, codec.MailFrom)
        if "mark" in command.sender:  # a refusal, logged with the worker's pid
            return [codec.Reject()]
        if "hang" in command.sender:
            hung.set()
            return [HANG]
        return [codec.Continue()]

    peer.reset({b"M": at_mail})
    server = servers.get("smtpd", milters(peer.socket, command_timeout=30))
    d = server.daemon

    def worker_of(mark: str) -> int:
        (line,) = d.log_lines(f"from=<{mark}@example.net>")
        match = WORKER.match(line)
        assert match, line
        return int(match.group(1))

    first = server.open()
    first.reply()
    first.command("EHLO first.example")
    assert first.command("MAIL FROM:<mark-first@example.net>").code == 550
    worker = worker_of("mark-first")
    first.send("MAIL FROM:<hang@example.net>")
    assert hung.wait(20)

    # Other sessions until one is served by the same worker (smtpd has one a
    # core): each completes a whole transaction while the first still waits.
    others = 0
    for n in range(40):
        other = server.open()
        assert other.reply().code == 220
        other.command("EHLO other.example")
        assert other.command(f"MAIL FROM:<mark-{n}@example.net>").code == 550
        answers = other.transaction()
        answers[-1].queue_id()
        other.quit()
        others += 1
        assert not first.readable()  # still waiting for its milter
        if worker_of(f"mark-{n}") == worker:
            break
    else:
        pytest.fail(f"no session of {others} was served by worker {worker}")

    peer.cut(0)  # the first session's milter dies: its default action, at once
    assert first.reply().lines == TEMPFAILED
    first.quit()
    peer.wait_finished(others + 1)


# -- trusted hosts ----------------------------------------------------------------------


def test_a_channel_with_checks_off_never_asks_the_milter(servers: Servers, peer: Peer) -> None:
    trusted = servers.get(
        "smtpd",
        milters(peer.socket),
        channels="local,other,smtp",
        edit=lambda text: text.replace("relay = true\n", "relay = true\nchecks = false\n", 1),
    )
    answers, _ = session(trusted)
    queue_id = answers[-1].queue_id()
    stored = trusted.stored(queue_id)
    assert stored == received_field(stored) + MESSAGE
    # A session of another channel after it is the milter's first.
    other = trusted.open("127.0.0.2")
    assert other.reply().code == 220
    other.quit()
    peer.wait_finished()
    assert len(peer.sessions) == 1
    assert peer.macros(b"C")[0]["{client_addr}"] == "127.0.0.2"


# -- a big message ----------------------------------------------------------------------

BIG_BODY = b"".join(b"%08d " % n + b"y" * 70 + b"\r\n" for n in range(5 * 1024 * 1024 // 80))


@pytest.mark.parametrize("kind", SHELLS)
def test_a_big_message_is_staged_on_disk_and_sent_in_chunks(
    servers: Servers, peer: Peer, kind: str
) -> None:
    server = servers.get(kind, milters(peer.socket))
    staged: list[str] = []

    def at_end(_: codec.Command) -> Sequence[Item]:
        # While the milter has the message, the server holds it in a file
        # in the spool's tmp/, unlinked: not in its memory.
        for pid in server.pids():
            fds = Path(f"/proc/{pid}/fd")
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(f"{server.spool.tmp}/"):
                        staged.append(target)
        return [codec.ChangeHeader(index=1, name="Subject", value="big"), codec.Continue()]

    peer.reset({b"E": at_end})
    answers, _ = session(server, data=HEADER + b"\r\n" + BIG_BODY)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    assert staged and all(t.endswith(" (deleted)") for t in staged), staged
    chunks = [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)]
    assert max(map(len, chunks)) <= 65535
    assert b"".join(chunks) == BIG_BODY
    stored = server.stored(queue_id)
    big_header = HEADER.replace(b"Subject: hi\r\n", b"Subject: big\r\n")
    assert stored == received_field(stored) + big_header + b"\r\n" + BIG_BODY


# -- more than one transaction, and BDAT ----------------------------------------------


def test_each_transaction_of_a_session_is_filtered_afresh(smtpd: Server, peer: Peer) -> None:
    server = smtpd
    peer.reset(
        {
            b"R": lambda c: (
                [codec.Discard()] if "bob" in getattr(c, "recipient", "") else [codec.Continue()]
            ),
            b"E": [codec.AddHeader(name="X-Seen", value="yes"), codec.Continue()],
        }
    )
    before = server.ids()
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    discarded = client.transaction(["bob@example.org"])[-1].queue_id()
    assert client.command("MAIL FROM:<s@example.net>").code == 250
    assert client.command("RSET").code == 250
    first = client.transaction()[-1].queue_id()
    second = client.transaction(data=MESSAGE.replace(b"hi", b"again"))[-1].queue_id()
    client.quit()
    peer.wait_finished()

    assert server.ids() - before == {first, second}
    for queue_id, data in ((first, MESSAGE), (second, MESSAGE.replace(b"hi", b"again"))):
        stored = server.stored(queue_id)
        header, _, body = data.partition(b"\r\n\r\n")
        assert stored == received_field(stored) + header + b"\r\nX-Seen: yes\r\n\r\n" + body
    # Each transaction has its own queue id, the reset one too.
    ids = [m["i"] for m in peer.macros(b"M")]
    assert len(set(ids)) == 4
    assert (ids[0], ids[2], ids[3]) == (discarded, first, second)
    kinds = peer.kinds()
    assert kinds.count("MailFrom") == 4
    assert kinds.count("EndOfMessage") == 2  # not for the discarded one
    assert kinds.count("Abort") >= 2  # the discarded transaction, the reset one
    assert [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)] == [BODY, BODY]


def test_bdat_through_a_milter(server: Server, peer: Peer) -> None:
    peer.reset({b"E": [codec.AddHeader(name="X-Added", value="yes"), codec.Continue()]})
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<s@example.net>").code == 250
    assert client.command("RCPT TO:<alice@example.org>").code == 250
    half = len(MESSAGE) // 2
    client.send(f"BDAT {half}")
    client.send_raw(MESSAGE[:half])
    assert client.reply().code == 250
    client.send(f"BDAT {len(MESSAGE) - half} LAST")
    client.send_raw(MESSAGE[half:])
    queue_id = client.reply().queue_id()
    client.quit()
    peer.wait_finished()
    stored = server.stored(queue_id)
    assert stored == received_field(stored) + HEADER + b"X-Added: yes\r\n\r\n" + BODY
    assert [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)] == [BODY]


def test_pipelined_commands_wait_their_turn_behind_the_milter(smtpd: Server, peer: Peer) -> None:
    """RFC 2920: replies in the order of the commands, each after its milter answer."""
    peer.reset(
        {
            b"M": [Delay(0.05), codec.Continue()],  # slow, so that the rest arrives meanwhile
            b"R": lambda c: (
                [codec.Reject()] if "bob" in getattr(c, "recipient", "") else [codec.Continue()]
            ),
        }
    )
    client = smtpd.open()
    client.reply()
    assert "PIPELINING" in "\n".join(client.command("EHLO client.example").lines)
    client.send_raw(
        b"MAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\n"
    )
    assert [client.reply().code for _ in range(4)] == [250, 550, 250, 354]
    queue_id = client.message(MESSAGE).queue_id()
    client.quit()
    peer.wait_finished()
    assert smtpd.spool.envelope(queue_id).recipients == ("alice@example.org",)


@pytest.mark.parametrize("server", SHELLS, indirect=True)
def test_a_client_gone_mid_message_leaves_nothing(server: Server, peer: Peer) -> None:
    before = server.ids()
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<s@example.net>").code == 250
    assert client.command("RCPT TO:<alice@example.org>").code == 250
    assert client.command("DATA").code == 354
    client.send_raw(LONG_MESSAGE[: len(LONG_MESSAGE) // 2])
    client.close()
    peer.wait_finished()  # the milter's conversation is closed, too
    assert peer.kinds()[-1] in ("Abort", "Quit")
    assert server.ids() == before
    assert server.in_tmp() == []


def test_leading_space_negotiated(smtpd: Server, peer: Peer) -> None:
    """SMFIP_HDR_LEADSPC: values as they follow the colon, both ways."""
    peer.reset(
        {b"E": [codec.AddHeader(name="X-Added", value="\tyes"), codec.Continue()]},
        protocol=ProtocolFlag.HDR_LEADSPC,
    )
    answers, _ = session(smtpd)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    headers = [c for c in peer.commands() if isinstance(c, codec.Header)]
    assert headers[1:4] == [
        codec.Header(name="From", value=" Sender <s@example.net>"),
        codec.Header(name="To", value=" alice@example.org"),
        codec.Header(name="Subject", value=" hi"),
    ]
    stored = smtpd.stored(queue_id)
    assert stored == received_field(stored) + HEADER + b"X-Added:\tyes\r\n\r\n" + BODY


ODD_HEADERS = [
    # No space after the colon, an empty value, 8-bit octets (UTF-8 and not), trailing blanks.
    b"Subject:tight\r\nX-Empty:\r\nX-Utf8: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\nX-Trail: x  \r\n"
    b"\r\nbody\r\n",
    # A header and no body, no empty line.
    b"Subject: only a header\r\n",
    # No header at all: the first line is body.
    b"just a body line\r\n",
    b"",
]


@pytest.mark.parametrize("data", ODD_HEADERS)
def test_unusual_messages_queued_exactly_through_a_milter(
    smtpd: Server, peer: Peer, data: bytes
) -> None:
    peer.reset({b"E": [codec.AddHeader(name="X-Added", value="yes"), codec.Continue()]})
    answers, _ = session(smtpd, data=data)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    stored = smtpd.stored(queue_id)
    # The field goes at the end of the header section, whatever follows it
    # (an empty line is added by no one: the message is as it came).
    header, separator, body = data.partition(b"\r\n\r\n")
    if separator:
        expected = header + b"\r\nX-Added: yes\r\n\r\n" + body
    elif data.startswith(b"Subject"):
        expected = data + b"X-Added: yes\r\n"
    else:
        expected = b"X-Added: yes\r\n" + data
    assert stored == received_field(stored) + expected


def test_accept_at_connect_drops_the_milter_for_the_session(smtpd: Server, peer: Peer) -> None:
    peer.reset({b"C": [codec.Accept()]})
    answers, _ = session(smtpd)
    queue_id = answers[-1].queue_id()
    peer.wait_finished()
    assert peer.kinds() in (["Connect"], ["Connect", "Quit"])
    stored = smtpd.stored(queue_id)
    assert stored == received_field(stored) + MESSAGE


@pytest.mark.parametrize("server", SHELLS, indirect=True)
def test_shutdown_from_the_milter_ends_the_session_with_421(server: Server, peer: Peer) -> None:
    peer.reset({b"M": [codec.Shutdown()]})
    client = server.open()
    client.reply()
    client.command("EHLO client.example")
    # Pipelined behind it: never answered, the session is over.
    client.send_raw(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert client.reply().lines == ("421 4.7.0 Server closing connection",)
    assert client.at_end()
    client.close()
    peer.wait_finished()
    assert peer.kinds()[-1] != "RcptTo"


def test_a_421_at_end_of_data_closes_and_queues_nothing(smtpd: Server, peer: Peer) -> None:
    peer.reset({b"E": [codec.ReplyCode(text="421 4.3.2 going down")]})
    before = smtpd.ids()
    client = smtpd.open()
    client.reply()
    client.command("EHLO client.example")
    assert client.transaction()[-1].lines == ("421 4.3.2 going down",)
    assert client.at_end()
    client.close()
    peer.wait_finished()
    assert smtpd.ids() == before
    assert smtpd.in_tmp() == []
