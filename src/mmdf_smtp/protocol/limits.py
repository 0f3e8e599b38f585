"""Per-connection limits, enforced by the protocol core and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    # RFC 5321 4.5.3.1.4: "The maximum total length of a command line
    # including the command word and the <CRLF> is 512 octets."
    command_line: int = 512
    # RFC 5321 4.5.3.1.6: "The maximum total length of a text line including
    # the <CRLF> is 1000 octets (not counting the leading dot duplicated for
    # transparency)."
    text_line: int = 1000
    # RFC 1870: advertised with SIZE; 0 means no limit is advertised.
    message_size: int = 36_700_160
    # RFC 5321 4.5.3.1.8: at least 100 recipients must be buffered.
    recipients: int = 100
    # RFC 5321 4.5.3.2.7: at least 5 minutes waiting for the next command.
    command_timeout: float = 300.0
    # RFC 5321 4.5.3.2.6 gives 10 minutes for the DATA termination; here the
    # budget covers a whole DATA transfer or one BDAT chunk.
    data_timeout: float = 600.0
    # Protocol errors (5xx to commands) before the session is closed with 421.
    errors: int = 10
    # The tarpit, as Postfix's smtpd_soft_error_limit and error_sleep_time:
    # past this many errors each error reply is held back ``error_delay``
    # seconds, which costs a dictionary attack its speed and a real client
    # almost nothing.
    errors_before_delay: int = 3
    error_delay: float = 1.0
    # RFC 5321 6.3: a loop is suspected past this many Received headers.
    received_headers: int = 100
    # The greeting is held back this long (Postfix postscreen's greet wait,
    # sendmail's greet_pause): a client that talks before it is a bot that
    # does not wait for replies, and is refused (RFC 5321 3.1: the client
    # waits for the greeting).  0: the greeting goes out at once.
    greet_pause: float = 0.0
    # Postfix 3.9's smtpd_forbid_unauth_pipelining: a client that sends more
    # before a reply it must wait for (any reply before PIPELINING was
    # offered; EHLO, HELO and DATA's even after, RFC 2920 3.1) is refused
    # and the session ends.
    forbid_unauth_pipelining: bool = True
    # NUL octets in message content are refused unless allowed: a next hop
    # that strips them would read a different message than the one checked
    # here, the same gap SMTP smuggling uses.
    allow_nul: bool = False
