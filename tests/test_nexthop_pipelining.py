"""deliver's next-hop client with a peer that offers PIPELINING (RFC 2920),
and the dot-stuffing of what it sends (RFC 5321 4.5.2)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SMTPSession
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.config import NextHop
from mmdf_smtp.delivery import nexthop
from mmdf_smtp.delivery.nexthop import Outcome, dot_stuffed
from peer import Handler, peer

MESSAGE = b"Subject: pipelined\r\n\r\n.a dot\r\nbody\r\n"
STUFFED = b"Subject: pipelined\r\n\r\n..a dot\r\nbody\r\n.\r\n"


@dataclass
class Session:
    """What one connection said: each read outside the data, as it came,
    and each message's data up to and with its end."""

    reads: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)


class Peer:
    """A next hop that records how the commands arrived, read by read.

    It answers each read's whole commands at once, in order, as a
    pipelining server does; ``extensions`` are its EHLO (LHLO) keywords.
    """

    def __init__(
        self,
        *,
        lmtp: bool = False,
        extensions: Sequence[str] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
        refuse: Sequence[str] = (),
        mail_reply: bytes = b"250 2.1.0 ok",
        data_always: bool = False,
        close_after_messages: int | None = None,
        rset_reply: bytes | None = None,
        going_down_at: str | None = None,
    ) -> None:
        self.lmtp = lmtp
        self.extensions = extensions
        self.refuse = refuse  # recipients whose RCPT gets 550
        self.mail_reply = mail_reply
        self.data_always = data_always  # 354 to DATA even with no recipient
        self.close_after_messages = close_after_messages  # then the peer hangs up
        self.rset_reply = rset_reply  # instead of 250; a 421 closes
        self.going_down_at = going_down_at  # this recipient's RCPT gets 421, and the peer hangs up
        self.sessions: list[Session] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closed: list[threading.Event] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def hop(self) -> NextHop:
        return NextHop(protocol="lmtp" if self.lmtp else "smtp", host="127.0.0.1", port=self.port)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            session = Session()
            self.sessions.append(session)
            closed = threading.Event()
            self._closed.append(closed)
            thread = threading.Thread(
                target=self._serve, args=(connection, session, closed), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wait_closed(self, index: int) -> None:
        """Until the peer's side of connection ``index`` is closed."""
        assert self._closed[index].wait(10)

    def _serve(self, connection: socket.socket, session: Session, closed: threading.Event) -> None:
        try:
            self._converse(connection, session)
        except ConnectionResetError:
            pass  # a client that hung up with replies unread
        finally:
            connection.close()
            closed.set()

    def _converse(self, connection: socket.socket, session: Session) -> None:
        connection.sendall(b"220 peer.test ready\r\n")
        pending = b""
        data: bytes | None = None  # the data so far, while in it
        recipients = 0
        mail = False  # a MAIL taken: RCPTs may follow
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                return
            if data is None:
                session.reads.append(chunk)
            pending += chunk
            replies: list[bytes] = []
            while pending:
                if data is not None:
                    data += pending
                    pending = b""
                    end = (b"\r\n" + data).find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    # The data's own end, the rest commands again.
                    message, pending = data[: end + 3], data[end + 3 :]
                    session.messages.append(message)
                    data = None
                    answers = recipients if self.lmtp else 1
                    if recipients == 0:
                        replies.append(b"554 5.5.1 no valid recipients")
                    else:
                        replies += [b"250 2.0.0 stored"] * answers
                    mail = False
                    if self.close_after_messages == len(session.messages):
                        connection.sendall(b"".join(r + b"\r\n" for r in replies))
                        return
                    continue
                line, newline, rest = pending.partition(b"\r\n")
                if not newline:
                    break
                pending = rest
                verb = line[:4].upper()
                if verb in (b"EHLO", b"LHLO"):
                    keywords = [b"peer.test", *(e.encode() for e in self.extensions)]
                    replies.append(
                        b"\r\n".join(
                            b"250" + (b" " if i == len(keywords) - 1 else b"-") + k
                            for i, k in enumerate(keywords)
                        )
                    )
                elif verb == b"MAIL":
                    recipients = 0
                    mail = self.mail_reply.startswith(b"250")
                    replies.append(self.mail_reply)
                elif verb == b"RCPT":
                    address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    if address == self.going_down_at:
                        replies.append(b"421 4.3.2 going down")
                        connection.sendall(b"".join(r + b"\r\n" for r in replies))
                        return
                    if not mail:
                        replies.append(b"503 5.5.1 MAIL first")
                    elif address in self.refuse:
                        replies.append(b"550 5.1.1 no such user")
                    else:
                        recipients += 1
                        replies.append(b"250 2.1.5 ok")
                elif verb == b"DATA":
                    if recipients or self.data_always:
                        replies.append(b"354 go on")
                        data = b""
                    else:
                        replies.append(b"554 5.5.1 no valid recipients")
                elif verb == b"RSET":
                    mail = False
                    replies.append(self.rset_reply or b"250 2.0.0 ok")
                    if self.rset_reply is not None and self.rset_reply.startswith(b"421"):
                        connection.sendall(b"".join(r + b"\r\n" for r in replies))
                        return
                elif verb == b"QUIT":
                    connection.sendall(b"".join(r + b"\r\n" for r in [*replies, b"221 bye"]))
                    return
                else:
                    replies.append(b"500 5.5.1 what")
            if replies:
                connection.sendall(b"".join(r + b"\r\n" for r in replies))

    def close(self) -> None:
        # Wakes the accept() the other thread is blocked in; close() alone
        # would leave that thread blocked for the rest of the test run.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for made_peer in made:
        made_peer.close()


def send(
    connections: nexthop.Connections,
    peer: Peer,
    recipients: Sequence[str],
    message: bytes = MESSAGE,
    **options: object,
) -> list[str]:
    outcomes = connections.send(
        peer.hop,
        hostname="mx.test",
        sender="sender@example.net",
        recipients=recipients,
        message=BytesIO(message),
        timeout=30,
        **options,  # type: ignore[arg-type]
    )
    return [str(o) for o in outcomes]


def hello(peer: Peer) -> bytes:
    # smtplib says its hellos in lower case.
    return b"lhlo mx.test\r\n" if peer.lmtp else b"ehlo mx.test\r\n"


@pytest.mark.parametrize("lmtp", [True, False])
def test_mail_rcpts_and_data_go_in_one_write(peers: list[Peer], lmtp: bool) -> None:
    peer = Peer(lmtp=lmtp)
    peers.append(peer)
    connections = nexthop.Connections(idle=0, reuse=1)
    outcomes = send(connections, peer, ["a@relay.test", "b@relay.test"])
    stored = "250 2.0.0 stored"
    assert outcomes == [stored, stored]
    [session] = peer.sessions
    assert session.reads == [
        hello(peer),
        b"MAIL FROM:<sender@example.net>\r\n"
        b"RCPT TO:<a@relay.test>\r\n"
        b"RCPT TO:<b@relay.test>\r\n"
        b"DATA\r\n",
        b"quit\r\n",
    ]
    assert session.messages == [STUFFED]


def test_a_kept_connection_sends_its_rset_with_the_transaction(peers: list[Peer]) -> None:
    peer = Peer(lmtp=True)
    peers.append(peer)
    connections = nexthop.Connections(idle=60, reuse=100)
    assert send(connections, peer, ["a@relay.test"]) == ["250 2.0.0 stored"]
    assert send(connections, peer, ["b@relay.test"], b"second\r\n") == ["250 2.0.0 stored"]
    connections.close()
    [session] = peer.sessions
    assert session.reads == [
        hello(peer),
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<a@relay.test>\r\nDATA\r\n",
        b"RSET\r\nMAIL FROM:<sender@example.net>\r\nRCPT TO:<b@relay.test>\r\nDATA\r\n",
        b"quit\r\n",
    ]
    assert session.messages == [STUFFED, b"second\r\n.\r\n"]
    assert connections.opened == 1


@pytest.mark.parametrize("rset_reply", [None, b"421 4.3.2 going down"])
def test_a_kept_connection_found_dead_sends_the_message_once_on_a_new_one(
    peers: list[Peer], rset_reply: bytes | None
) -> None:
    """Closed by the peer while idle (or closing at the RSET): nothing of
    the message went, so it goes once more, on a new connection."""
    peer = Peer(close_after_messages=1 if rset_reply is None else None, rset_reply=rset_reply)
    peers.append(peer)
    connections = nexthop.Connections(idle=60, reuse=100)
    assert send(connections, peer, ["a@relay.test"]) == ["250 2.0.0 stored"]
    if rset_reply is None:
        peer.wait_closed(0)
    assert send(connections, peer, ["b@relay.test"], b"second\r\n") == ["250 2.0.0 stored"]
    connections.close()
    first, second = peer.sessions
    assert first.messages == [STUFFED]
    assert second.messages == [b"second\r\n.\r\n"]
    assert (
        second.reads[1] == b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<b@relay.test>\r\nDATA\r\n"
    )
    assert connections.opened == 2


@pytest.mark.parametrize("lmtp", [True, False])
def test_a_354_after_every_rcpt_was_refused_gets_an_empty_message(
    peers: list[Peer], lmtp: bool
) -> None:
    peer = Peer(lmtp=lmtp, refuse=["a@relay.test", "b@relay.test"], data_always=True)
    peers.append(peer)
    connections = nexthop.Connections(idle=60, reuse=100)
    refused = "550 5.1.1 no such user"
    assert send(connections, peer, ["a@relay.test", "b@relay.test"]) == [refused, refused]
    # The session goes on in step: the next message over it (SMTP), or over
    # a new one (an LMTP peer owes no reply to an empty message).
    assert send(connections, peer, ["c@relay.test"]) == ["250 2.0.0 stored"]
    connections.close()
    assert connections.opened == (2 if lmtp else 1)
    assert peer.sessions[0].messages[0] == b".\r\n"
    assert peer.sessions[-1].messages[-1] == STUFFED


def test_a_peer_without_pipelining_gets_each_command_alone(peers: list[Peer]) -> None:
    peer = Peer(extensions=("8BITMIME",))
    peers.append(peer)
    connections = nexthop.Connections(idle=60, reuse=100)
    assert send(connections, peer, ["a@relay.test", "b@relay.test"]) == ["250 2.0.0 stored"] * 2
    assert send(connections, peer, ["c@relay.test"]) == ["250 2.0.0 stored"]
    connections.close()
    [session] = peer.sessions
    assert session.reads == [
        hello(peer),
        b"MAIL FROM:<sender@example.net>\r\n",
        b"RCPT TO:<a@relay.test>\r\n",
        b"RCPT TO:<b@relay.test>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<sender@example.net>\r\n",
        b"RCPT TO:<c@relay.test>\r\n",
        b"DATA\r\n",
        b"quit\r\n",
    ]
    assert session.messages == [STUFFED, STUFFED]


def test_a_refused_mail_decides_every_recipient(peers: list[Peer]) -> None:
    peer = Peer(mail_reply=b"452 4.3.1 out of storage")
    peers.append(peer)
    connections = nexthop.Connections(idle=60, reuse=100)
    outcomes = send(connections, peer, ["a@relay.test", "b@relay.test"])
    assert outcomes == ["452 4.3.1 out of storage"] * 2
    assert peer.sessions[0].messages == []
    assert connections.idle() == 1  # the peer is in step still


def test_some_recipients_refused_the_rest_get_the_message(peers: list[Peer]) -> None:
    peer = Peer(lmtp=True, refuse=["b@relay.test"])
    peers.append(peer)
    connections = nexthop.Connections(idle=0, reuse=1)
    outcomes = send(connections, peer, ["a@relay.test", "b@relay.test", "c@relay.test"])
    assert outcomes == ["250 2.0.0 stored", "550 5.1.1 no such user", "250 2.0.0 stored"]
    assert peer.sessions[0].messages == [STUFFED]


def test_a_421_in_the_group_decides_every_recipient_and_ends_the_connection(
    peers: list[Peer],
) -> None:
    peer = Peer(lmtp=True, going_down_at="b@relay.test")
    peers.append(peer)
    connections = nexthop.Connections(idle=60, reuse=100)
    outcomes = send(connections, peer, ["a@relay.test", "b@relay.test", "c@relay.test"])
    assert outcomes == ["421 4.3.2 going down"] * 3
    assert peer.sessions[0].messages == []
    assert connections.idle() == 0


class PipeliningHandler(Handler):
    """aiosmtpd (a server that reads commands in order from its stream,
    however they were batched) offering PIPELINING."""

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook names
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


@pytest.mark.parametrize("lmtp", [True, False])
def test_pipelined_to_aiosmtpd(lmtp: bool) -> None:
    """Over STARTTLS for SMTP; LMTP in plaintext (aiosmtpd would have STARTTLS before LHLO)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("peer.test").configure_cert(context)
    handler = PipeliningHandler(
        lmtp=lmtp, rcpt=lambda r: "550 5.1.1 unknown" if r.startswith("x") else None
    )
    connections = nexthop.Connections(idle=60, reuse=100)
    with peer(handler, tls=None if lmtp else context, require_tls=not lmtp) as (_, port):
        hop = NextHop(protocol="lmtp" if lmtp else "smtp", host="127.0.0.1", port=port)
        for n in range(3):
            outcomes = connections.send(
                hop,
                hostname="mx.test",
                sender="sender@example.net",
                recipients=[f"a{n}@relay.test", "x@relay.test", f"b{n}@relay.test"],
                message=BytesIO(MESSAGE),
                timeout=30,
            )
            assert [str(o) for o in outcomes] == [
                "250 2.0.0 OK",
                "550 5.1.1 unknown",
                "250 2.0.0 OK",
            ]
        connections.close()
    assert connections.opened == 1
    assert [(m.recipients, m.tls, m.content) for m in handler.messages] == [
        ([f"a{n}@relay.test", f"b{n}@relay.test"], not lmtp, MESSAGE) for n in range(3)
    ]


def test_dsn_and_utf8_parameters_go_in_the_group(peers: list[Peer]) -> None:
    peer = Peer(extensions=("PIPELINING", "DSN", "SMTPUTF8", "8BITMIME"))
    peers.append(peer)
    connections = nexthop.Connections(idle=0, reuse=1)
    outcomes = connections.send(
        peer.hop,
        hostname="mx.test",
        sender="sénder@example.net",
        recipients=["a@relay.test"],
        message=BytesIO(MESSAGE),
        smtputf8=True,
        body="8BITMIME",
        ret="HDRS",
        envid="id+1",
        notify=["SUCCESS,FAILURE"],
        orcpt=["rfc822;a@relay.test"],
    )
    assert outcomes == [Outcome(250, "2.0.0 stored", from_peer=True, hop_dsn=True)]
    assert (
        peer.sessions[0].reads[1]
        == (
            "MAIL FROM:<sénder@example.net> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=id+2B1\r\n"
            "RCPT TO:<a@relay.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@relay.test\r\n"
            "DATA\r\n"
        ).encode()
    )


# -- dot-stuffing ------------------------------------------------------------------


def line_by_line(message: bytes) -> bytes:
    """RFC 5321 4.5.2 one line at a time: the reference the chunked way must equal."""
    out = bytearray()
    for line in BytesIO(message):
        if line.startswith(b"."):
            out += b"."
        out += line.removesuffix(b"\n").removesuffix(b"\r") + b"\r\n"
    return bytes(out)


class ShortReads(BytesIO):
    """A file whose reads give at most the next of ``sizes`` octets, as a
    pipe or a database's stream may."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        super().__init__(data)
        self.sizes = sizes

    def read(self, size: int | None = -1, /) -> bytes:
        if self.sizes:
            size = min(size if size is not None and size >= 0 else 1 << 30, self.sizes.pop(0))
        return super().read(size)


# Lines made of the octets that matter (CR, LF, ".") and some that do not.
_MESSAGES = (
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\xff"])).map(b"".join)
    | st.binary()
)


@given(message=_MESSAGES, chunk=st.integers(1, 40))
def test_dot_stuffing_in_chunks_equals_line_by_line(message: bytes, chunk: int) -> None:
    assert b"".join(dot_stuffed(BytesIO(message), chunk)) == line_by_line(message)


@given(message=_MESSAGES, sizes=st.lists(st.integers(1, 12)))
def test_dot_stuffing_equals_line_by_line_whatever_the_reads(
    message: bytes, sizes: list[int]
) -> None:
    assert b"".join(dot_stuffed(ShortReads(message, sizes), 16)) == line_by_line(message)


# Messages as this version queues them: every line end a CRLF; a CR may
# stand alone within a line, and the last line may lack its end.
_LINE = st.lists(st.sampled_from([b"\r", b".", b"a", b"\x00", b"\xff"])).map(
    b"".join
) | st.binary().map(lambda line: line.replace(b"\n", b""))


@given(lines=st.lists(_LINE), last=_LINE, chunk=st.integers(1, 40))
def test_dot_stuffing_of_a_message_queued_with_crlf_line_ends(
    lines: list[bytes], last: bytes, chunk: int
) -> None:
    message = b"".join(line + b"\r\n" for line in lines) + last
    stuffed = b"".join(dot_stuffed(BytesIO(message), chunk, crlf=True))
    assert stuffed == line_by_line(message)


def test_line_ends_an_envelope_says_are_crlf_are_not_looked_at() -> None:
    # What the flag spares: an LF it wrongly vouched for would go out as it is.
    message = b"a\nb\r\n.c\r\n"
    assert b"".join(dot_stuffed(BytesIO(message), crlf=True)) == b"a\nb\r\n..c\r\n"
    assert b"".join(dot_stuffed(BytesIO(message))) == b"a\r\nb\r\n..c\r\n"


def test_dot_stuffing_a_long_line_keeps_chunks_bounded() -> None:
    message = b"." + b"x" * 1000 + b"\r"
    chunks = list(dot_stuffed(BytesIO(message), 64))
    assert b"".join(chunks) == line_by_line(message)
    assert max(len(c) for c in chunks) <= 65
