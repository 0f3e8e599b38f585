"""Local recipients: whose Maildir a message goes to, its copies' names and header.

One place decides it for both writers of Maildir copies: deliver, for
what it takes from the queue, and smtpd's commit process, for what it
delivers at commit time (:mod:`.atcommit`).  A copy written by either is
named and headed alike, and logged and counted alike, so that deliver,
finding a copy the commit process wrote, knows it by its name.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..policy.aliases import Aliases, Destination
from ..queue import DeliveryState, Envelope, RecipientState
from . import maildir


class LocalRecipients:
    """The aliases, users and Maildirs of one configuration.

    Raises ConfigError when the aliases file cannot be read.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.aliases = Aliases.of(config)

    def expand(self, envelope: Envelope) -> DeliveryState:
        """The message's destinations, in envelope order, aliases expanded
        (and ``recipient_delimiter``'s extensions taken off, where no alias
        names the whole local part)."""
        entries: list[RecipientState] = []
        seen: set[str] = set()  # one copy per mailbox or address, as sendmail and Postfix
        for recipient in envelope.recipients:
            destinations = (
                self.aliases.expand(recipient)
                if self.aliases.is_local(recipient)
                else [Destination(recipient)]
            )
            for d in destinations:
                if d.key in seen:
                    continue
                seen.add(d.key)
                entries.append(
                    RecipientState(
                        recipient=recipient,
                        address=d.address,
                        mailbox=d.mailbox,
                        problem=d.problem,
                    )
                )
        return DeliveryState(entries)

    def maildir_of(self, mailbox: str) -> Path:
        return Path(self.config.local.maildir.replace("{user}", mailbox))

    def copy_name(self, envelope: Envelope, queue_id: str, index: int) -> str:
        """The file name of the copy for entry ``index`` of the message's
        state: the same on every attempt, by whichever writer."""
        return maildir.file_name(
            int(envelope.received.timestamp()), queue_id, index, self.config.hostname
        )


def header(envelope: Envelope, entry: RecipientState) -> bytes:
    """What a Maildir copy starts with: the envelope's sender and the address delivered to."""
    return f"Return-Path: <{envelope.sender}>\nDelivered-To: {entry.address}\n".encode()


def written_reply(name: str, *, written: bool) -> str:
    if written:
        return f"2.0.0 Delivered to maildir as {name}"
    return f"2.0.0 Found already delivered as {name}"


def attempt_line(queue_id: str, entry: RecipientState, relay: str) -> str:
    """The log line of one recipient's attempt, after its state was updated."""
    return "id={} to=<{}>{} relay={} attempts={} status={} ({}){}".format(
        queue_id,
        entry.address,
        f" orig_to=<{entry.recipient}>" if entry.recipient != entry.address else "",
        relay,
        entry.attempts,
        entry.status,
        entry.last_reply,
        f" next_try={entry.next_try.isoformat()}" if entry.next_try else "",
    )
