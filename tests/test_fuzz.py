"""A stateful fuzz harness for the protocol core (hypothesis).

A :class:`~hypothesis.stateful.RuleBasedStateMachine` plays a hostile
client against :class:`ServerConnection` through ``driver.py``: commands
good and bad, pipelined batches, DATA content with every smuggling line
end, BDAT chunks, over-long lines, arbitrary octets, STARTTLS with
plaintext injected during the handshake, time-outs, shutdown and end of
file; every input is cut at random points.  The application's side answers
from a small policy that refuses some hosts, senders, recipients and
messages, so that refusals are explored as much as acceptances.

After every piece of input it checks that

* every reply line is ``ddd[ -]text<CRLF>`` with a code from the catalogue,
  the lines of one reply share its code, and no reply is left half-sent;
* the events and the core's state agree with a model of the transaction:
  no MAIL before a greeting, no RCPT without MAIL, no message opened
  without an accepted recipient, no message content outside an open
  message, no 250 to the end of a message that was not whole and clean
  (a bare CR or LF, or over the size limit), and content equal to what was
  sent;
* every command line gets a reply; the connection closes only after 221,
  421, a failed handshake or end of file;
* the octets held between calls stay under the line limits.

The example count follows the hypothesis profile: small in every run,
large with ``pytest --soak``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from hypothesis import event as record
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from driver import SMUGGLED_ENDS, Run, session
from mmdf_smtp.protocol import (
    ConnectionClosed,
    Event,
    Hello,
    Limits,
    MailFrom,
    MessageAborted,
    MessageComplete,
    MessageData,
    RcptTo,
    Reply,
    Reset,
    StartData,
    StartTLS,
    State,
    replies,
)

# Small limits, so that a short run reaches every one of them.
# The model knows nothing of the door's rules (tests/test_protocol.py and
# tests/test_door.py test them): its batches pipeline anything, and its
# content may hold NULs.
LIMITS = Limits(
    message_size=3000, recipients=3, errors=25, forbid_unauth_pipelining=False, allow_nul=True
)

CATALOGUE = {value.code for value in vars(replies).values() if isinstance(value, Reply)}
REPLY_LINE = re.compile(rb"([2-5][0-9]{2})([ -])([^\r\n]*)\r\n")
ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3} ")

REFUSED_HELLO = replies.Reply(code=550, enhanced="5.7.1", text="Go away")
REFUSED_SENDER = replies.Reply(code=550, enhanced="5.7.1", text="Sender refused")

COMMANDS = [
    b"EHLO client.test\r\n",
    b"HELO client.test\r\n",
    b"EHLO refused.example\r\n",
    b"EHLO\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<refused@example.org>\r\n",
    b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME\r\n",
    b"MAIL FROM:<a@example.org> SIZE=999999\r\n",
    b"MAIL FROM:<\xc3\xa4@example.org> SMTPUTF8\r\n",
    b"MAIL FROM:<\xc3\xa4@example.org>\r\n",
    b"MAIL FROM:a@example.org\r\n",
    b"MAIL FROM:<a@example.org> FOO=BAR\r\n",
    b"RCPT TO:<b@example.net>\r\n",
    b"RCPT TO:<nobody@example.net>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<b@[192.0.2.1]>\r\n",
    b"RCPT TO:<@a.b:c@d.e>\r\n",
    b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n",
    b"DATA\r\n",
    b"DATA x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"NOOP with text\r\n",
    b"VRFY alice\r\n",
    b"VRFY\r\n",
    b"EXPN list\r\n",
    b"HELP\r\n",
    b"STARTTLS\r\n",
    b"STARTTLS now\r\n",
    b"QUIT\r\n",
    b"QUIT now\r\n",
    b"\r\n",
    b"XYZZY\r\n",
    b"NOOP\n",
    b"NO\rOP\r\n",
    b"NOOP\x00\r\n",
    b"NOOP \xff\xfe\r\n",
    b"MA\xc4\xb1L FROM:<a@example.org>\r\n",  # a dotless i: not ASCII, not MAIL
    b"BDAT\r\n",
    b"BDAT x LAST\r\n",
]

# Octets that matter to the readers, to weigh arbitrary input toward them.
TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b".",
    b"\r\n.\r\n",
    b"\r\n..",
    b"\x00",
    b"\xff",
    b"\xc3\xa4",
    b" ",
    b"x",
    b"MAIL FROM:<a@example.org>",
    b"RCPT TO:<b@example.net>",
    b"DATA",
    b"BDAT 4",
    b"BDAT 3 LAST",
    b"Received: x",
]
octets = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=6)

text_line = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def split(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (taken modulo its length)."""
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(marks) if b > a]


def stuff(line: bytes) -> bytes:
    return b"." + line if line.startswith(b".") else line


@dataclass
class Transaction:
    """What the client has been granted, as the answers given say."""

    helo: bool = False
    mail: bool = False
    recipients: int = 0
    open: bool = False
    chunking: bool = False
    content: list[bytes] = field(default_factory=list)
    expected: bytes | None = None  # what the content must be, when the harness knows
    smuggled: bool = False  # a bare CR or LF went into the open message

    def reset(self) -> None:
        self.mail = False
        self.recipients = 0
        self.close_message()

    def close_message(self) -> None:
        self.open = False
        self.chunking = False
        self.content = []
        self.expected = None
        self.smuggled = False


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.connect()

    def connect(self) -> None:
        """A new connection: a fresh core and a fresh model."""
        self.run: Run = session(limits=LIMITS, tls=True)
        self.model = Transaction()
        self.checked = 0  # octets of output already checked
        self.codes: list[int] = []  # every reply's code, in order
        self.starts_granted = 0  # 354s we gave
        self.queued = 0  # 250s we gave to a complete message
        self.queued_replies = 0  # "250 ... queued" lines the core wrote
        self.eof_sent = False
        self.tls_failed = False
        self.closed_event: ConnectionClosed | None = None
        self.refuse_data = False
        self.commit = replies.QUEUED
        self.at_line_start = False  # DATA: the next octet starts a line
        self.exact = False  # the rule under way sends one command and nothing after it
        self.chunk: bytes | None = None  # the BDAT chunk the rule under way sends
        self.check_output()

    # -- the application's side ------------------------------------------

    def answer(self, event: Event) -> Reply | None:
        m = self.model
        assert self.closed_event is None, f"{event} after the connection closed"
        match event:
            case Hello():
                if event.name == "refused.example":
                    return REFUSED_HELLO
                m.helo = True
                return replies.HELLO.with_text("mx.test Hello")
            case Reset():
                m.reset()
            case MailFrom():
                assert m.helo and not m.mail and not m.open, event
                if event.sender.local == "refused":
                    return REFUSED_SENDER
                assert not event.size or event.size <= LIMITS.message_size
                m.mail = True
                return replies.SENDER_OK
            case RcptTo():
                assert m.mail and not m.open and m.recipients < LIMITS.recipients, event
                if event.recipient.local == "nobody":
                    return replies.UNKNOWN_USER
                m.recipients += 1
                return replies.RECIPIENT_OK
            case StartData():
                assert m.helo and m.mail and m.recipients > 0 and not m.open, event
                if self.refuse_data:
                    # The core drops the transaction after a refused DATA/BDAT.
                    m.reset()
                    return replies.QUEUE_FULL
                m.open, m.chunking = True, event.chunking
                if event.chunking:
                    m.expected = b"" if self.chunk is not None else None
                    return replies.OK
                self.starts_granted += 1
                m.expected = b"" if self.exact else None
                self.at_line_start = self.exact
                return replies.START_DATA
            case MessageData():
                assert m.open, "message content outside an open message"
                m.content.append(event.data)
                assert sum(map(len, m.content)) <= LIMITS.message_size
            case MessageComplete():
                assert m.open, "end of a message that was never opened"
                content = b"".join(m.content)
                assert event.size == len(content)
                assert not m.smuggled, "a message with a bare CR or LF was completed"
                if m.expected is not None:
                    assert content == m.expected + (self.chunk or b"")
                reply = self.commit
                record("a message completed" + (" (BDAT)" if m.chunking else " (DATA)"))
                if reply.is_positive:
                    self.queued += 1
                m.reset()
                return reply
            case MessageAborted():
                assert m.open, "an abort outside an open message"
                assert event.reply.code in (550, 552, 554), event
                record(f"a message refused: {event.reply.code}")
                if m.smuggled:
                    assert event.reply in (replies.BARE_LINE_END_IN_DATA, replies.MESSAGE_TOO_BIG)
                m.reset()
            case StartTLS():
                record("STARTTLS")
                assert m.helo, "STARTTLS before EHLO"
                m.reset()
                m.helo = False
            case ConnectionClosed():
                self.closed_event = event
                m.reset()
        return None

    # -- feeding ---------------------------------------------------------

    def feed(self, data: bytes, points: list[int]) -> None:
        for piece in split(data, points):
            if self.closed_event is not None or self.run.conn.state is State.TLS:
                # Plaintext during the handshake is dropped; after a close, ignored.
                self.run.conn.receive_data(piece)
                assert self.run.conn.pending_input == 0
                assert not self.run.conn.data_to_send()
                continue
            self.run.feed(piece, answer=self.answer)
            self.check_output()
            self.check_buffer()

    def check_output(self) -> None:
        out = bytes(self.run.output[self.checked :])
        self.checked = len(self.run.output)
        position = 0
        continued: int | None = None
        for match in REPLY_LINE.finditer(out):
            assert match.start() == position, f"malformed reply: {out[position:]!r}"
            position = match.end()
            code = int(match[1])
            assert code in CATALOGUE, code
            assert continued is None or continued == code, out
            enhanced = ENHANCED.match(match[3].decode())
            if enhanced:
                assert int(enhanced[1]) == code // 100, match[0]
            if match[2] == b"-":
                continued = code
            else:
                continued = None
                assert 221 not in self.codes, f"{code} after 221"
                self.codes.append(code)
                if match[0] == replies.QUEUED.to_bytes():
                    self.queued_replies += 1
        assert position == len(out), f"malformed reply: {out[position:]!r}"
        assert continued is None, "a reply left half-sent"

    def check_buffer(self) -> None:
        conn = self.run.conn
        held = conn.pending_input
        match conn.state:
            case State.COMMAND | State.REFUSED:
                assert held <= LIMITS.command_line + 500  # RCPT's with DSN (RFC 3461 4)
            case State.DATA:
                assert held <= LIMITS.text_line
            case _:
                assert held == 0, conn.state

    def expect_reply_to_one_command(self, data: bytes, points: list[int]) -> None:
        conn = self.run.conn
        awaits_command = conn.state in (State.COMMAND, State.REFUSED) and not conn.pending_input
        before = len(self.codes)
        self.feed(data, points)
        if awaits_command:
            assert len(self.codes) > before, f"no reply to {data!r}"

    def data_input(self) -> None:
        """Input the harness does not follow: it no longer knows the open message's content."""
        if self.model.open:
            self.model.expected = None
        self.at_line_start = False

    # -- rules -----------------------------------------------------------

    @rule(command=st.sampled_from(COMMANDS), points=cuts)
    def command(self, command: bytes, points: list[int]) -> None:
        self.data_input()
        self.exact = True
        self.expect_reply_to_one_command(command, points)
        self.exact = False

    @rule(
        greet=st.booleans(),
        recipients=st.integers(min_value=1, max_value=LIMITS.recipients + 1),
        data=st.booleans(),
        points=cuts,
    )
    def envelope(self, greet: bool, recipients: int, data: bool, points: list[int]) -> None:
        """A whole envelope pipelined (RFC 2920), ending with DATA or not."""
        self.data_input()
        wire = b"EHLO client.test\r\n" if greet else b""
        wire += b"MAIL FROM:<a@example.org>\r\n" + b"RCPT TO:<b@example.net>\r\n" * recipients
        self.exact = True
        self.expect_reply_to_one_command(wire + (b"DATA\r\n" if data else b""), points)
        self.exact = False

    @rule(batch=st.lists(st.sampled_from(COMMANDS), min_size=2, max_size=12), points=cuts)
    def pipeline(self, batch: list[bytes], points: list[int]) -> None:
        self.data_input()
        self.expect_reply_to_one_command(b"".join(batch), points)

    @precondition(lambda self: self.run.conn.state is State.DATA and self.at_line_start)
    @rule(lines=st.lists(text_line, max_size=8), end=st.booleans(), points=cuts)
    def body(self, lines: list[bytes], end: bool, points: list[int]) -> None:
        m = self.model
        wire = b"".join(stuff(line) + b"\r\n" for line in lines)
        if m.expected is not None:
            m.expected += b"".join(line + b"\r\n" for line in lines)
        self.feed(wire + (b".\r\n" if end else b""), points)

    @precondition(lambda self: self.run.conn.state is State.DATA and self.at_line_start)
    @rule(variant=st.sampled_from(SMUGGLED_ENDS), points=cuts)
    def smuggle(self, variant: bytes, points: list[int]) -> None:
        self.model.smuggled = True
        self.model.expected = None
        attack = (
            b"x"
            + variant
            + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nsmuggled\r\n"
        )
        self.feed(attack, points)

    @precondition(
        lambda self: (
            self.closed_event is None
            and self.run.conn.state is State.COMMAND
            and not self.run.conn.pending_input
        )
    )
    @rule(
        chunk=octets,
        last=st.booleans(),
        then=st.one_of(st.just(b""), st.sampled_from(COMMANDS)),
        points=cuts,
    )
    def bdat(self, chunk: bytes, last: bool, then: bytes, points: list[int]) -> None:
        """A BDAT chunk, and maybe a command pipelined after it (RFC 3030 4)."""
        m = self.model
        command = b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"")
        self.chunk = chunk
        self.expect_reply_to_one_command(command + chunk + then, points)
        self.chunk = None
        if m.open and m.expected is not None:
            m.expected += chunk

    @rule(length=st.integers(min_value=400, max_value=5000), end=st.booleans(), points=cuts)
    def long_line(self, length: int, end: bool, points: list[int]) -> None:
        self.data_input()
        self.feed(b"X" * length + (b"\r\n" if end else b""), points)

    @rule(data=octets, points=cuts)
    def garbage(self, data: bytes, points: list[int]) -> None:
        self.data_input()
        self.feed(data, points)

    @precondition(lambda self: self.closed_event is None and self.run.conn.state is not State.TLS)
    @rule(how=st.sampled_from(["end of file", "time-out", "shutdown"]))
    def end(self, how: str) -> None:
        """The client leaves, the shell's timer runs out, or the server stops."""
        conn = self.run.conn
        if how == "end of file":
            self.eof_sent = True
            self.run.eof(answer=self.answer)
        elif how == "time-out":
            conn.time_out()
            self.run.pump(self.answer)
        else:
            conn.shut_down()
            self.run.pump(self.answer)
        self.check_output()
        assert self.closed_event is not None, f"{how} left the connection open"
        if how != "end of file":
            assert self.codes[-1] == 421

    @precondition(lambda self: self.run.conn.state is State.TLS)
    @rule(succeeds=st.booleans(), injected=octets)
    def handshake(self, succeeds: bool, injected: bytes) -> None:
        conn = self.run.conn
        if injected:  # plaintext injected after STARTTLS (CVE-2011-0411); b"" would be EOF
            conn.receive_data(injected)
        assert conn.pending_input == 0
        if succeeds:
            conn.tls_established()
        else:
            self.tls_failed = True
            conn.tls_failed()
        self.run.pump(self.answer)
        self.check_output()

    @precondition(lambda self: self.closed_event is not None)
    @rule()
    def reconnect(self) -> None:
        self.connect()

    @rule(refuse_data=st.booleans(), commit=st.sampled_from([replies.QUEUED, replies.QUEUE_FULL]))
    def change_answers(self, refuse_data: bool, commit: Reply) -> None:
        self.refuse_data = refuse_data
        self.commit = commit

    # -- invariants ------------------------------------------------------

    @invariant()
    def state_matches_the_answers(self) -> None:
        conn, m = self.run.conn, self.model
        assert conn.state is not State.DECIDING, "a decision left unanswered"
        if self.closed_event is not None:
            assert conn.closed
            return
        assert (conn.mail is not None) == m.mail
        assert conn.recipients == m.recipients
        assert (conn.helo is not None) == m.helo or conn.state is State.TLS
        assert conn.errors < LIMITS.errors
        if conn.state is State.DATA:
            assert m.open and not m.chunking

    @invariant()
    def replies_agree_with_the_decisions(self) -> None:
        assert self.codes.count(354) == self.starts_granted
        assert self.queued_replies == self.queued  # 250 only for what we queued
        assert len(self.run.of(StartTLS)) == self.codes.count(220) - 1  # one was the greeting
        assert self.codes.count(221) <= 1

    @invariant()
    def closes_only_after_221_421_eof_or_failed_handshake(self) -> None:
        closed = self.closed_event
        if closed is None:
            return
        if closed.clean:
            assert self.codes[-1] == 221
        elif not (self.eof_sent or self.tls_failed):
            assert self.codes[-1] == 421, self.codes[-5:]


TestSessionMachine = SessionMachine.TestCase
# Three times the profile's example count: the machine is the broadest test of the core.
TestSessionMachine.settings = settings(
    stateful_step_count=40, max_examples=3 * settings().max_examples
)


def test_split_covers_the_input() -> None:
    assert split(b"abcdef", [2, 2, 11, 0]) == [b"ab", b"cd", b"ef"]
    assert split(b"", [3]) == []
