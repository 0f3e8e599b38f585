"""The server side of one SMTP session, as a sans-IO state machine.

Theory of operation
-------------------
The shell feeds received octets to :meth:`ServerConnection.receive_data`
(``b""`` for end of file) and pulls events with :meth:`next_event` until it
returns :data:`NEED_DATA`; then it writes :meth:`data_to_send` and reads
more.  Writing only when the input is drained batches the replies to
pipelined commands, as RFC 2920 3.2 asks.

Most commands the core answers by itself: syntax, sequence and limits are
all decided here, once, for every shell.  Commands whose answer is a
matter of policy or storage (EHLO/HELO, MAIL, RCPT, DATA/BDAT, end of
data) become *decision* events; :meth:`next_event` then returns
:data:`PAUSED` until the application answers with :meth:`send`, and the
answer's code (positive or not) moves the state on.

The core reads no clock.  :attr:`timer` tells the shell how long it may
wait for input; the shell calls :meth:`time_out` when that runs out.
:attr:`delay` tells it how long to hold the replies back (the tarpit, the
greeting's pause); it takes them with :meth:`data_to_send` only when it
writes them, and goes on passing input in meanwhile.  So the core knows
what the client sent before it could have read a reply, and judges it:
talking before the greeting, or past a command that ends a pipelined group
(RFC 2920 3.1), ends the session (:class:`~.events.OutOfTurn`).

States::

    GREETING --send(220)--> COMMAND <--> DECIDING (a decision event is out)
        |                     |  ^
        |                     |  +-- DATA / BDAT (content, then DECIDING)
        |                     +----- TLS (handshake by the shell)
        +--send(5xx)--> REFUSED (503 to all but QUIT)
    any --QUIT, 421, EOF, time_out()--> CLOSED
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from . import dsnparams, grammar, replies
from .content import REASONS, ContentChecker, DotReader
from .events import (
    CloseReason,
    ConnectionClosed,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageComplete,
    MessageData,
    OutOfTurn,
    RcptTo,
    Refused,
    Reset,
    StartData,
    StartTLS,
)
from .grammar import GrammarError
from .limits import Limits
from .replies import Reply


class Signal(enum.Enum):
    """What :meth:`ServerConnection.next_event` returns when it has no event."""

    NEED_DATA = "need data"  # no event until more input arrives
    PAUSED = "paused"  # a decision awaits send(), or TLS its handshake


NEED_DATA = Signal.NEED_DATA
PAUSED = Signal.PAUSED


class State(enum.Enum):
    GREETING = "greeting"
    REFUSED = "refused"
    COMMAND = "command"
    DECIDING = "deciding"
    DATA = "data"
    BDAT = "bdat"
    TLS = "tls"
    CLOSED = "closed"


# The states by module names, as NEED_DATA and PAUSED: on Python 3.11 each
# State.X goes through EnumType.__getattr__ (type's slot_tp_getattr_hook),
# about 100 ns where a global takes 10, and the core looks at its state
# some 150 times a session (Python 3.12 dropped the hook).
GREETING: Final = State.GREETING
REFUSED: Final = State.REFUSED
COMMAND: Final = State.COMMAND
DECIDING: Final = State.DECIDING
DATA: Final = State.DATA
BDAT: Final = State.BDAT
TLS: Final = State.TLS
CLOSED: Final = State.CLOSED


@dataclass(frozen=True, slots=True)
class Timer:
    """How long the shell may wait for input.

    ``generation`` changes each time a new wait starts; the shell restarts
    its clock then and keeps it running while the generation is the same,
    so a client that trickles one octet at a time still meets the limit.
    """

    generation: int
    seconds: float


_EHLO_KEYWORDS_BEFORE_TLS = ("STARTTLS",)

# RFC 2920 3.1: "EHLO, DATA, VRFY, EXPN, TURN, QUIT, and NOOP" can only be
# the last command in a group.  Those whose answer changes what the client
# may send next are enforced: EHLO (and HELO) say whether it may pipeline at
# all, DATA whether what follows is a message.  QUIT ends the session anyway.
_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA"})
# Octets of what a client sent out of turn that the event keeps, for the log.
_OUT_OF_TURN_KEPT = 64


_T = TypeVar("_T")

# RFC 3461 4: "The maximum length of a MAIL FROM command line is increased
# by 110 characters by the possible addition of the RET and ENVID
# keywords.  The maximum length of a RCPT TO command line is increased by
# 500 characters by the possible addition of the NOTIFY and ORCPT keywords."
DSN_LINE_EXTRA = {"MAIL": 110, "RCPT": 500}


def _dsn_value(parse: Callable[[str | None], _T], value: str | None) -> _T:
    """A DSN parameter's meaning; a malformed one is 501 5.5.4 (RFC 3461 4: a
    value that is not as the grammar says is a syntax error in parameters)."""
    try:
        return parse(value)
    except ValueError as exc:
        raise GrammarError(
            replies.BAD_PARAMETER_VALUE.with_text(f"Invalid parameter: {exc}")
        ) from exc


@functools.lru_cache(maxsize=1024)  # a client says the same EHLO each time it comes
def _ehlo_reply(text: str, keywords: tuple[str, ...]) -> Reply:
    # RFC 2034 3: no enhanced codes on the EHLO response itself.
    return Reply(code=250, enhanced="", text="\n".join((text, *keywords)))


class ServerConnection:
    """One SMTP session, server side (RFC 5321 with the ESMTP extensions)."""

    def __init__(
        self,
        *,
        hostname: str,
        limits: Limits | None = None,
        tls_available: bool = False,
    ) -> None:
        self.hostname = hostname
        self.limits = limits or Limits()
        self.tls_available = tls_available
        self.tls_active = False
        self.state = GREETING
        self.helo: str | None = None
        self.esmtp = False
        self.mail: MailFrom | None = None
        self.recipients = 0
        self.errors = 0
        self.replies_sent = [0] * 6  # by class: [2] for 2xx, ... (metrics, at the session's end)
        self._delay = 0.0  # seconds owed before data_to_send() goes out
        self._buffer = bytearray()
        self._eof = False
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._pending: Event | None = None  # the decision event awaiting send()
        self._discarding_line = False  # inside a command line over the limit
        self._clean_close = False
        self._command = ""  # the verb of the command last read, for Refused
        self._close_reason: CloseReason = "lost"
        self._shutting_down = False
        # Content of the open message (DATA or BDAT).
        self._checker: ContentChecker | None = None
        self._dot_reader: DotReader | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None  # reply owed after a discarded chunk
        self._timer_generation = 0
        # "greeting", or the command whose reply is made but not yet handed
        # to the shell, and which the client must read before it sends more.
        self._turn: str | None = None

    # ------------------------------------------------------------------
    # The shell's side

    def receive_data(self, data: bytes) -> None:
        """Octets from the client; ``b""`` means end of file."""
        if not data:
            self._eof = True
        elif not self._eof and self.state not in (CLOSED, TLS):
            # In TLS state any plaintext is an injection attempt: dropped.
            self._buffer += data
            if self._turn is not None and self.state in (COMMAND, DATA):
                self._refuse_out_of_turn(self._turn, data)

    def next_event(self) -> Event | Signal:
        """The next event, or :data:`NEED_DATA` / :data:`PAUSED`."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is CLOSED:
                return ConnectionClosed(clean=self._clean_close, reason=self._close_reason)
            if self.state in (GREETING, DECIDING, TLS):
                return PAUSED
            progressed = self._step()
            if not progressed:
                if self._eof:
                    self._close("lost")
                    continue
                return NEED_DATA

    def data_to_send(self) -> bytes:
        """Replies produced so far, to be written to the client.

        Read :attr:`delay` first: the shell holds these octets back that long.
        """
        out = b"".join(self._out)
        self._out.clear()
        self._delay = 0.0
        self._turn = None
        return out

    @property
    def delay(self) -> float:
        """Seconds the shell waits before it takes :meth:`data_to_send` and writes it.

        The tarpit, or the greeting's pause.  Input that arrives meanwhile
        goes to :meth:`receive_data` as always: it came before the replies.
        """
        return self._delay

    @property
    def pending_input(self) -> int:
        """Octets received and not yet consumed (for a shell's flow control)."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    @property
    def timer(self) -> Timer | None:
        """The current wait for input, or None while no input is awaited."""
        if self.state in (COMMAND, REFUSED):
            return Timer(self._timer_generation, self.limits.command_timeout)
        if self.state in (DATA, BDAT):
            return Timer(self._timer_generation, self.limits.data_timeout)
        return None

    def time_out(self) -> None:
        """The shell's wait ran out: 421 and close (RFC 5321 4.5.3.2)."""
        if self.state is not CLOSED:
            self._write(replies.TIMEOUT)
            self._close("timeout")

    def shut_down(self) -> None:
        """The server is stopping: 421 and close (RFC 5321 3.8).

        A decision under way (a message being committed, a greeting that
        waits for the filters) is answered first, so a client never gets
        421 for a message that was queued.
        """
        if self.state in (GREETING, DECIDING, TLS):
            self._shutting_down = True
        elif self.state is not CLOSED:
            self._write(replies.SHUTTING_DOWN)
            self._close("shutdown")

    def tls_established(self) -> None:
        """The STARTTLS handshake succeeded: back to the start, no greeting.

        RFC 3207 4.2: "the server MUST discard any knowledge obtained from
        the client, such as the argument to the EHLO command".
        """
        self._expect(TLS)
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self._reset_transaction()
        self._enter(COMMAND)
        if self._shutting_down:
            self.shut_down()

    def tls_failed(self) -> None:
        """The handshake failed: nothing more can be said on this channel."""
        self._expect(TLS)
        self._close("tls-failed")

    # ------------------------------------------------------------------
    # The application's side

    def send(self, reply: Reply) -> None:
        """Answer the greeting, or the decision event last returned."""
        if self.state is GREETING:
            self._greet(reply)
            if self._shutting_down:
                self.shut_down()
            return
        if self.state is not DECIDING or self._pending is None:
            raise RuntimeError(f"no decision is awaited in state {self.state.value}")
        pending, self._pending = self._pending, None
        self._enter(COMMAND)
        match pending:
            case Hello():
                self._answer_hello(pending, reply)
            case MailFrom():
                if reply.is_positive:
                    self.mail = pending
                self._reply(reply)
            case RcptTo():
                if reply.is_positive:
                    self.recipients += 1
                self._reply(reply)
            case StartData():
                self._answer_start_data(pending, reply)
            case MessageComplete():
                self._reset_transaction()
                self._reply(reply)
            case _:  # pragma: no cover - only decision events are pending
                raise AssertionError(pending)
        if reply.code == 421 and not self.closed:
            # RFC 5321 4.2.2: 421 is "closing transmission channel"; the
            # application's (a milter's SHUTDOWN, say) ends it as ours do.
            self._close("refused")
        elif self._shutting_down:
            self.shut_down()

    # ------------------------------------------------------------------
    # Internals

    @property
    def _message_open(self) -> bool:
        """StartData was answered positively: content goes to the application."""
        return self._checker is not None

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"expected state {state.value}, in {self.state.value}")

    def _greet(self, reply: Reply) -> None:
        self._write(reply)
        if reply.code == 220:
            self._turn = "greeting"
            self._delay = self.limits.greet_pause
            self._enter(COMMAND)
        elif reply.code == 554:
            # RFC 5321 3.1: after a 554 greeting the server waits for QUIT
            # and answers 503 to anything else.
            self._enter(REFUSED)
        else:
            self._close("refused")

    def _enter(self, state: State) -> None:
        if state in (COMMAND, DATA, BDAT, REFUSED):
            self._timer_generation += 1
        self.state = state

    def _write(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())
        self.replies_sent[reply.code // 100] += 1

    def _reply(self, reply: Reply) -> None:
        """A reply to a command; hard errors count toward ``limits.errors``."""
        self._write(reply)
        if reply.code >= 500:
            self.errors += 1
            if self.errors >= self.limits.errors:
                self._events.append(
                    Refused(command=self._command, reply=replies.TOO_MANY_ERRORS, reason="errors")
                )
                self._write(replies.TOO_MANY_ERRORS)
                self._close("errors")
            elif self.errors > self.limits.errors_before_delay:
                self._delay += self.limits.error_delay

    def _decide(self, event: Event) -> None:
        self._pending = event
        self._events.append(event)
        self.state = DECIDING

    def _close(self, reason: CloseReason) -> None:
        """An open message is lost: ConnectionClosed tells the application."""
        if self.state is REFUSED and reason in ("quit", "lost"):
            reason = "refused"  # greeted with 554: however it ends, it was refused
        self._close_reason = reason
        self._reset_transaction()
        self.state = CLOSED
        self._buffer.clear()

    def _reset_transaction(self) -> None:
        self.mail = None
        self.recipients = 0
        self._checker = None
        self._dot_reader = None
        self._bdat_refusal = None

    def _step(self) -> bool:
        """Consume some input; False when more is needed."""
        if self.state is DATA:
            return self._step_data()
        if self.state is BDAT:
            return self._step_bdat()
        return self._step_command()

    # -- commands ------------------------------------------------------

    def _read_line(self) -> bytes | None:
        newline = self._buffer.find(b"\n")
        if newline < 0:
            if len(self._buffer) > self.limits.command_line + DSN_LINE_EXTRA["RCPT"]:
                # Keep nothing of a line that is already too long; its end
                # will be answered with 500 (RFC 5321 4.5.3.1.10).
                self._discarding_line = True
                self._buffer.clear()
            return None
        line = bytes(self._buffer[: newline + 1])
        del self._buffer[: newline + 1]
        return line

    def _line_limit(self, line: bytes) -> int:
        """The longest command line allowed for ``line``'s verb, CRLF included."""
        verb = line[:4].upper().decode("ascii", "replace")
        return self.limits.command_line + DSN_LINE_EXTRA.get(verb, 0)

    def _step_command(self) -> bool:
        line = self._read_line()
        if line is None:
            return False
        self._timer_generation += 1  # a new command: a new wait starts after it
        self._command = "?"  # until the line is read as a command
        if self._discarding_line or len(line) > self._line_limit(line):
            self._discarding_line = False
            self._reply(replies.LINE_TOO_LONG)
            return True
        # find, not "in": for bytes, "in" first tries its operand as an
        # integer (a byte's value), and raises and drops a TypeError for
        # every bytes operand (CPython's _Py_bytes_contains).
        if not line.endswith(b"\r\n") or line.find(b"\r", 0, -2) >= 0:
            self._reply(replies.BARE_LINE_END_IN_COMMAND)
            return True
        if line.find(b"\0") >= 0:
            self._reply(replies.NUL_IN_COMMAND)
            return True
        try:
            text = line[:-2].decode("utf-8")
        except UnicodeDecodeError:
            self._reply(replies.SYNTAX_ERROR.with_text("Command is not valid UTF-8"))
            return True
        command = grammar.split_command(text)
        self._command = command.verb if command.verb.isascii() else "?"
        if self.state is REFUSED:
            if command.verb == "QUIT":
                self._quit()
            else:
                self._reply(replies.REFUSED_SEND_QUIT)
            return True
        if self._ends_group(command.verb):
            if self._buffer:
                self._refuse_out_of_turn(command.verb, bytes(self._buffer))
                return True
            self._turn = command.verb
        try:
            self._dispatch(command)
        except GrammarError as exc:
            self._reply(exc.reply)
        return True

    def _ends_group(self, verb: str) -> bool:
        """Whether the client must wait for the reply to ``verb`` before it sends more."""
        if not self.limits.forbid_unauth_pipelining or verb in ("QUIT", "BDAT"):
            # BDAT's chunk follows it, and more may follow the chunk (RFC 3030 4.2).
            return False
        # RFC 2920 3.2: a client pipelines only once the server has offered
        # PIPELINING, in its reply to EHLO.
        return not self.esmtp or verb in _LAST_IN_GROUP

    def _refuse_out_of_turn(self, command: str, received: bytes) -> None:
        kept = received[:_OUT_OF_TURN_KEPT]
        if command == "greeting":
            # The greeting has not gone out: the refusal takes its place.
            self._out.clear()
            event = OutOfTurn(
                reason="pregreet", command=command, received=kept, reply=replies.PREGREET
            )
        else:
            event = OutOfTurn(
                reason="pipelining", command=command, received=kept, reply=replies.OUT_OF_TURN
            )
        self._write(event.reply)
        self._events.append(event)
        self._close("refused")

    def _dispatch(self, command: grammar.Command) -> None:
        verb, argument = command.verb, command.argument
        match verb:
            case "EHLO" | "HELO":
                self._decide(Hello(kind=verb, name=grammar.parse_helo(argument)))
            case "MAIL":
                self._mail(argument)
            case "RCPT":
                self._rcpt(argument)
            case "DATA":
                self._data(argument)
            case "BDAT":
                self._bdat(argument)
            case "RSET":
                self._no_argument(argument)
                self._reset_transaction()
                self._events.append(Reset())
                self._reply(replies.RESET_OK)
            case "NOOP":
                self._reply(replies.NOOP_OK)
            case "QUIT":
                self._no_argument(argument)
                self._quit()
            case "VRFY":
                if not argument:
                    raise GrammarError(replies.SYNTAX_ERROR.with_text("Syntax: VRFY address"))
                self._reply(replies.CANNOT_VRFY)
            case "EXPN":
                self._reply(replies.EXPN_DISABLED)
            case "HELP":
                self._reply(replies.HELP)
            case "STARTTLS":
                self._starttls(argument)
            case _:
                self._reply(replies.UNRECOGNIZED)

    @staticmethod
    def _no_argument(argument: str) -> None:
        if argument:
            raise GrammarError(replies.NO_ARGUMENTS_ALLOWED)

    def _quit(self) -> None:
        self._write(replies.CLOSING.with_fixed_text(f"{self.hostname} closing connection"))
        self._clean_close = True
        self._close("quit")

    def _answer_hello(self, hello: Hello, reply: Reply) -> None:
        if not reply.is_positive:
            self._reply(reply)
            return
        # RFC 5321 4.1.4: EHLO/HELO in a session also resets its state.
        self._reset_transaction()
        self._events.append(Reset())
        self.helo = hello.name
        self.esmtp = hello.kind == "EHLO"
        if not self.esmtp:
            self._write(reply)
            return
        self._write(_ehlo_reply(reply.text, tuple(self.extensions())))

    def extensions(self) -> list[str]:
        """The EHLO keywords this session offers now."""
        size = self.limits.message_size
        keywords = [
            "PIPELINING",
            f"SIZE {size}" if size else "SIZE",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
            "CHUNKING",
        ]
        if self.tls_available and not self.tls_active:
            keywords.extend(_EHLO_KEYWORDS_BEFORE_TLS)
        return keywords

    def _mail(self, argument: str) -> None:
        if self.helo is None:
            raise GrammarError(replies.SEND_HELLO_FIRST)
        if self.mail is not None:
            raise GrammarError(replies.NESTED_MAIL)
        parsed = grammar.parse_mail(argument)
        size: int | None = None
        body: Literal["7BIT", "8BITMIME"] | None = None
        smtputf8 = False
        ret: dsnparams.Ret | None = None
        envid: str | None = None
        for keyword, value in parsed.params.items():
            match keyword:
                case "SIZE":
                    # RFC 1870 6: size-value ::= 1*20DIGIT
                    if value is None or not value.isdigit() or len(value) > 20:
                        raise GrammarError(replies.BAD_PARAMETER_VALUE)
                    size = int(value)
                case "BODY":
                    # RFC 6152; BINARYMIME (RFC 3030) is not offered.
                    if value is not None and value.upper() == "7BIT":
                        body = "7BIT"
                    elif value is not None and value.upper() == "8BITMIME":
                        body = "8BITMIME"
                    else:
                        raise GrammarError(replies.BAD_PARAMETER_VALUE)
                case "SMTPUTF8":
                    if value is not None:
                        raise GrammarError(replies.BAD_PARAMETER_VALUE)
                    smtputf8 = True
                case "RET":
                    ret = _dsn_value(dsnparams.parse_ret, value)
                case "ENVID":
                    envid = _dsn_value(dsnparams.parse_envid, value)
                case _:
                    raise GrammarError(replies.UNKNOWN_PARAMETER)
        if not smtputf8 and not argument.isascii():
            raise GrammarError(replies.UTF8_NEEDS_SMTPUTF8)
        limit = self.limits.message_size
        if size is not None and limit and size > limit:
            address = parsed.sender.address
            self._events.append(
                Refused(
                    command="MAIL", reply=replies.MESSAGE_TOO_BIG, reason="too-big", sender=address
                )
            )
            raise GrammarError(replies.MESSAGE_TOO_BIG)
        self._decide(
            MailFrom(
                sender=parsed.sender,
                size=size,
                body=body,
                smtputf8=smtputf8,
                ret=ret,
                envid=envid,
            )
        )

    def _rcpt(self, argument: str) -> None:
        if self.mail is None:
            raise GrammarError(replies.NEED_MAIL)
        if self._message_open:
            # The envelope went to the queue with the first chunk: a recipient
            # accepted now would be answered 250 and never delivered.
            raise GrammarError(replies.RCPT_AFTER_BDAT)
        parsed = grammar.parse_rcpt(argument)
        notify: tuple[str, ...] | None = None
        orcpt: str | None = None
        for keyword, value in parsed.params.items():
            match keyword:
                case "NOTIFY":
                    notify = _dsn_value(dsnparams.parse_notify, value)
                case "ORCPT":
                    orcpt = _dsn_value(dsnparams.parse_orcpt, value)
                case _:
                    raise GrammarError(replies.UNKNOWN_PARAMETER)
        if not self.mail.smtputf8 and not argument.isascii():
            raise GrammarError(replies.UTF8_NEEDS_SMTPUTF8)
        if self.recipients >= self.limits.recipients:
            # RFC 5321 4.5.3.1.10: 452, and the client sends the rest later.
            self._write(replies.TOO_MANY_RECIPIENTS)
            return
        self._decide(RcptTo(recipient=parsed.recipient, notify=notify, orcpt=orcpt))

    def _transaction_problem(self) -> Reply | None:
        if self.helo is None:
            return replies.SEND_HELLO_FIRST
        if self.mail is None:
            return replies.NEED_MAIL
        if self.recipients == 0:
            # RFC 5321 3.3: "no valid recipients", as after a refused RCPT.
            return replies.NO_VALID_RECIPIENTS
        return None

    def _data(self, argument: str) -> None:
        self._no_argument(argument)
        if self._message_open:
            raise GrammarError(replies.DATA_AFTER_BDAT)
        problem = self._transaction_problem()
        if problem is not None:
            raise GrammarError(problem)
        self._decide(StartData(chunking=False))

    def _answer_start_data(self, start: StartData, reply: Reply) -> None:
        if not reply.is_positive:
            self._reset_transaction()
            if start.chunking:
                # The chunk still has to be read and thrown away (RFC 3030 2).
                self._bdat_refusal = reply
                self._enter(BDAT)
            else:
                self._reply(reply)
            return
        self._checker = ContentChecker(self.limits)
        if start.chunking:
            self._enter(BDAT)
        else:
            self._write(reply)
            self._dot_reader = DotReader(self.limits)
            self._enter(DATA)

    def _step_data(self) -> bool:
        assert self._dot_reader is not None and self._checker is not None
        before = len(self._buffer)
        block, ended = self._dot_reader.read(self._buffer)
        if block:
            self._checker.feed(block)
            if self._checker.problem is None:
                self._events.append(MessageData(data=block))
        if ended:
            self._end_of_message()
            return True
        return len(self._buffer) != before

    def _end_of_message(self) -> None:
        assert self._checker is not None
        self._checker.finish()
        problem = self._checker.problem
        if problem is None:
            self._decide(MessageComplete(size=self._checker.size))
            return
        self._enter(COMMAND)
        self._events.append(MessageAborted(reply=problem, reason=REASONS[problem]))
        self._reset_transaction()
        self._reply(problem)

    def _bdat(self, argument: str) -> None:
        try:
            chunk = grammar.parse_bdat(argument)
        except GrammarError:
            # Without a size the chunk's end cannot be found, and its octets
            # would be read as commands: close rather than guess.
            self._write(replies.BDAT_SYNTAX)
            self._write(replies.SERVICE_UNAVAILABLE)
            self._close("protocol")
            return
        self._bdat_remaining = chunk.size
        self._bdat_last = chunk.last
        if self._message_open:
            self._enter(BDAT)
            return
        problem = self._transaction_problem()
        if problem is not None:
            self._bdat_refusal = problem
            self._enter(BDAT)
            return
        self._decide(StartData(chunking=True))

    def _step_bdat(self) -> bool:
        if self._bdat_remaining:
            if not self._buffer:
                return False
            take = min(self._bdat_remaining, len(self._buffer))
            block = bytes(self._buffer[:take])
            del self._buffer[:take]
            self._bdat_remaining -= take
            if self._message_open:
                assert self._checker is not None
                self._checker.feed(block)
                if self._checker.problem is None:
                    self._events.append(MessageData(data=block))
            if self._bdat_remaining:
                return True
        # The chunk is complete.
        self._enter(COMMAND)
        if self._bdat_refusal is not None:
            refusal, self._bdat_refusal = self._bdat_refusal, None
            self._reply(refusal)
        elif self._bdat_last:
            self._end_of_message()
        else:
            assert self._checker is not None
            if self._checker.problem is replies.MESSAGE_TOO_BIG:
                # Too big already: say so now rather than read chunks for nothing.
                self._end_of_message()
            else:
                self._write(replies.OK.with_text(f"{self._checker.size} octets received"))
        return True

    def _starttls(self, argument: str) -> None:
        self._no_argument(argument)
        if self.tls_active:
            raise GrammarError(replies.TLS_ALREADY_ACTIVE)
        if not self.tls_available:
            raise GrammarError(replies.NOT_IMPLEMENTED)
        if self.helo is None:
            raise GrammarError(replies.SEND_HELLO_FIRST)
        self._write(replies.READY_FOR_TLS)
        # RFC 3207 4.2 and CVE-2011-0411: octets pipelined after STARTTLS
        # arrived in plaintext and must not be taken as commands after the
        # handshake.
        self._buffer.clear()
        self._reset_transaction()
        self.state = TLS
        self._events.append(StartTLS())
