"""Every reply the server can send, in one catalogue.

A reply is a basic code (RFC 5321 4.2), an enhanced status code (RFC 3463,
registry of RFC 5248) and text.  Nothing else in the package writes reply
strings inline: callers pick a constant here, or build one with
:meth:`Reply.with_text` where the text carries a value (a host name, a size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    code: int
    enhanced: str  # "" for the greeting and replies that RFC 2034 exempts
    text: str
    # The octets on the wire, made once: most replies are constants sent
    # again and again.
    _wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Reply text is ours, but a UTF-8 host name may appear in it (RFC 6531).
        text = "\r\n".join(self.lines()) if "\n" in self.text else self._line(" ", self.text)
        object.__setattr__(self, "_wire", (text + "\r\n").encode())

    @property
    def is_positive(self) -> bool:
        """2xx and 3xx: the command was accepted."""
        return self.code < 400

    def with_text(self, text: str) -> Reply:
        return Reply(code=self.code, enhanced=self.enhanced, text=text)

    def with_fixed_text(self, text: str) -> Reply:
        """:meth:`with_text` for a text that comes again and again (a host name's)."""
        return _with_fixed_text(self, text)

    def lines(self) -> list[str]:
        """The reply as text lines, without line ends.

        RFC 2034 3: every line of a 2xx/4xx/5xx reply carries the enhanced
        code after the basic one.  Like Postfix, the codes are sent to HELO
        clients too: they are harmless text to a client that ignores them.
        """
        texts = self.text.split("\n")
        last = len(texts) - 1
        return [self._line(" " if i == last else "-", t) for i, t in enumerate(texts)]

    def _line(self, separator: str, text: str) -> str:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code}{separator}{prefix}{text}"

    def to_bytes(self) -> bytes:
        return self._wire


@functools.lru_cache(maxsize=1024)
def _with_fixed_text(reply: Reply, text: str) -> Reply:
    return reply.with_text(text)


def _r(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code=code, enhanced=enhanced, text=text)


# Connection (texts with a host name are filled in by the caller).
GREETING = _r(220, "", "Server SMTP ready")
CLOSING = _r(221, "2.0.0", "Bye")
SERVICE_UNAVAILABLE = _r(421, "4.3.2", "Service not available, closing transmission channel")
SHUTTING_DOWN = _r(421, "4.3.2", "Server shutting down, closing transmission channel")
TIMEOUT = _r(421, "4.4.2", "Timeout waiting for input, closing transmission channel")
TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Too many connections from your host, try again later")
TOO_MANY_NETWORK_CONNECTIONS = _r(
    421, "4.7.0", "Too many connections from your network, try again later"
)
CLIENT_CONNECTION_RATE = _r(
    421, "4.7.0", "Too many connections from your host in the last minute, try again later"
)
NETWORK_CONNECTION_RATE = _r(
    421, "4.7.0", "Too many connections from your network in the last minute, try again later"
)
TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing transmission channel")
NO_SERVICE = _r(554, "5.7.1", "No SMTP service here")
# RFC 7504 3: 521 at connection opening says "no mail here" and closes; a
# 554 would oblige the server to wait for QUIT (RFC 5321 3.1).
PREGREET = _r(521, "5.5.1", "Protocol error: talked before the greeting")
OUT_OF_TURN = _r(554, "5.5.0", "SMTP protocol synchronization error")
LOCAL_ERROR = _r(421, "4.3.0", "Local error in processing, closing transmission channel")

# Greetings and simple commands.
HELLO = _r(250, "", "Hello")
OK = _r(250, "2.0.0", "OK")
NOOP_OK = _r(250, "2.0.0", "OK")
RESET_OK = _r(250, "2.0.0", "Reset state")
SENDER_OK = _r(250, "2.1.0", "Sender OK")
RECIPIENT_OK = _r(250, "2.1.5", "Recipient OK")
START_DATA = _r(354, "", "Start mail input; end with <CRLF>.<CRLF>")
QUEUED = _r(250, "2.0.0", "Submitted & queued")
CANNOT_VRFY = _r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = _r(502, "5.5.1", "EXPN not available")
HELP = _r(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS\nSee RFC 5321",
)
READY_FOR_TLS = _r(220, "2.0.0", "Ready to start TLS")

# Syntax (RFC 5321 4.2.2 and 4.5.3.1.4).
UNRECOGNIZED = _r(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = _r(500, "5.5.2", "Line too long")
BARE_LINE_END_IN_COMMAND = _r(500, "5.5.2", "Command lines must end with <CRLF>")
NUL_IN_COMMAND = _r(500, "5.5.2", "NUL character in command")
SYNTAX_ERROR = _r(501, "5.5.2", "Syntax error in parameters or arguments")
HELO_SYNTAX = _r(501, "5.5.2", "Syntax: EHLO hostname")
MAIL_SYNTAX = _r(501, "5.5.2", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = _r(501, "5.5.2", "Syntax: RCPT TO:<address> [parameters]")
BAD_SENDER_ADDRESS = _r(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_ADDRESS = _r(553, "5.1.3", "Bad recipient address syntax")
NO_ARGUMENTS_ALLOWED = _r(501, "5.5.4", "No parameters allowed")
BDAT_SYNTAX = _r(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
UNKNOWN_PARAMETER = _r(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized")
BAD_PARAMETER_VALUE = _r(501, "5.5.4", "Invalid parameter value")
NOT_IMPLEMENTED = _r(502, "5.5.1", "Command not implemented")
UTF8_NEEDS_SMTPUTF8 = _r(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")

# Sequence (RFC 5321 4.3.2).
SEND_HELLO_FIRST = _r(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = _r(503, "5.5.1", "Sender already specified")
NEED_MAIL = _r(503, "5.5.1", "Need MAIL command")
DATA_AFTER_BDAT = _r(503, "5.5.1", "DATA cannot follow BDAT in one transaction")
RCPT_AFTER_BDAT = _r(503, "5.5.1", "RCPT cannot follow BDAT in one transaction")
REFUSED_SEND_QUIT = _r(503, "5.5.1", "Service refused; send QUIT")
NO_VALID_RECIPIENTS = _r(554, "5.5.1", "No valid recipients")
TLS_ALREADY_ACTIVE = _r(503, "5.5.1", "TLS already active")

# Limits (RFC 5321 4.5.3.1, RFC 1870).
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = _r(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_HOPS = _r(554, "5.4.6", "Too many Received headers: mail loop suspected")
BARE_LINE_END_IN_DATA = _r(
    550, "5.6.0", "Message refused: bare CR or LF; lines must end with <CRLF>"
)
NUL_IN_DATA = _r(550, "5.6.0", "Message refused: NUL octets are not allowed")
DATA_LINE_TOO_LONG = _r(
    550, "5.6.0", "Message refused: a line is longer than 1000 octets with its <CRLF>"
)

# Policy (used by the session layer; kept here so all texts live together).
RELAY_DENIED = _r(550, "5.7.1", "Relaying denied")
UNKNOWN_USER = _r(550, "5.1.1", "No such user here")
UNKNOWN_HOST = _r(554, "5.7.1", "Your host is unknown to us")
CANNOT_RESOLVE = _r(421, "4.4.3", "Cannot resolve your address, try again later")
QUEUE_FAILED = _r(451, "4.3.0", "Local error in processing: message not queued")
QUEUE_FULL = _r(452, "4.3.1", "Insufficient system storage")
