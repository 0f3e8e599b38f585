"""The one place a session's filters are combined: blocklists, checks, milters.

Order, stage by stage (Postfix's, with postscreen in front):

- connect: the DNS blocklists (unless the clients access table said OK),
  then the milters; a refusal replaces the greeting (``554``: the client
  may only QUIT; a temporary one ``421``).
- MAIL: SPF (``[auth]``), then the milters.
- RCPT, DATA: the milters.
- end of data: DKIM, ARC and DMARC of the message as received, then our
  trace fields (Received, Authentication-Results) go on top, arriving
  Authentication-Results fields that claim our ``authserv_id`` are removed
  (RFC 8601 5), and the milters see the message as it will be queued,
  trace fields included, as they do in Postfix.  Their changes are made to
  the staged message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..checks.results import FIELD_NAME, claims_authserv_id
from ..checks.verdicts import SpfVerdicts
from ..milter import codec as milter_codec
from ..milter.chain import MilterChain, apply_header_changes
from ..milter.config import MilterConfig
from ..milter.protocol import Action
from ..milter.protocol import Verdict as MilterVerdict
from ..protocol import MailFrom, Path, Reply
from . import CONTINUE, Connection, Verdict
from .staged import StagedMessage

if TYPE_CHECKING:
    # Only smtpd and smtpsrvr make Checks; submit filters with milters alone.
    from ..checks.gate import Checks

log = logging.getLogger("mmdf_smtp.filters")

DAEMON_NAME = "mmdf-smtp"


class SessionFilters:
    """The filters of one session (see :class:`~mmdf_smtp.filters.Filters`)."""

    def __init__(
        self,
        connection: Connection,
        *,
        checks: Checks | None,
        milters: Sequence[MilterConfig],
        dnsbl: bool = True,
    ) -> None:
        """``dnsbl``: whether the blocklists are asked (False: an access table's OK)."""
        self._connection = connection
        self._checks = checks
        self._dnsbl = dnsbl
        self._chain = MilterChain(milters) if milters else None
        self._helo = ""
        self._tls: str | None = None
        self._queue_id = ""
        self._spf = SpfVerdicts()

    @property
    def wants_content(self) -> bool:
        auth = self._checks.auth if self._checks is not None else None
        return self._chain is not None or auth is not None

    # -- the stages

    async def connect(self) -> Verdict:
        client = self._connection
        if self._checks is not None and self._dnsbl and client.client_address:
            listed = await self._checks.at_connect(client.client_address)
            if listed.refusal is not None:
                return Verdict(reply=listed.refusal.reply(), reason="dnsbl")
        if self._chain is None:
            return CONTINUE
        verdict = await self._chain.connect(
            hostname=client.client_name,
            address=client.client_address,
            port=client.client_port,
            macros=self._connect_macros(),
        )
        mapped = _mapped(verdict)
        if mapped.reply is None:
            return mapped
        # Refused before the greeting: 554 leaves the client only QUIT, a
        # temporary refusal closes (RFC 5321 3.1, 4.3.2).
        reply = mapped.reply
        code = 421 if reply.code < 500 else 554
        return Verdict(
            reply=Reply(code=code, enhanced=reply.enhanced, text=reply.text), reason="milter"
        )

    async def helo(self, name: str, tls: str | None) -> Verdict:
        self._helo, self._tls = name, tls
        if self._chain is None:
            return CONTINUE
        return _mapped(await self._chain.helo(name, self._tls_macros()))

    async def mail(self, mail: MailFrom, queue_id: str) -> Verdict:
        self._queue_id = queue_id
        sender = mail.sender
        if self._checks is not None and self._connection.client_address:
            self._spf = await self._checks.at_mail(
                self._connection.client_address, self._helo, sender.address
            )
            if self._spf.refusal is not None:
                return Verdict(reply=self._spf.refusal.reply(), reason="spf")
        if self._chain is None:
            return CONTINUE
        macros = {
            "i": queue_id,
            "{mail_addr}": sender.address,
            "{mail_host}": sender.domain,
            "{mail_mailer}": "smtp" if sender.domain else "local",
        }
        arguments = _mail_arguments(mail)
        return _mapped(await self._chain.mail(f"<{sender.address}>", arguments, macros))

    async def rcpt(self, recipient: Path) -> Verdict:
        if self._chain is None:
            return CONTINUE
        macros = {
            "i": self._queue_id,
            "{rcpt_addr}": recipient.address,
            "{rcpt_host}": recipient.domain,
            "{rcpt_mailer}": "smtp" if recipient.domain else "local",
        }
        return _mapped(await self._chain.rcpt(f"<{recipient.address}>", (), macros))

    async def data(self) -> Verdict:
        if self._chain is None:
            return CONTINUE
        return _mapped(await self._chain.data({"i": self._queue_id}))

    async def message(self, message: StagedMessage) -> Verdict:
        verdict = await self._check_message(message)
        if verdict.reply is not None or self._chain is None:
            return verdict
        return await self._filter_message(self._chain, message)

    async def _check_message(self, message: StagedMessage) -> Verdict:
        checks = self._checks
        if checks is None or checks.auth is None:
            return CONTINUE
        limit = checks.auth.dkim_max_size + 1  # one more: the checks see it is too big
        end = await checks.at_end_of_message(message.original(limit), self._spf)
        if end.refusal is not None:
            return Verdict(reply=end.refusal.reply(), reason="dmarc")
        ours = checks.auth.authserv_id
        kept = [
            (name, value)
            for name, value in message.headers
            if name.lower() != FIELD_NAME.lower() or not claims_authserv_id(value, ours)
        ]
        if len(kept) != len(message.headers):
            log.info(
                "id=%s removed %d Authentication-Results field(s) claiming %s",
                self._queue_id,
                len(message.headers) - len(kept),
                ours,
            )
        # Below our Received field, the first of the header.
        added = [_field(end.field)]
        if end.quarantine:
            added.append(_field(end.quarantine))
        message.headers = kept[:1] + added + kept[1:]
        return CONTINUE

    async def _filter_message(self, chain: MilterChain, message: StagedMessage) -> Verdict:
        macros: Mapping[str, str] = {"i": self._queue_id}
        # Pipelined to each milter: one wait a message rather than one a field.
        end = await chain.message(message.headers, message.body_chunks, macros)
        verdict = _mapped(end)
        if verdict != CONTINUE:
            return verdict
        _apply(message, end.modifications)
        if end.quarantine is not None:
            message.quarantine = end.quarantine
        return CONTINUE

    async def reset(self) -> None:
        self._spf = SpfVerdicts()
        if self._chain is not None:
            await self._chain.abort()

    async def close(self) -> None:
        if self._chain is not None:
            await self._chain.quit()

    # -- macros

    def _connect_macros(self) -> dict[str, str]:
        client = self._connection
        return {
            "j": client.hostname,
            "_": f"{client.client_name} [{client.client_address}]",
            "{daemon_name}": DAEMON_NAME,
            "{daemon_addr}": client.local_address,
            "{daemon_port}": str(client.local_port or ""),
            "v": DAEMON_NAME,
            "{client_addr}": client.client_address,
            "{client_name}": client.client_name,
            "{client_ptr}": client.client_name,
            "{client_port}": str(client.client_port or ""),
        }

    def _tls_macros(self) -> dict[str, str]:
        if self._tls is None:
            return {}
        # The session's description, "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
        # (shells.tls.describe): the macros are its two names, as OpenSSL gives them.
        version, _, cipher = self._tls.partition(" with cipher ")
        return {"{tls_version}": version, "{cipher}": cipher}


def _mapped(verdict: MilterVerdict) -> Verdict:
    action = verdict.action
    if action is Action.DISCARD:
        return Verdict(discard=True, reason="milter")
    if action in (Action.CONTINUE, Action.ACCEPT) or verdict.reply is None:
        return CONTINUE
    return Verdict(reply=verdict.reply, reason="milter")


def _mail_arguments(mail: MailFrom) -> tuple[str, ...]:
    arguments = []
    if mail.size is not None:
        arguments.append(f"SIZE={mail.size}")
    if mail.body is not None:
        arguments.append(f"BODY={mail.body}")
    if mail.smtputf8:
        arguments.append("SMTPUTF8")
    return tuple(arguments)


def _field(data: bytes) -> tuple[str, str]:
    name, _, value = data.decode("utf-8", "surrogateescape").removesuffix("\r\n").partition(":")
    return name, value.replace("\r\n", "\n")


def _apply(message: StagedMessage, modifications: Sequence[milter_codec.Modification]) -> None:
    """A milter's changes to the staged message, in the order sent."""
    message.headers = apply_header_changes(message.headers, modifications)
    envelope = message.envelope
    body: list[bytes] = []
    for change in modifications:
        match change:
            case milter_codec.ChangeSender(sender=sender):
                envelope.sender = _bare(sender)
            case milter_codec.AddRecipient(recipient=recipient) | (
                milter_codec.AddRecipientWithArguments(recipient=recipient)
            ):
                if _bare(recipient) not in envelope.recipients:
                    envelope.recipients.append(_bare(recipient))
            case milter_codec.DeleteRecipient(recipient=recipient):
                wanted = _bare(recipient).lower()
                envelope.recipients = [r for r in envelope.recipients if r.lower() != wanted]
            case milter_codec.ReplaceBody(data=data):
                body.append(data)
    if body:
        message.replace_body(iter(body))


def _bare(address: str) -> str:
    """An address as milters send it, ``<a@b>`` or ``a@b``, without the brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address
