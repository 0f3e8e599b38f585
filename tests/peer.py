"""A next hop for deliver's tests: aiosmtpd speaking SMTP or LMTP on a loopback port."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

# What the peer answers: a function of the recipient, or None for "250".
Answer = Callable[[str], str | None]


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    tls: bool
    mail_options: list[str]
    # With ``Handler.dsn``: the DSN parameters as they came, MAIL's and each recipient's.
    mail_dsn: list[str] = field(default_factory=list)
    rcpt_dsn: dict[str, list[str]] = field(default_factory=dict)
    login: bytes | None = None  # the user that authenticated (AUTH), if one did


@dataclass
class Handler:
    rcpt: Answer = lambda _: None
    data: Answer = lambda _: None  # for LMTP, per recipient; for SMTP, asked with ""
    lmtp: bool = False
    messages: list[Received] = field(default_factory=list)
    # Set when the end of data arrives; the reply waits for ``release``, if given.
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event | None = None
    dsn: bool = False  # offer DSN (RFC 3461) and keep its parameters as sent

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.arrived.set()
        if self.release is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        replies = (
            [self.data(r) or "250 2.0.0 OK" for r in envelope.rcpt_tos]
            if self.lmtp
            else [self.data("") or "250 2.0.0 OK"]
        )
        per_recipient = replies if self.lmtp else replies * len(envelope.rcpt_tos)
        accepted = [
            r
            for r, reply in zip(envelope.rcpt_tos, per_recipient, strict=True)
            if reply.startswith("2")
        ]
        if accepted:
            self.messages.append(
                Received(
                    sender=envelope.mail_from or "",
                    recipients=accepted,
                    content=envelope.original_content,
                    # session.ssl is STARTTLS's; the transport's, TLS from the start.
                    tls=session.ssl is not None
                    or (
                        server.transport is not None
                        and server.transport.get_extra_info("ssl_object") is not None
                    ),
                    mail_options=list(envelope.mail_options),
                    mail_dsn=list(getattr(envelope, "mail_dsn", [])),
                    rcpt_dsn={r: getattr(envelope, "rcpt_dsn", {}).get(r, []) for r in accepted},
                    login=session.auth_data.login if session.authenticated else None,
                )
            )
        return "\r\n".join(replies)


class DsnHandler(Handler):
    """A :class:`Handler` whose server offers DSN."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(dsn=True, **kwargs)

    async def handle_EHLO(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]


_DSN_KEYWORDS = ("RET=", "ENVID=", "NOTIFY=", "ORCPT=")


def _without_dsn(argument: str) -> tuple[str, list[str]]:
    words = argument.split(" ")
    dsn = [w for w in words if w.upper().startswith(_DSN_KEYWORDS)]
    return " ".join(w for w in words if w not in dsn), dsn


class _DsnMixin:
    """aiosmtpd's server knows no DSN: its parameters are taken off MAIL and
    RCPT, kept as sent, before aiosmtpd reads the rest."""

    envelope: Envelope | None

    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's names
        rest, dsn = _without_dsn(arg or "")
        await super().smtp_MAIL(rest)  # type: ignore[misc]
        if self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.mail_dsn = dsn  # type: ignore[attr-defined]

    async def smtp_RCPT(self, arg: str | None) -> None:  # noqa: N802
        rest, dsn = _without_dsn(arg or "")
        assert self.envelope is not None
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(rest)  # type: ignore[misc]
        if len(self.envelope.rcpt_tos) > before:
            if not hasattr(self.envelope, "rcpt_dsn"):
                self.envelope.rcpt_dsn = {}  # type: ignore[attr-defined]
            self.envelope.rcpt_dsn[self.envelope.rcpt_tos[-1]] = dsn  # type: ignore[attr-defined]


class _DsnSMTP(_DsnMixin, SMTP):
    pass


class _DsnLMTP(_DsnMixin, LMTP):
    pass


class _Controller(Controller):
    """aiosmtpd's controller on an ephemeral port (it wants a fixed one)."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, **kwargs)
        self._lmtp = handler.lmtp
        self._dsn = handler.dsn

    def factory(self) -> SMTP:
        if self._dsn:
            cls: type[SMTP] = _DsnLMTP if self._lmtp else _DsnSMTP
        else:
            cls = LMTP if self._lmtp else SMTP
        return cls(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _UnixController(UnixSocketController):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@contextmanager
def unix_lmtp_peer(handler: Handler, path: str) -> Iterator[Handler]:
    """An LMTP server on a Unix socket, as Dovecot's lmtp usually is."""
    handler.lmtp = True
    controller = _UnixController(handler, unix_socket=path)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@contextmanager
def peer(
    handler: Handler,
    *,
    tls: ssl.SSLContext | None = None,
    require_tls: bool = False,
    implicit_tls: ssl.SSLContext | None = None,
    authenticator: Callable[..., AuthResult] | None = None,
) -> Iterator[tuple[Handler, int]]:
    """An SMTP (LMTP) server: STARTTLS with ``tls``, TLS from the first
    octet with ``implicit_tls`` (RFC 8314), AUTH PLAIN and LOGIN checked by
    ``authenticator`` with it (offered after STARTTLS only, or at once
    over implicit TLS)."""
    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs["tls_context"] = tls
        kwargs["require_starttls"] = require_tls
    if implicit_tls is not None:
        kwargs["ssl_context"] = implicit_tls
    if authenticator is not None:
        kwargs["authenticator"] = authenticator
        # aiosmtpd counts only STARTTLS as TLS; it offers AUTH without
        # TLS only where asked, so that a client that sends credentials in
        # plaintext is seen doing it.
        kwargs["auth_require_tls"] = tls is not None
    controller = _Controller(handler, **kwargs)
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()
