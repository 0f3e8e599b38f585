"""Delivery status notifications (RFC 3464) for recipients that failed.

One ``multipart/report; report-type=delivery-status`` per message and
pass: a text part for people, a ``message/delivery-status`` part with a
block per failed recipient, and the original header as
``text/rfc822-headers`` (RFC 6522).  It goes from the null sender, so
nothing ever answers it, and is never made for a message whose own
sender was null (RFC 5321 4.5.5, 6.1).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import BinaryIO

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
# Enough of the original to recognise it, little enough for any mailbox.
_HEADER_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Failure:
    recipient: str  # as the sender wrote it (the envelope recipient)
    address: str  # the address that failed, after alias expansion
    reply: str  # "550 5.1.1 text": ours or the remote host's
    from_peer: bool = False  # the reply came from the next hop, not from us
    remote_mta: str | None = None  # the next hop's host, when it has a name or address
    expired: bool = False  # deferred until the queue lifetime ran out


def status_of(reply: str, *, expired: bool = False) -> str:
    """The RFC 3463 status of a failure: from the reply, else from its class."""
    if expired:
        return "4.4.7"
    code, _, text = reply.partition(" ")
    if match := _ENHANCED.match(text):
        return match.group(0)
    return "5.0.0" if code.startswith("5") else "4.0.0"


def original_header(message: BinaryIO) -> bytes:
    """The message's header section, CRLF-terminated, at most ``_HEADER_LIMIT`` octets."""
    header = bytearray()
    for line in message:
        if line in (b"\r\n", b"\n") or len(header) + len(line) > _HEADER_LIMIT:
            break
        header += line.rstrip(b"\r\n") + b"\r\n"
    return bytes(header)


def build(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    arrival: datetime,
    now: datetime,
    failures: Sequence[Failure],
    header: bytes,
) -> bytes:
    """The notification as octets with CRLF line ends, ready for the queue.

    With an address or a header that is not ASCII it takes RFC 6533's
    forms: ``utf-8`` address types, ``message/global-delivery-status`` and
    ``message/global-headers``.
    """
    addresses = [sender, *(f.recipient for f in failures), *(f.address for f in failures)]
    international = not all(a.isascii() for a in addresses) or not header.isascii()
    suffix = "global-" if international else ""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
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
        "Your message could not be delivered to one or more recipients.",
        "The header of your message is attached below.",
        "",
    ]
    for failure in failures:
        named = failure.address
        if failure.recipient.lower() != failure.address.lower():
            named += f" (expanded from {failure.recipient})"
        why = "delivery time expired; last reply: " if failure.expired else ""
        lines += [f"<{named}>: {why}{failure.reply}", ""]
    lines += [
        f"--{boundary}",
        f"Content-Type: message/{suffix}delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-MMDF-Queue-ID: {queue_id}",
        f"Arrival-Date: {format_datetime(arrival)}",
    ]
    for failure in failures:
        lines.append("")
        if failure.recipient.lower() != failure.address.lower():
            lines.append(f"Original-Recipient: {_typed(failure.recipient)}")
        lines += [
            f"Final-Recipient: {_typed(failure.address)}",
            "Action: failed",
            f"Status: {status_of(failure.reply, expired=failure.expired)}",
        ]
        if failure.remote_mta:
            lines.append(f"Remote-MTA: dns; {failure.remote_mta}")
        # "smtp" is for a reply an SMTP peer gave (RFC 3464 2.3.6); ours are
        # in the same form but made here, so they get the private type.
        kind = "smtp" if failure.from_peer else "X-MMDF"
        lines += [
            f"Diagnostic-Code: {kind}; {failure.reply}",
            f"Last-Attempt-Date: {format_datetime(now)}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/global-headers"
        if international
        else "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(lines).encode() + b"\r\n" + header
    return text + f"\r\n--{boundary}--\r\n".encode()


def _typed(address: str) -> str:
    """An address with its RFC 3464 type: ``rfc822``, or RFC 6533's ``utf-8``."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"
