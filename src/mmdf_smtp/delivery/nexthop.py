"""Handing a message to the next hop over SMTP (RFC 5321) or LMTP (RFC 2033).

One transaction per message carries all its remote recipients, over a
connection kept for the next message when it is idle for at most
``connection_cache_time`` and has carried fewer than
``connection_reuse_limit`` (:class:`Connections`); the
answer is one reply per recipient: the RCPT refusal for those refused,
else the reply to the end of data (LMTP gives one per accepted
recipient, SMTP one for all).  TLS follows ``[deliver] tls``, with the
names and meanings of Postfix's ``smtp_tls_security_level`` (:class:`Security`):
by default STARTTLS is used whenever the peer offers it, opportunistically
(the certificate is not checked; a peer that offers no STARTTLS gets the
message in plaintext); "encrypt" and "verify" defer the recipients rather
than send in plaintext; an ``smtps:`` hop speaks TLS from the first octet
(RFC 8314 3.3).  With ``[deliver] auth_user`` the session authenticates
(RFC 4954) with PLAIN (RFC 4616) or LOGIN, over TLS only.  To a peer that
offers PIPELINING the RSET of a kept connection, MAIL, the RCPTs and
DATA go in one write (RFC 2920); smtplib connects, greets, says EHLO and
AUTH and reads the replies.
The message is streamed from the spool, dot-stuffed on the way (RFC 5321
4.5.2) a chunk at a time.  To a next hop that offers DSN
the sender's RET and ENVID go on MAIL, each recipient's NOTIFY and ORCPT
on its RCPT (RFC 3461 6.1), and the outcomes say so: that hop reports
successes itself, where one without DSN leaves a "relayed" to us.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import BinaryIO

from ..config import Config, NextHop, key_error
from ..protocol.dsnparams import encode_xtext

log = logging.getLogger("mmdf_smtp.deliver")

# RFC 5321 4.5.3.2 asks for minutes per command (10 for the end of data):
# one bound for every read keeps it simple and still ends a dead peer.
TIMEOUT = 600.0
# Connecting is not a command: a next hop that does not take the
# connection within this long is down (Postfix's smtp_connect_timeout).
CONNECT_TIMEOUT = 30.0
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """A reply that decides a recipient's fate: the peer's, or one we made up."""

    code: int
    text: str  # with the enhanced status code first when there is one
    from_peer: bool = False  # the next hop said it; else we did
    # No session fit for mail with the next hop: not connected, not greeted,
    # or not with the TLS or AUTH that [deliver] requires.  Every message
    # would meet the same: the hop is left alone a while (and a smarthost
    # is not sent a wrong password once a message, which locks accounts).
    unreachable: bool = False
    hop_dsn: bool = False  # the next hop offered DSN and was handed the recipient's NOTIFY

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class Security:
    """What a session with the next hop must have: TLS at ``level`` (one of
    config.TLS_LEVELS, the one in force), and AUTH as ``user`` when set.
    Kept connections are kept under it: one made under another policy is
    never used for it."""

    level: str = "may"
    required_by: str = "tls"  # what asks for level: "tls", "auth_user" or "smtps"
    name: str | None = None  # the name "verify" checks; None: the next hop's host
    ca_file: Path | None = None  # the CAs "verify" trusts; None: the system's
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    # "verify"'s, made once: loading the trusted CAs is the costly part.
    verifying: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def requires_tls(self) -> bool:
        return self.level in ("encrypt", "verify")

    def requirement(self) -> str:
        """What requires TLS, as the administrator wrote it."""
        if self.required_by == "auth_user":
            return "[deliver] auth_user"
        if self.required_by == "smtps":
            return "the smtps: next hop"
        return f'[deliver] tls = "{self.level}"'

    def context(self) -> ssl.SSLContext:
        if self.level == "verify":
            assert self.verifying is not None
            return self.verifying
        return _unverified()


# The default: Postfix's smtp_tls_security_level's, no AUTH.
OPPORTUNISTIC = Security()


def security_of(config: Config) -> Security:
    """The next hop's :class:`Security` from ``[deliver]``: the password
    file read and the trusted CAs loaded now (deliver does it before it
    gives up root, and again on reload).  Raises ConfigError naming the key."""
    deliver = config.deliver
    password = None
    if deliver.auth_password_file is not None:
        password = _read_password(config, deliver.auth_password_file)
    verifying = None
    if deliver.tls_level == "verify":
        ca_file = deliver.tls_ca_file
        try:
            verifying = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            key = "deliver.tls_ca_file" if ca_file else "deliver.tls"
            raise key_error(config, key, f"{ca_file}: cannot load the CAs: {reason}") from exc
    return Security(
        level=deliver.tls_level,
        required_by=deliver.tls_required_by,
        name=deliver.tls_name,
        ca_file=deliver.tls_ca_file,
        user=deliver.auth_user,
        password=password,
        verifying=verifying,
    )


def _read_password(config: Config, path: Path) -> str:
    """The one line of ``auth_password_file``, without its line end."""
    key = "deliver.auth_password_file"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise key_error(config, key, f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise key_error(config, key, f"{path}: not UTF-8: {exc.reason}") from exc
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or "\n" in password or "\r" in password:
        raise key_error(config, key, f"{path}: must hold the password alone, on one line")
    return password


@cache
def _unverified() -> ssl.SSLContext:
    """The context of "may" and "encrypt": encryption, no check of the peer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def suspended(failure: Outcome) -> Outcome:
    """What recipients are told while a next hop that was ``failure`` is left alone."""
    why = failure.text.split(" ", 1)[-1]  # the failure's text without its status code
    return Outcome(451, f"4.4.1 delivery temporarily suspended: {why}")


def host_of(hop: NextHop) -> str | None:
    """The next hop's host for a DSN's Remote-MTA; None for a Unix socket."""
    return hop.host if hop.port else None


def describe(hop: NextHop) -> str:
    where = hop.host if hop.port == 0 else f"[{hop.host}]:{hop.port}"
    return f"{hop.protocol}:{where}"


def send(
    hop: NextHop,
    *,
    hostname: str,
    sender: str,
    recipients: Sequence[str],
    message: BinaryIO,
    smtputf8: bool = False,
    body: str | None = None,
    crlf: bool = False,
    timeout: float = TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    ret: str | None = None,
    envid: str | None = None,
    notify: Sequence[str | None] = (),
    orcpt: Sequence[str | None] = (),
    security: Security = OPPORTUNISTIC,
) -> list[Outcome]:
    """Send ``message`` to ``recipients`` over a connection of its own; one
    outcome per recipient, in order.  See :meth:`Connections.send`."""
    return Connections(idle=0, reuse=1).send(
        hop,
        hostname=hostname,
        sender=sender,
        recipients=recipients,
        message=message,
        smtputf8=smtputf8,
        body=body,
        crlf=crlf,
        timeout=timeout,
        connect_timeout=connect_timeout,
        ret=ret,
        envid=envid,
        notify=notify,
        orcpt=orcpt,
        security=security,
    )


@dataclass(slots=True)
class _Kept:
    client: smtplib.SMTP
    idle_since: float  # time.monotonic()
    messages: int  # sent over it so far


class Connections:
    """Connections to next hops kept for the next message, as Postfix's
    connection cache (scache(8)) keeps them: one idle for up to ``idle``
    seconds is used again, after an RSET that proves it alive (RFC 5321
    4.1.1.5: a new transaction on a clean slate); one that carried
    ``reuse`` messages, or erred, or got a 421, is closed.  Safe to share
    between threads: a connection is used by one at a time.
    """

    def __init__(self, *, idle: float = 2.0, reuse: int = 100) -> None:
        self._idle = idle
        self._reuse = reuse
        self._lock = threading.Lock()
        self._kept: dict[tuple[NextHop, Security], list[_Kept]] = {}
        self.opened = 0  # connections opened, for the curious (and the tests)

    def send(
        self,
        hop: NextHop,
        *,
        hostname: str,
        sender: str,
        recipients: Sequence[str],
        message: BinaryIO,
        smtputf8: bool = False,
        body: str | None = None,
        crlf: bool = False,
        timeout: float = TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        ret: str | None = None,
        envid: str | None = None,
        notify: Sequence[str | None] = (),
        orcpt: Sequence[str | None] = (),
        security: Security = OPPORTUNISTIC,
    ) -> list[Outcome]:
        """Send ``message`` to ``recipients``; one outcome per recipient, in order.

        Never raises for the peer's or the network's faults: they become
        temporary outcomes for every recipient not yet answered.  Under
        ``security`` "may", a peer whose TLS handshake fails gets the message
        again in plaintext, as with Postfix's opportunistic TLS: encryption
        nobody checks is not worth holding mail for.  Where TLS is required
        (or AUTH fails) the recipients are deferred instead: the relay's
        fault or the administrator's, never the recipients'.
        """
        start = message.tell()
        transaction = partial(
            _transaction,
            hop=hop,
            sender=sender,
            recipients=recipients,
            message=message,
            smtputf8=smtputf8,
            body=body,
            crlf=crlf,
            dsn=_DsnParameters(ret, envid, notify, orcpt),
        )
        key = (hop, security)
        kept = self._take(key)
        if kept is not None:
            outcomes = self._use(key, kept, transaction, len(recipients), reset=True)
            if outcomes is not None:
                return outcomes
            # Found dead by its RSET, before any of the message went: once
            # more on a new connection.
            message.seek(start)
        # Only opportunistic TLS tries again without: a policy that requires
        # it takes a failed handshake as the hop's answer.
        for tls in (True, False) if security.level == "may" else (security.level != "none",):
            message.seek(start)
            try:
                client = _connect(
                    hop,
                    hostname=hostname,
                    timeout=timeout,
                    connect_timeout=connect_timeout,
                    tls=tls,
                    security=security,
                )
            except _HandshakeFailed as exc:
                log.warning(
                    "%s: TLS handshake failed (%s); sending in plaintext", describe(hop), exc
                )
                continue
            except _Refused as exc:
                return [exc.outcome] * len(recipients)
            except (OSError, smtplib.SMTPException) as exc:
                # No greeting, or not a 220: Postfix too defers rather than bounces.
                failure = Outcome(451, f"4.4.1 {describe(hop)}: {_reason(exc)}", unreachable=True)
                return [failure] * len(recipients)
            with self._lock:
                self.opened += 1
            outcomes = self._use(key, _Kept(client, 0.0, 0), transaction, len(recipients))
            assert outcomes is not None  # only a reset finds a connection stale
            return outcomes
        raise AssertionError("unreachable: plaintext raises no handshake failure")

    def _use(
        self,
        key: tuple[NextHop, Security],
        kept: _Kept,
        transaction: Callable[..., bool],
        count: int,
        *,
        reset: bool = False,
    ) -> list[Outcome] | None:
        """The outcomes of ``transaction`` over ``kept``; with ``reset``
        (a kept connection), None when its RSET found it dead."""
        outcomes: list[Outcome | None] = [None] * count
        try:
            healthy = transaction(kept.client, outcomes=outcomes, reset=reset)
        except _Stale as exc:
            log.debug("%s: kept connection no longer usable: %s", describe(key[0]), exc)
            kept.client.close()
            return None
        except (OSError, smtplib.SMTPException) as exc:
            healthy = False
            failure = Outcome(451, f"4.4.2 {describe(key[0])}: {_reason(exc)}")
            outcomes = [o if o is not None else failure for o in outcomes]
        kept.messages += 1
        # 421: the peer closes the session (RFC 5321 3.8).
        healthy = healthy and not any(o is not None and o.code == 421 for o in outcomes)
        if healthy and kept.messages < self._reuse and self._idle > 0:
            kept.idle_since = time.monotonic()
            with self._lock:
                self._kept.setdefault(key, []).append(kept)
        elif healthy:
            _close(kept.client)
        else:
            # Cut short, perhaps in the middle of the data (the message could
            # not be read on): a QUIT there would be taken for a line of the
            # message, and its reply waited for until the timeout.
            kept.client.close()
        return [o or Outcome(451, "4.4.2 No reply from the next hop") for o in outcomes]

    def _take(self, key: tuple[NextHop, Security]) -> _Kept | None:
        """The connection to the hop under its policy idle the shortest
        while, if one is still fresh."""
        stale: list[_Kept] = []
        found = None
        now = time.monotonic()
        with self._lock:
            idle = self._kept.get(key, [])
            while idle:
                kept = idle.pop()
                if now - kept.idle_since <= self._idle:
                    found = kept
                    break
                stale.append(kept)
        for kept in stale:
            _close(kept.client)
        return found

    def idle(self) -> int:
        """How many connections are kept, idle."""
        with self._lock:
            return sum(len(idle) for idle in self._kept.values())

    def sweep(self) -> None:
        """Close the connections idle for longer than the limit."""
        now = time.monotonic()
        stale: list[_Kept] = []
        with self._lock:
            for idle in self._kept.values():
                stale += [kept for kept in idle if now - kept.idle_since > self._idle]
                idle[:] = [kept for kept in idle if now - kept.idle_since <= self._idle]
        for kept in stale:
            _close(kept.client)

    def close(self) -> None:
        with self._lock:
            kept = [k for idle in self._kept.values() for k in idle]
            self._kept.clear()
        for k in kept:
            _close(k.client)


class _HandshakeFailed(Exception):
    """Opportunistic TLS failed: the session is to be had again in plaintext."""


@dataclass(frozen=True, slots=True)
class _DsnParameters:
    """RET and ENVID (decoded) for MAIL; NOTIFY and ORCPT (as sent) per recipient."""

    ret: str | None
    envid: str | None
    notify: Sequence[str | None]
    orcpt: Sequence[str | None]

    def mail(self) -> str:
        options = f" RET={self.ret}" if self.ret else ""
        if self.envid is not None:
            options += f" ENVID={encode_xtext(self.envid)}"
        return options

    def rcpt(self, i: int) -> str:
        options = ""
        if i < len(self.notify) and self.notify[i]:
            options += f" NOTIFY={self.notify[i]}"
        if i < len(self.orcpt) and self.orcpt[i]:
            options += f" ORCPT={self.orcpt[i]}"
        return options


class _Refused(Exception):
    """No session fit for the message: the next hop would not talk (its
    greeting or EHLO refused), or not as the policy requires (TLS, AUTH).
    ``outcome`` is what the recipients are told."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome


class _SMTPClient(smtplib.SMTP):
    """smtplib's client, whose connecting has a bound of its own, shorter
    than the one every command's reply gets (from the greeting on).  With
    ``implicit_tls`` (a context and the name to check) the TLS handshake
    comes first, within the same bound (RFC 8314 3.3)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        local_hostname: str,
        timeout: float,
        connect_timeout: float,
        implicit_tls: tuple[ssl.SSLContext, str] | None = None,
    ) -> None:
        # Read while the constructor connects.
        self._connect_timeout = connect_timeout
        self._implicit_tls = implicit_tls
        super().__init__(host, port, local_hostname=local_hostname, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # smtplib's hook for how to connect (SMTP_SSL's too), not in its stubs.
        bound = min(timeout, self._connect_timeout)
        sock: socket.socket = super()._get_socket(host, port, bound)  # type: ignore[misc]
        if self._implicit_tls is not None:
            context, name = self._implicit_tls
            try:
                sock = context.wrap_socket(sock, server_hostname=name)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Each command is one write and waits for its reply: Nagle's
            # algorithm would only hold a write back for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class _LMTPClient(_SMTPClient, smtplib.LMTP):
    pass


def _close(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()


def _connect(
    hop: NextHop,
    *,
    hostname: str,
    timeout: float,
    connect_timeout: float,
    tls: bool,
    security: Security,
) -> smtplib.SMTP:
    """A session with the next hop, greeted, EHLO (LHLO) said, TLS and AUTH
    done as ``security`` asks; STARTTLS tried when ``tls`` and offered.
    Raises _Refused, _HandshakeFailed, OSError or SMTPException."""
    kind = _LMTPClient if hop.protocol == "lmtp" else _SMTPClient
    name = security.name or hop.host
    implicit = (security.context(), name) if hop.protocol == "smtps" else None
    try:
        client = kind(
            hop.host,
            hop.port,
            local_hostname=hostname,
            timeout=timeout,
            connect_timeout=connect_timeout,
            implicit_tls=implicit,
        )
    except ssl.SSLError as exc:
        raise _Refused(_tls_failure(hop, security, name, exc)) from exc
    try:
        _hello(client, hop, "EHLO")
        if tls and implicit is None and hop.port != 0:
            _start_tls(client, hop, security, name)
        if security.user is not None:
            _authenticate(client, hop, security)
    except BaseException:
        _close(client)
        raise
    return client


def _hello(client: smtplib.SMTP, hop: NextHop, command: str) -> None:
    """EHLO (LHLO), or HELO where an SMTP peer refuses EHLO; _Refused when
    it will not be greeted."""
    code, text = client.ehlo()
    if code != 250 and hop.protocol != "lmtp" and command == "EHLO":
        code, text = client.helo()
    if code != 250:
        if hop.protocol == "lmtp":
            command = command.replace("EHLO", "LHLO")
        elif command == "EHLO":
            command = "EHLO and HELO"
        raise _Refused(_refused(hop, code, text, command))


def _start_tls(client: smtplib.SMTP, hop: NextHop, security: Security, name: str) -> None:
    """STARTTLS (RFC 3207) when offered, and EHLO again over TLS.  What is
    not to be had raises _HandshakeFailed where TLS is opportunistic
    (after a refused STARTTLS the session simply goes on in plaintext),
    _Refused where it is required."""
    required = security.requires_tls
    if not client.has_extn("starttls"):
        if required:
            why = f"{describe(hop)} does not offer STARTTLS"
            raise _Refused(_policy_failure(f"4.7.4 {_required(security)} and {why}"))
        return
    code, text = client.docmd("STARTTLS")
    if code != 220:
        refusal = _refused(hop, code, text, "STARTTLS").text.split(" ", 1)[1]
        if required:
            raise _Refused(_policy_failure(f"4.7.4 {_required(security)} and {refusal}"))
        log.warning("%s; sending in plaintext", refusal)
        return
    assert client.sock is not None
    try:
        client.sock = security.context().wrap_socket(client.sock, server_hostname=name)
    except ssl.SSLError as exc:
        # Cut in the middle of a handshake: no QUIT can be said on it.
        client.close()
        if required:
            raise _Refused(_tls_failure(hop, security, name, exc)) from exc
        raise _HandshakeFailed(_ssl_reason(exc)) from exc
    # RFC 3207 4.2: what the server said before TLS is forgotten; as
    # smtplib's own starttls does, which would check the connected host's
    # name rather than tls_name.
    client.file = None
    client.helo_resp = client.ehlo_resp = None
    client.esmtp_features = {}
    client.does_esmtp = False
    _hello(client, hop, "EHLO after STARTTLS")


# AUTH mechanisms sent, the first the peer offers: the password is sent as
# it is in both, which TLS protects (RFC 4616 6).
_MECHANISMS = ("PLAIN", "LOGIN")


def _authenticate(client: smtplib.SMTP, hop: NextHop, security: Security) -> None:
    """AUTH (RFC 4954) as ``security.user``; _Refused when the peer offers
    no mechanism deliver speaks or refuses the credentials.  Never over a
    session without TLS: the configuration makes TLS required with AUTH."""
    assert security.user is not None and security.password is not None
    if not isinstance(client.sock, ssl.SSLSocket):
        # The configuration cannot make such a policy; one made otherwise
        # still sends no password in plaintext.
        why = f"{describe(hop)} is not spoken to over TLS"
        raise _Refused(_policy_failure(f"4.7.4 [deliver] auth_user is set and {why}"))
    offered = client.esmtp_features.get("auth", "").upper().split()
    mechanism = next((m for m in _MECHANISMS if m in offered), None)
    if mechanism is None:
        what = f"AUTH {' '.join(offered)}" if offered else "no AUTH"
        raise _Refused(
            _policy_failure(
                f"4.7.4 [deliver] auth_user is set and {describe(hop)} offers {what}"
                f" (deliver speaks {' and '.join(_MECHANISMS)})"
            )
        )
    client.user, client.password = security.user, security.password
    answer = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    try:
        code, text = client.auth(mechanism, answer)
        reply = text.decode("utf-8", "replace")
    except smtplib.SMTPAuthenticationError as exc:
        code, reply = exc.smtp_code, _reason(exc).split(" ", 1)[-1]
    # smtplib takes a 503 for success too; only a 235 is one (RFC 4954 6).
    if code != 235:
        words = " ".join(reply.split())
        status = "4.7.8" if code == 535 else "4.7.0"
        raise _Refused(
            _policy_failure(
                f"{status} {describe(hop)} refused AUTH {mechanism} as"
                f" {security.user} ([deliver] auth_user): {code} {words}"
            )
        )


def _required(security: Security) -> str:
    return f"TLS is required by {security.requirement()}"


def _policy_failure(text: str) -> Outcome:
    """No session as ``[deliver]`` requires (TLS, AUTH): the same for every
    message, so the hop is left alone a while, as an unreachable one."""
    return Outcome(451, text, unreachable=True)


def _tls_failure(hop: NextHop, security: Security, name: str, exc: ssl.SSLError) -> Outcome:
    """A handshake that failed where TLS is required."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"the certificate of {name} did not verify: {_ssl_reason(exc)}"
    else:
        why = f"the TLS handshake with {describe(hop)} failed: {_ssl_reason(exc)}"
    return _policy_failure(f"4.7.5 {_required(security)} and {why}")


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    return str(exc.reason or exc)


def _transaction(
    client: smtplib.SMTP,
    *,
    hop: NextHop,
    sender: str,
    recipients: Sequence[str],
    message: BinaryIO,
    smtputf8: bool,
    body: str | None,
    crlf: bool,
    dsn: _DsnParameters,
    outcomes: list[Outcome | None],
    reset: bool,
) -> bool:
    """One transaction; ``outcomes`` filled in as replies come.  Whether
    the connection may carry another message.  With ``reset`` an RSET goes
    first, and raises _Stale when it finds the connection dead."""

    options = ""
    client.command_encoding = "ascii"
    if smtputf8:
        if not client.has_extn("smtputf8"):
            _all_get(outcomes, Outcome(550, "5.6.7 The next hop does not support SMTPUTF8"))
            return True
        client.command_encoding = "utf-8"
        options += " SMTPUTF8"
    if body == "8BITMIME" and client.has_extn("8bitmime"):
        options += " BODY=8BITMIME"
    offers_dsn = client.has_extn("dsn")
    if offers_dsn:
        options += dsn.mail()
    mail = f"FROM:<{sender}>{options}"
    rcpts = [
        f"TO:<{recipient}>{dsn.rcpt(i) if offers_dsn else ''}"
        for i, recipient in enumerate(recipients)
    ]
    group = _pipelined if client.has_extn("pipelining") else _lockstep
    accepted = group(client, reset=reset, mail=mail, rcpts=rcpts, outcomes=outcomes)
    if accepted is None:
        return False
    if not accepted:
        return True
    assert client.sock is not None
    last = b""
    for chunk in dot_stuffed(message, crlf=crlf):
        if last:
            client.sock.sendall(last)
        last = chunk
    # The end of data in the same write as the last octets: one packet, not two.
    client.sock.sendall(last + b".\r\n")
    if hop.protocol == "lmtp":
        # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
        for i in accepted:
            code, text = client.getreply()
            outcomes[i] = _outcome(code, text, "end of data")
    else:
        code, text = client.getreply()
        _all_get(outcomes, _outcome(code, text, "end of data"))
    if offers_dsn:
        for i in accepted:
            outcome = outcomes[i]
            if outcome is not None:
                outcomes[i] = replace(outcome, hop_dsn=True)
    return True


class _Stale(Exception):
    """A kept connection that did not take its RSET: closed, or 421, or
    worse.  Nothing of the message went over it."""


def _lockstep(
    client: smtplib.SMTP,
    *,
    reset: bool,
    mail: str,
    rcpts: Sequence[str],
    outcomes: list[Outcome | None],
) -> list[int] | None:
    """RSET, MAIL, each RCPT and DATA, each waiting for its reply, to a
    peer that does not offer PIPELINING.  The recipients accepted once DATA
    got its 354, in order; [] when the data is not to be sent."""
    if reset:
        try:
            code, text = client.docmd("RSET")
        except (OSError, smtplib.SMTPException) as exc:
            raise _Stale(_reason(exc)) from exc
        if code != 250:
            raise _Stale(f"{code} {text.decode('utf-8', 'replace')}")
    code, text = client.docmd("MAIL", mail)
    if code != 250:
        _all_get(outcomes, _outcome(code, text, "MAIL"))
        return []
    accepted: list[int] = []
    for i, rcpt in enumerate(rcpts):
        code, text = client.docmd("RCPT", rcpt)
        if code in (250, 251):
            accepted.append(i)
        else:
            outcomes[i] = _outcome(code, text, "RCPT")
    if not accepted:
        return []
    code, text = client.docmd("DATA")
    if code != 354:
        _all_get(outcomes, _outcome(code, text, "DATA"))
        return []
    return accepted


def _pipelined(
    client: smtplib.SMTP,
    *,
    reset: bool,
    mail: str,
    rcpts: Sequence[str],
    outcomes: list[Outcome | None],
) -> list[int] | None:
    """RSET (on a kept connection), MAIL, the RCPTs and DATA in one write,
    their replies read in order: RFC 2920 3.1, "the DATA command ... MUST
    be the last in the group" when the peer offers PIPELINING.  Returns
    as :func:`_lockstep` does; None when the connection is not to carry
    another message."""
    assert client.sock is not None
    commands = [("MAIL", mail), *(("RCPT", rcpt) for rcpt in rcpts), ("DATA", "")]
    if reset:
        commands.insert(0, ("RSET", ""))
    group = b"".join(_command_line(client, verb, argument) for verb, argument in commands)
    try:
        client.sock.sendall(group)
        if reset:
            code, text = client.getreply()
    except (OSError, smtplib.SMTPException) as exc:
        if reset:
            raise _Stale(_reason(exc)) from exc
        raise
    if reset and code != 250:
        raise _Stale(f"{code} {text.decode('utf-8', 'replace')}")

    code, text = client.getreply()
    if code == 421:  # RFC 5321 3.8: the peer closes; no more replies come
        _all_get(outcomes, _outcome(code, text, "MAIL"))
        return None
    mail_refused = None if code == 250 else _outcome(code, text, "MAIL")
    accepted: list[int] = []
    for i in range(len(rcpts)):
        code, text = client.getreply()
        if code == 421:
            _all_get(outcomes, _outcome(code, text, "RCPT"))
            return None
        if mail_refused is not None:
            continue  # the RCPTs of a refused MAIL fail for its reason
        if code in (250, 251):
            accepted.append(i)
        else:
            outcomes[i] = _outcome(code, text, "RCPT")
    code, text = client.getreply()
    if code == 421:
        _all_get(outcomes, _outcome(code, text, "DATA"))
        return None
    if mail_refused is not None:
        _all_get(outcomes, mail_refused)
    if code != 354:
        if accepted and mail_refused is None:
            _all_get(outcomes, _outcome(code, text, "DATA"))
        return []
    if accepted and mail_refused is None:
        return accepted
    # A 354 with no recipient (RFC 2920 3.1 foresees it): an empty message
    # ends the data, and its refusal is expected.  An LMTP peer owes no
    # reply for no recipient (RFC 2033 4.2), and should have refused DATA:
    # it is not trusted with another message.
    client.sock.sendall(b".\r\n")
    if isinstance(client, smtplib.LMTP):
        return None
    client.getreply()
    return []


def _command_line(client: smtplib.SMTP, verb: str, argument: str) -> bytes:
    """A command as smtplib's putcmd writes it, and refused for the same reason."""
    line = f"{verb} {argument}" if argument else verb
    if "\r" in line or "\n" in line:
        raise ValueError(f"command and arguments contain prohibited newline characters: {line!r}")
    return f"{line}\r\n".encode(client.command_encoding)


def _all_get(outcomes: list[Outcome | None], outcome: Outcome) -> None:
    """``outcome`` for each recipient that has none yet."""
    for i, current in enumerate(outcomes):
        if current is None:
            outcomes[i] = outcome


def _outcome(code: int, text: bytes, after: str) -> Outcome:
    words = " ".join(text.decode("utf-8", "replace").split())
    if code // 100 not in (2, 4, 5):
        return Outcome(451, f"4.5.0 Unexpected reply {code} to {after}: {words}")
    return Outcome(code, words, from_peer=True)


def _refused(hop: NextHop, code: int, text: bytes, command: str) -> Outcome:
    """A next hop that will not talk is its own fault, not the recipients':
    even a 5xx then defers (as Postfix's ``smtp_skip_5xx_greeting``)."""
    words = " ".join(text.decode("utf-8", "replace").split())
    return Outcome(451, f"4.4.0 {describe(hop)} refused {command}: {code} {words}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        error = exc.smtp_error
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else error
        return f"{exc.smtp_code} {text}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def dot_stuffed(
    message: BinaryIO, chunk_size: int = _CHUNK, *, crlf: bool = False
) -> Iterator[bytes]:
    """The message with CRLF line ends and leading dots doubled (RFC 5321
    4.5.2), in chunks of about ``chunk_size``.

    Each chunk read is cut after its last line end; the whole lines are
    changed with bytes methods, at C speed: every line end becomes CRLF
    (a CR before an LF is the line end's own, any other CR stays), and a
    "." that starts a line is doubled.  The rest of a line waits for the
    next read.  A last line without its end gets one.  With ``crlf`` (the
    envelope's: every line already ends in CRLF) the line ends are not
    looked at: two passes over each chunk, a sixth of deliver's time for a
    message of 100 KiB.
    """
    pending = b""  # the start of a line not yet ended
    within = False  # whether pending's octets follow some of its line already sent
    while chunk := message.read(chunk_size):
        data = pending + chunk if pending else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            # A line longer than a chunk: sent on but for a last CR, which
            # may be its end's.
            keep = 1 if data.endswith(b"\r") else 0
            part, pending = data[: len(data) - keep], data[len(data) - keep :]
            if part:
                yield b"." + part if not within and part.startswith(b".") else part
                within = True
            continue
        lines, pending = data[:cut], data[cut:]
        # Mail comes in with CRLF line ends, base64 has no dot: both checks
        # cost less than the replaces they spare.
        if not crlf and lines.count(b"\n") != lines.count(b"\r\n"):
            lines = lines.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if b"." in lines:
            lines = lines.replace(b"\r\n.", b"\r\n..")
        yield b"." + lines if not within and lines.startswith(b".") else lines
        within = False
    if pending or within:
        last = pending.removesuffix(b"\r")
        yield (b"." + last if not within and last.startswith(b".") else last) + b"\r\n"
