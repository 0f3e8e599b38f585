"""One ``[[milters]]`` table: where the milter listens and what to do when it fails.

``MilterConfig.from_table`` takes the TOML table as a dict::

    [[milters]]
    socket = "inet:127.0.0.1:8891"   # inet:host:port, inet6:[addr]:port, unix:/path;
                                     # also Sendmail's inet:port@host, as in opendkim.conf
    default_action = "tempfail"      # tempfail | reject | accept
    connect_timeout = 30             # seconds; Postfix's milter_connect_timeout
    command_timeout = 30             # each SMTP-stage answer; milter_command_timeout
    content_timeout = 300            # headers, body, end of message; milter_content_timeout
    reuse = false                    # true: keep the connection for the next SMTP session (QUIT_NC)
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class DefaultAction(enum.Enum):
    """Postfix's ``milter_default_action``: the answer when a milter fails."""

    TEMPFAIL = "tempfail"  # 451 4.7.1 for the rest of the session
    REJECT = "reject"  # 550 5.7.1 for the rest of the session
    ACCEPT = "accept"  # the milter is dropped for the rest of the session


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketAddress:
    """A parsed milter socket: ``host`` and ``port`` for TCP, ``path`` for unix."""

    kind: str  # "inet", "inet6" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


def parse_socket(text: str) -> SocketAddress:
    """``inet:host:port``, ``inet6:host:port`` (host bracketed or not), ``unix:/path``.

    Postfix's ``local:/path`` is a unix socket.  Sendmail's and the milters'
    own ``inet:port@host`` is accepted too, so a line copied from
    opendkim.conf or opendmarc.conf works unchanged.
    """
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"milter socket {text!r}: expected inet:host:port or unix:/path")
    if kind in ("unix", "local"):
        return SocketAddress(kind="unix", path=rest)
    if kind not in ("inet", "inet6"):
        raise ValueError(f"milter socket {text!r}: unknown transport {kind!r}")
    if "@" in rest:
        port_text, _, host = rest.partition("@")
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ValueError(f"milter socket {text!r}: no port")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"milter socket {text!r}: no host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"milter socket {text!r}: port {port_text!r} is not 1 to 65535")
    if kind == "inet6":
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"milter socket {text!r}: {host!r} is not an IPv6 address") from None
    return SocketAddress(kind=kind, host=host, port=int(port_text))


def _seconds(table: Mapping[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"milter {key} = {value!r}: expected a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"milter {key} = {value!r}: must be more than 0 seconds")
    return float(value)


def _flag(table: Mapping[str, Any], key: str, *, default: bool = False) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"milter {key} = {value!r}: must be true or false")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class MilterConfig:
    """A milter the SMTP server talks to, and its failure policy and timeouts."""

    socket: str
    default_action: DefaultAction = DefaultAction.TEMPFAIL
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    # Also filter mail from submit and the maildrop (Postfix's non_smtpd_milters).
    submit: bool = False
    # End a session with SMFIC_QUIT_NC rather than QUIT where the protocol
    # allows it (version 6, out of a transaction; see
    # MilterProtocol.reusable), and give the connection to the next
    # session: no connect, no OPTNEG, and for libmilter's milters no thread
    # started, a session.
    reuse: bool = False

    @property
    def address(self) -> SocketAddress:
        return parse_socket(self.socket)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> MilterConfig:
        """Check one ``[[milters]]`` table; a bad value raises ValueError naming it."""
        known = {
            "socket",
            "default_action",
            "connect_timeout",
            "command_timeout",
            "content_timeout",
            "submit",
            "reuse",
        }
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"milter: unknown key(s) {', '.join(unknown)}")
        socket = table.get("socket")
        if not isinstance(socket, str):
            raise ValueError(f"milter socket = {socket!r}: expected a string like inet:host:port")
        parse_socket(socket)
        action = table.get("default_action", "tempfail")
        try:
            default_action = DefaultAction(action)
        except ValueError:
            choices = ", ".join(a.value for a in DefaultAction)
            raise ValueError(f"milter default_action = {action!r}: expected {choices}") from None
        return cls(
            socket=socket,
            default_action=default_action,
            connect_timeout=_seconds(table, "connect_timeout", 30.0),
            command_timeout=_seconds(table, "command_timeout", 30.0),
            content_timeout=_seconds(table, "content_timeout", 300.0),
            submit=_flag(table, "submit"),
            reuse=_flag(table, "reuse", default=False),
        )
