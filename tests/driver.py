"""Drive the sans-IO core in tests: feed octets, answer decisions, collect replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mmdf_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Event,
    Hello,
    Limits,
    MailFrom,
    MessageComplete,
    MessageData,
    RcptTo,
    Reply,
    ServerConnection,
    StartData,
    StartTLS,
    replies,
)

Answer = Callable[[Event], Reply | None]


def accept_all(event: Event) -> Reply | None:
    match event:
        case Hello():
            return replies.HELLO.with_text("mx.test Hello")
        case MailFrom():
            return replies.SENDER_OK
        case RcptTo():
            return replies.RECIPIENT_OK
        case StartData():
            return replies.OK if event.chunking else replies.START_DATA
        case MessageComplete():
            return replies.QUEUED
    return None


@dataclass
class Run:
    conn: ServerConnection
    output: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)

    @property
    def replies(self) -> list[str]:
        """Each reply's last line (the one with a space after the code)."""
        return [
            line
            for line in self.output.decode("utf-8", "replace").split("\r\n")
            if len(line) > 3 and line[3] == " "
        ]

    @property
    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.replies]

    @property
    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, MessageData))

    def of(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]

    def feed(self, data: bytes, *, answer: Answer = accept_all, step: int | None = None) -> Run:
        pieces: Iterable[bytes] = (
            [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
        )
        for piece in pieces:
            self.conn.receive_data(piece)
            self.pump(answer)
        return self

    def eof(self, answer: Answer = accept_all) -> Run:
        self.conn.receive_data(b"")
        self.pump(answer)
        return self

    def pump(self, answer: Answer = accept_all) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                raise AssertionError("decision left unanswered")
            self.events.append(event)
            reply = answer(event)
            if reply is not None:
                self.conn.send(reply)
            if isinstance(event, StartTLS):
                break
            if isinstance(event, ConnectionClosed):
                break
        self.output += self.conn.data_to_send()


# The byte tables feed whole scripts at once, as no client may before the
# replies: they test everything but the pipelining rule, which its own
# tests switch on.
SCRIPTED = Limits(forbid_unauth_pipelining=False)


def session(
    *, limits: Limits | None = None, tls: bool = False, greeting: Reply | None = None
) -> Run:
    conn = ServerConnection(hostname="mx.test", limits=limits or SCRIPTED, tls_available=tls)
    conn.send(greeting or replies.GREETING.with_text("mx.test ready"))
    run = Run(conn)
    run.output += conn.data_to_send()
    return run


def transcript(
    data: bytes, *, step: int | None = None, limits: Limits | None = None, tls: bool = False
) -> Run:
    return session(limits=limits, tls=tls).feed(data, step=step)


EHLO = b"EHLO client.test\r\n"
ENVELOPE = EHLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"

# Each ends DATA for some parser (SEC Consult 2023 and follow-ups); here none
# does, and the message holding it is refused when the real end arrives.
SMUGGLED_ENDS = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\n\r.\r\n",
    b"\r\n.\n\r\n",
    b"\r\n.\r\r\n",
    b"\n.\n\r\n.\r",
]
