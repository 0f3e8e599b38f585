"""Events the protocol core hands to the application.

Frozen, slotted, keyword-only dataclasses, as in h11.  Events marked
"decision" pause the connection until the application answers with
:meth:`ServerConnection.send`; the others need no answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .replies import Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class Path:
    """A mailbox from MAIL or RCPT: ``local@domain``.

    ``domain`` is "" for the null reverse path and for ``postmaster``
    without a domain (RFC 5321 4.1.1.3).  Address literals keep their
    brackets: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``.
    """

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Decision: EHLO or HELO.  A positive answer starts a new session state.

    For EHLO the core builds the 250 reply with the extension list itself;
    the application answers with :data:`replies.HELLO` (its text becomes the
    first line) or a refusal.
    """

    kind: Literal["EHLO", "HELO"]
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MailFrom:
    """Decision: a syntactically valid MAIL command."""

    sender: Path
    size: int | None = None
    body: Literal["7BIT", "8BITMIME"] | None = None
    smtputf8: bool = False
    # DSN (RFC 3461 4.3, 4.4): what a failure notice returns, and the
    # sender's id for the transaction (xtext decoded).  None: not given.
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptTo:
    """Decision: a syntactically valid RCPT command."""

    recipient: Path
    # DSN (RFC 3461 4.1, 4.2): ("NEVER",) or the conditions asked, in the
    # order SUCCESS, FAILURE, DELAY; the original recipient as
    # "addr-type;address" (xtext decoded).  None: not given.
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartData:
    """Decision: DATA, or the first BDAT chunk, of a valid transaction.

    A positive answer (354 for DATA; any 2xx/3xx for BDAT) opens the
    message; content then arrives as :class:`MessageData` events.
    """

    chunking: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageData:
    """Message content, dot-unstuffed, in order.  CRLF line ends are kept."""

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageComplete:
    """Decision: the whole message arrived intact; answer 250 once it is safe."""

    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageAborted:
    """The open message is refused; the core has already queued ``reply``.

    The application drops what it stored of the message.  An open message
    is dropped likewise on :class:`Reset`, :class:`StartTLS` and
    :class:`ConnectionClosed`.  ``reason`` is a word for the log.
    """

    reply: Reply
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """The core refused a command by itself, for a reason worth a log line.

    A message too big already at MAIL (``SIZE=``), and the 421 for too many
    errors; the core has already queued ``reply``.  ``sender`` is the MAIL
    command's, when it was one.  Syntax errors are not reported: they are
    the client's to fix, not the administrator's to watch.
    """

    command: str
    reply: Reply
    reason: str
    sender: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset:
    """RSET, or a new EHLO/HELO: the transaction is gone."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTLS:
    """The core replied 220 to STARTTLS and discarded buffered input.

    The shell performs the handshake, then calls
    :meth:`ServerConnection.tls_established` (or ``tls_failed``).
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class OutOfTurn:
    """The client sent before a reply it had to wait for; the session ends.

    ``reason`` is ``"pregreet"`` (before the greeting) or ``"pipelining"``
    (after ``command``, whose reply must come first: RFC 2920 3.1).  The
    core has already queued ``reply``; ``received`` is the start of what the
    client sent out of turn.
    """

    reason: Literal["pregreet", "pipelining"]
    command: str
    received: bytes
    reply: Reply


CloseReason = Literal[
    "quit",  # the client said QUIT
    "lost",  # the client went away (end of file) without QUIT
    "timeout",  # the client was silent too long: 421
    "errors",  # too many errors: 421
    "shutdown",  # the server is stopping: 421
    "refused",  # refused at the greeting, or for talking out of turn
    "tls-failed",  # the STARTTLS handshake failed
    "protocol",  # input that cannot be followed (BDAT without a size)
    "local-error",  # the server failed (the shell's 421)
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The session is over: QUIT, a 421, or the client's end of file.

    ``clean`` is true only after QUIT.  An open message is lost.  ``reason``
    says who ended it and why, for the log.
    """

    clean: bool = field(default=False)
    reason: CloseReason = "lost"


Event = (
    Hello
    | MailFrom
    | RcptTo
    | StartData
    | MessageData
    | MessageComplete
    | MessageAborted
    | Refused
    | Reset
    | StartTLS
    | OutOfTurn
    | ConnectionClosed
)
