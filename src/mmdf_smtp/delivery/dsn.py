"""Delivery status notifications (RFC 3461, RFC 3464): which, and what they say.

What a recipient's new state calls for is decided here, by pure
functions of what the sender asked (NOTIFY, RET, ENVID, ORCPT: RFC 3461)
and of the delivery's outcome; the runner only records outcomes and
queues what :func:`build` makes.

A notice is one ``multipart/report; report-type=delivery-status`` per
message, kind (failure, delay, success) and pass: a text part for
people, a ``message/delivery-status`` part with a block per recipient,
and the original message (``message/rfc822``, for a failure under
RET=FULL, up to :data:`RETURN_LIMIT` octets) or its header
(``text/rfc822-headers``, RFC 6522).  It goes from the null sender, so
nothing ever answers it, and is never made for a message whose own
sender was null (RFC 5321 4.5.5, 6.1).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import BinaryIO, Literal, TypedDict

from ..protocol.dsnparams import orcpt_parameter
from ..queue import Envelope

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
# Enough of the original to recognise it, little enough for any mailbox.
_HEADER_LIMIT = 64 * 1024
# The largest message a failure notice returns whole under RET=FULL; a
# larger one comes back as its header, as under RET=HDRS (Postfix's
# bounce_size_limit does the same, at 50 kB).
RETURN_LIMIT = 1024 * 1024

# RFC 3464 2.3.3's actions; "expanded" is not reported.
Action = Literal["failed", "delayed", "delivered", "relayed"]
Kind = Literal["failure", "delay", "success"]
_KIND: dict[Action, Kind] = {
    "failed": "failure",
    "delayed": "delay",
    "delivered": "success",
    "relayed": "success",
}
_SUBJECT: dict[Kind, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_SUMMARY: dict[Kind, list[str]] = {
    "failure": ["Your message could not be delivered to one or more recipients."],
    "delay": [
        "Your message could not be delivered yet to one or more recipients.",
        "It is still being retried; you need not send it again.",
    ],
    "success": [
        "Your message was delivered, as you asked to be told, to the recipients",
        "below; where it says relayed, to a system that sends no such reports.",
    ],
}


@dataclass(frozen=True, slots=True)
class Asked:
    """What the sender asked for one envelope recipient (RFC 3461 4.1, 4.2)."""

    notify: tuple[str, ...] | None = None  # ("NEVER",) or conditions; None: not given
    orcpt: str | None = None  # "addr-type;address"

    def wants(self, condition: str) -> bool:
        return self.notify is not None and condition in self.notify


_NOTHING_ASKED = Asked()


def asked_of(envelope: Envelope, recipient: str) -> Asked:
    """The NOTIFY and ORCPT that came with ``recipient`` (an envelope recipient)."""
    if not envelope.notify and not envelope.orcpt:
        return _NOTHING_ASKED  # most mail: no search through the recipients
    for i, r in enumerate(envelope.recipients):
        if r == recipient:
            notify = envelope.notify[i] if i < len(envelope.notify) else None
            orcpt = envelope.orcpt[i] if i < len(envelope.orcpt) else None
            return Asked(tuple(notify.split(",")) if notify else None, orcpt)
    return Asked()


class HopParameters(TypedDict):
    ret: str | None
    envid: str | None
    notify: list[str | None]
    orcpt: list[str | None]


def hop_parameters(envelope: Envelope, recipients: Sequence[str]) -> HopParameters:
    """What :func:`..nexthop.send` hands on for a next hop that offers DSN:
    RET and ENVID, and for each of ``recipients`` (envelope recipients) its
    NOTIFY and ORCPT as the sender gave them (RFC 3461 6.1)."""
    asked = [asked_of(envelope, r) for r in recipients]
    return {
        "ret": envelope.ret,
        "envid": envelope.envid,
        "notify": [",".join(a.notify) if a.notify else None for a in asked],
        "orcpt": [orcpt_parameter(a.orcpt) if a.orcpt else None for a in asked],
    }


def delay_due(
    arrival: datetime, previous_try: datetime | None, now: datetime, delay_warning: int
) -> bool:
    """Whether a recipient deferred ``now`` has just been waiting ``delay_warning``
    seconds: true at the first try at or after that moment, once, since the
    try before it came earlier (``delay_warning`` 0: never)."""
    if delay_warning <= 0:
        return False
    due = arrival + timedelta(seconds=delay_warning)
    return now >= due and (previous_try is None or previous_try < due)


def action_for(
    asked: Asked,
    status: str,
    *,
    local: bool,
    hop_offers_dsn: bool = False,
    delay_due: bool = False,
) -> Action | None:
    """The notice a recipient's new ``status`` (delivered, bounced, deferred)
    calls for; None: none.

    RFC 3461 4.1: without NOTIFY a failure is reported, and a delay may
    be; NEVER asks for nothing.  4.2 and 6.2.1: a success is reported only
    when asked for, as "delivered" by the final delivery (the Maildir) and
    as "relayed" when the next hop offers no DSN; one that does reports it
    itself, having been handed the NOTIFY.
    """
    if status == "bounced":
        return "failed" if asked.notify is None or asked.wants("FAILURE") else None
    if status == "deferred":
        if delay_due and (asked.notify is None or asked.wants("DELAY")):
            return "delayed"
        return None
    if status == "delivered" and asked.wants("SUCCESS"):
        if local:
            return "delivered"
        return None if hop_offers_dsn else "relayed"
    return None


@dataclass(frozen=True, slots=True)
class Report:
    """One recipient's block in a notice."""

    recipient: str  # as the sender wrote it (the envelope recipient)
    address: str  # the address reported on, after alias expansion
    reply: str  # "550 5.1.1 text": ours or the remote host's
    from_peer: bool = False  # the reply came from the next hop, not from us
    remote_mta: str | None = None  # the next hop's host, when it has a name or address
    expired: bool = False  # deferred until the queue lifetime ran out
    action: Action = "failed"
    orcpt: str | None = None  # "addr-type;address", from the RCPT's ORCPT
    retry_until: datetime | None = None  # for "delayed": when the queue gives up

    @property
    def kind(self) -> Kind:
        return _KIND[self.action]


def grouped(reports: Sequence[Report]) -> list[list[Report]]:
    """The reports of one pass as notices: one per kind, in a fixed order."""
    order: tuple[Kind, ...] = ("failure", "delay", "success")
    groups = [[r for r in reports if r.kind == kind] for kind in order]
    return [group for group in groups if group]


def status_of(reply: str, *, expired: bool = False) -> str:
    """The RFC 3463 status of an outcome: from the reply, else from its class."""
    if expired:
        return "4.4.7"
    code, _, text = reply.partition(" ")
    if match := _ENHANCED.match(text):
        return match.group(0)
    return {"2": "2.0.0", "4": "4.0.0"}.get(code[:1], "5.0.0")


def original_header(message: BinaryIO) -> bytes:
    """The message's header section, CRLF-terminated, at most ``_HEADER_LIMIT`` octets."""
    header = bytearray()
    for line in message:
        if line in (b"\r\n", b"\n") or len(header) + len(line) > _HEADER_LIMIT:
            break
        header += line.rstrip(b"\r\n") + b"\r\n"
    return bytes(header)


def returned_content(
    message: BinaryIO, *, ret: str | None, kind: Kind, limit: int = RETURN_LIMIT
) -> tuple[bytes, bool]:
    """What a notice of ``kind`` returns of ``message`` (open at its start):
    the whole message, CRLF line ends, for a failure under RET=FULL when
    it is at most ``limit`` octets (RFC 3461 4.3); else its header.  The
    flag says which."""
    if kind == "failure" and ret == "FULL":
        start = message.tell()
        data = message.read(limit + 1)
        if len(data) <= limit:
            return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), True
        message.seek(start)
    return original_header(message), False


def build(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    arrival: datetime,
    now: datetime,
    reports: Sequence[Report],
    header: bytes,
    whole: bool = False,
    envid: str | None = None,
) -> bytes:
    """The notice of ``reports`` (all of one kind) as octets with CRLF line
    ends, ready for the queue.  ``header`` is what :func:`returned_content`
    gave: the whole message when ``whole``.

    With an address or a header that is not ASCII it takes RFC 6533's
    forms: ``utf-8`` address types, ``message/global-delivery-status`` and
    ``message/global-headers`` (``message/global`` for a whole message).
    """
    kind = reports[0].kind
    addresses = [sender, *(r.recipient for r in reports), *(r.address for r in reports)]
    # A header field that is not ASCII makes it international; an 8-bit body does not.
    head = header.partition(b"\r\n\r\n")[0]
    international = not all(a.isascii() for a in addresses) or not head.isascii()
    suffix = "global-" if international else ""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        f"Subject: {_SUBJECT[kind]}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at {hostname}.",
        "",
        *_SUMMARY[kind],
        f"The {'message' if whole else 'header of your message'} is attached below.",
        "",
    ]
    for report in reports:
        named = report.address
        if report.recipient.lower() != report.address.lower():
            named += f" (expanded from {report.recipient})"
        why = "delivery time expired; last reply: " if report.expired else ""
        lines += [f"<{named}>: {report.action}: {why}{report.reply}", ""]
    lines += [
        f"--{boundary}",
        f"Content-Type: message/{suffix}delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
    ]
    if envid is not None:
        # RFC 3464 2.2.1: the ENVID "MUST be supplied" when one was given.
        lines.append(f"Original-Envelope-Id: {envid}")
    lines += [f"X-MMDF-Queue-ID: {queue_id}", f"Arrival-Date: {format_datetime(arrival)}"]
    for report in reports:
        lines.append("")
        lines += _recipient_fields(report, now)
    if whole:
        third = "message/global" if international else "message/rfc822"
    else:
        third = "message/global-headers" if international else "text/rfc822-headers"
    lines += ["", f"--{boundary}", f"Content-Type: {third}", ""]
    text = "\r\n".join(lines).encode() + b"\r\n" + header
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    # The CRLF before a boundary is the boundary's (RFC 2046 5.1.1): the
    # part's own last line end stays the part's.
    return text + f"\r\n--{boundary}--\r\n".encode()


def _recipient_fields(report: Report, now: datetime) -> list[str]:
    lines = []
    if report.orcpt is not None:
        # RFC 3464 2.3.1: the ORCPT as given, when there was one.
        addr_type, _, address = report.orcpt.partition(";")
        lines.append(f"Original-Recipient: {addr_type}; {address}")
    elif report.recipient.lower() != report.address.lower():
        lines.append(f"Original-Recipient: {_typed(report.recipient)}")
    lines += [
        f"Final-Recipient: {_typed(report.address)}",
        f"Action: {report.action}",
        f"Status: {status_of(report.reply, expired=report.expired)}",
    ]
    if report.remote_mta:
        lines.append(f"Remote-MTA: dns; {report.remote_mta}")
    # "smtp" is for a reply an SMTP peer gave (RFC 3464 2.3.6); ours are
    # in the same form but made here, so they get the private type.
    kind = "smtp" if report.from_peer else "X-MMDF"
    lines += [
        f"Diagnostic-Code: {kind}; {report.reply}",
        f"Last-Attempt-Date: {format_datetime(now)}",
    ]
    if report.retry_until is not None:
        lines.append(f"Will-Retry-Until: {format_datetime(report.retry_until)}")
    return lines


def _typed(address: str) -> str:
    """An address with its RFC 3464 type: ``rfc822``, or RFC 6533's ``utf-8``."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"
