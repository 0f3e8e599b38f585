"""One SMTP session's decisions: the protocol core joined to policy and queue.

The shells (blocking and asyncio) move octets; this module answers the
core's decision events the same way for all of them, so the wire and the
queue cannot tell which shell served a session.  Only the commit at a
:class:`~mmdf_smtp.protocol.MessageComplete` waits on the disk (fsync):
:meth:`Session.handle` does it in place, and the asyncio shell instead
takes the message with :meth:`Session.end_message`, commits it in a
thread together with others that ended meanwhile, and answers with
:meth:`Session.answer_commit`.

A session with filters (:mod:`mmdf_smtp.filters`: blocklists, checks,
milters) answers some decisions only once they have spoken: for those,
:meth:`Session.begin` and :meth:`Session.handle` return a coroutine that
answers when it is done, and the shell runs it (on its event loop, or on
a loop of the session's own in the blocking shell) with the session held
meanwhile.  At the end of data, :meth:`Session.filter_message` does the
same before the commit.  Without filters, everything is answered at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Protocol

from . import metrics
from .config import ChannelConfig
from .filters import CONTINUE, Filters, StagedMessage, Verdict
from .filters import staged as staging
from .protocol import (
    ConnectionClosed,
    Event,
    Hello,
    Limits,
    MailFrom,
    MessageAborted,
    MessageComplete,
    MessageData,
    OutOfTurn,
    Path,
    RcptTo,
    Refused,
    Reply,
    Reset,
    ServerConnection,
    StartData,
    StartTLS,
    replies,
)
from .protocol.grammar import is_domain_or_literal
from .queue import Envelope, MessageWriter, Queue, QueueError

log = logging.getLogger("mmdf_smtp.session")

Pending = Coroutine[None, None, None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Client:
    """Who is on the other end, as far as the shell knows."""

    host: str  # a name, or an address literal such as "[192.0.2.7]"
    address: str  # "" when unknown (a pipe)
    port: int = 0  # 0 when unknown


class Access(Protocol):
    """The access tables' word on a sender at MAIL and a recipient at RCPT.

    The policy's (:class:`mmdf_smtp.policy.access.AccessTables`): asked as
    ``check_recipient`` is, so that the session never reads a table.
    """

    def sender(self, address: str) -> Verdict: ...

    def recipient(self, address: str) -> Verdict: ...


@functools.lru_cache(maxsize=4)  # messages come many a second
def _date_text(now: datetime, offset: timedelta | None) -> str:
    # The offset is part of the key: equal instants compare equal across
    # zones, and each is written in its own.
    return format_datetime(now)


def _quoted(data: bytes, limit: int = 64) -> str:
    """``data`` for a log line: in double quotes, escaped, at most ``limit`` octets."""
    # bytes' repr escapes CR, LF, NUL and 8-bit octets, and needs no codec
    # (the workers cannot load one after they dropped privileges).
    text = repr(data[:limit])[2:-1]
    return '"' + text.replace('"', '\\"') + ('..."' if len(data) > limit else '"')


# A word for the log for each refusal of a recipient by policy.
_RECIPIENT_REASONS = {
    replies.UNKNOWN_USER.enhanced: "unknown-user",
    replies.RELAY_DENIED.enhanced: "relay-denied",
}


def _comment_text(text: str, *, utf8: bool) -> str:
    """``text`` as a comment's content (RFC 5322 3.2.2): parentheses and
    backslashes as quoted-pairs, and "?" for what a header may not hold
    (controls, and non-ASCII outside an SMTPUTF8 message)."""
    out = []
    for char in text:
        if char in "()\\":
            out.append("\\" + char)
        elif char.isprintable() and (char.isascii() or utf8):
            out.append(char)
        else:
            out.append("?")
    return "".join(out)


def address_literal(address: str) -> str:
    """RFC 5321 4.1.3: ``[192.0.2.7]`` or ``[IPv6:2001:db8::7]``."""
    return f"[IPv6:{address}]" if ":" in address else f"[{address}]"


class Session:
    """Answers the decisions of one :class:`ServerConnection`."""

    def __init__(
        self,
        *,
        hostname: str,
        client: Client,
        channel: ChannelConfig | None,
        refusal: Reply | None,
        check_recipient: Callable[[ChannelConfig, Path], Reply | None],
        queue: Queue,
        limits: Limits,
        tls_available: bool,
        filters: Filters | None = None,
        staging_directory: str | None = None,
        access: Access | None = None,
        client_access: Verdict = CONTINUE,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``filters``: the session's, if any; with filters that read the
        content, ``staging_directory`` is where a big message is staged.
        ``access``: the access tables, asked at MAIL and RCPT;
        ``client_access``: what the clients table said of this client."""
        self.hostname = hostname
        self.client = client
        self.channel = channel
        # Names the session in logs and traces; random reseeds in each worker.
        self.id = f"{random.getrandbits(32):08x}"
        self.tracing = log.isEnabledFor(logging.DEBUG)
        self.connection = ServerConnection(
            hostname=hostname, limits=limits, tls_available=tls_available
        )
        self._started = time.monotonic()
        self._queued = 0
        self.tls: str | None = None  # protocol and cipher once STARTTLS is done
        self._check_recipient = check_recipient
        self._queue = queue
        self._clock = clock
        self._recipients: list[str] = []
        # DSN's NOTIFY and ORCPT of each recipient that had either (RFC 3461 4.1, 4.2).
        self._recipient_dsn: dict[str, tuple[str | None, str | None]] = {}
        # The sender of the transaction under way, for the log: the core
        # forgets it as soon as it refuses the message.
        self._transaction_sender: str | None = None
        self._writer: MessageWriter | None = None
        self._write_error: QueueError | None = None
        self._refusal = refusal
        self._filters = filters
        self._staging_directory = staging_directory
        self._queue_id: str | None = None  # with filters: named at MAIL
        self._discard = False  # a filter asked to drop the transaction's message
        self._hold: str | None = None  # an access table's HOLD: queued on hold, with this
        self._access = access
        self._client_access = client_access
        self._staged: StagedMessage | None = None
        self._staged_at: datetime | None = None  # when the staged message's data began

    def begin(self) -> Pending | None:
        """Greet the client: at once, or by the coroutine returned (filters first)."""
        greeting = self._greeting(self._refusal)
        if greeting.code == 220:
            greeting = self._refused("connect", self._client_access) or greeting
        if self._filters is None or greeting.code != 220:
            self.connection.send(greeting)
            return None
        return self._filtered_greeting(self._filters, greeting)

    async def _filtered_greeting(self, filters: Filters, greeting: Reply) -> None:
        verdict = await filters.connect()
        self.connection.send(self._refused("connect", verdict) or greeting)

    def _greeting(self, refusal: Reply | None) -> Reply:
        if refusal is not None:
            return refusal
        if self.channel is None:
            return replies.NO_SERVICE.with_fixed_text(f"{self.hostname} No SMTP service here")
        return replies.GREETING.with_fixed_text(f"{self.hostname} Server SMTP ready")

    @property
    def queue(self) -> Queue:
        return self._queue

    def trace(self, line: str) -> None:
        log.debug("%s %s", self.id, line)

    def tls_established(self, description: str) -> None:
        self.tls = description
        self.connection.tls_established()

    def handle(self, event: Event) -> Pending | None:
        """Answer ``event`` if it is a decision; keep the message state.

        Returns a coroutine when the answer waits for the filters: the
        shell runs it, and holds the session until it is done.
        """
        if self._filters is not None:
            return self._handle_filtered(self._filters, event)
        conn = self.connection
        match event:
            case Hello():
                conn.send(replies.HELLO.with_fixed_text(f"{self.hostname} Hello {event.name}"))
            case MailFrom():
                self._recipients.clear()
                self._recipient_dsn.clear()
                self._transaction_sender = event.sender.address
                conn.send(self._sender_refusal(event) or replies.SENDER_OK)
            case RcptTo():
                conn.send(self._rcpt(event))
            case StartData():
                conn.send(self._open_message(event))
            case MessageData():
                self._write(event.data)
            case MessageComplete():
                if self._discard:
                    self._discard_unfiltered()
                else:
                    self._commit_in_place(event)
            case MessageAborted():
                self._message_refused(event)
                self._drop_message()
            case OutOfTurn():
                self._log_out_of_turn(event)
            case Refused():
                self._log_core_refusal(event)
            case Reset() | StartTLS():
                self._transaction_sender = None
                self._drop_message()
            case ConnectionClosed():
                self._drop_message()
                self._log_session(event)
        return None

    def _handle_filtered(self, filters: Filters, event: Event) -> Pending | None:
        conn = self.connection
        match event:
            case Hello():
                return self._filtered_hello(filters, event)
            case MailFrom():
                self._recipients.clear()
                self._recipient_dsn.clear()
                self._transaction_sender = event.sender.address
                return self._filtered_mail(filters, event)
            case RcptTo():
                refusal, access = self._recipient_refusal(event)
                if refusal is not None:
                    conn.send(refusal)
                    return None
                return self._filtered_rcpt(filters, event, access)
            case StartData():
                return self._filtered_data(filters, event)
            case MessageData():
                if self._staged is not None:
                    self._staged.write(event.data)
                else:
                    self._write(event.data)
            case MessageComplete():
                return self._filtered_commit(filters, event)
            case MessageAborted() | Reset() | StartTLS():
                if isinstance(event, MessageAborted):
                    self._message_refused(event)
                else:
                    self._transaction_sender = None
                had_transaction = self._queue_id is not None
                self._drop_message()
                if had_transaction:
                    return filters.reset()
            case OutOfTurn():
                self._log_out_of_turn(event)
            case Refused():
                self._log_core_refusal(event)
            case ConnectionClosed():
                self._drop_message()
                self._log_session(event)
                return filters.close()
        return None

    def _message_refused(self, event: MessageAborted) -> None:
        """The core refused the message at its end (NUL, a bare line end, too big...)."""
        self._log_refusal(event.reply, event.reason, self._envelope_details())
        metrics.message_refused(event.reason or "protocol", 0)

    def _commit_in_place(self, event: MessageComplete) -> None:
        writer, error = self.end_message()
        if writer is not None and error is None:
            try:
                writer.commit()
            except QueueError as exc:
                error = exc
        self.answer_commit(event, writer, error)

    async def _filtered_commit(self, filters: Filters, event: MessageComplete) -> None:
        # The blocking shell's way: the commit waits on the disk in place.
        if await self._filter_message(filters, event):
            self._commit_in_place(event)

    async def _filtered_hello(self, filters: Filters, event: Hello) -> None:
        verdict = await filters.helo(event.name, self.tls)
        hello = replies.HELLO.with_fixed_text(f"{self.hostname} Hello {event.name}")
        self.connection.send(self._refused("helo", verdict) or hello)

    async def _filtered_mail(self, filters: Filters, event: MailFrom) -> None:
        if self._queue_id is not None:
            await filters.reset()  # the transaction before this one ended without data
            self._queue_id = None
        refused = self._sender_refusal(event)
        if refused is not None:
            self.connection.send(refused)
            return
        self._queue_id = self._queue.new_id()
        verdict = await filters.mail(event, self._queue_id)
        self._discard = self._discard or verdict.discard
        refusal = self._refused("mail", verdict, sender=event.sender.address)
        if refusal is not None:
            self._queue_id = None
            await filters.reset()
        self.connection.send(refusal or replies.SENDER_OK)

    async def _filtered_rcpt(self, filters: Filters, event: RcptTo, access: Verdict) -> None:
        verdict = await filters.rcpt(event.recipient)
        self._discard = self._discard or verdict.discard
        refusal = self._refused("rcpt", verdict, recipient=event.recipient.address)
        if refusal is None:
            self._add_recipient(event, access)
        self.connection.send(refusal or replies.RECIPIENT_OK)

    async def _filtered_data(self, filters: Filters, event: StartData) -> None:
        verdict = await filters.data()
        self._discard = self._discard or verdict.discard
        refusal = self._refused("data", verdict)
        if refusal is not None:
            self.connection.send(refusal)
            return
        if not filters.wants_content:
            self.connection.send(self._open_message(event))
            return
        self._drop_staged()
        mail = self.connection.mail
        assert mail is not None and self._queue_id is not None
        try:
            self._queue.prepare()  # a big message is staged in its folder
        except OSError as exc:
            log.error("queue: cannot stage a message: %s", exc)
            self.connection.send(replies.QUEUE_FAILED)
            return
        now = self._clock()
        self._staged = StagedMessage(
            queue_id=self._queue_id,
            envelope=staging.Envelope(
                sender=mail.sender.address, recipients=list(self._recipients)
            ),
            trace=self.received_header(self._queue_id, now),
            directory=self._staging_directory or ".",
        )
        self._staged_at = now
        self.connection.send(replies.OK if event.chunking else replies.START_DATA)

    def filter_message(self, event: MessageComplete) -> Coroutine[None, None, bool] | None:
        """At the end of data, what the filters say before the commit.

        None when there is nothing to ask; else a coroutine that either
        answers ``event`` itself (a refusal, a discard: it returns False) or
        readies the message for :meth:`end_message` (True).
        """
        if self._filters is None:
            return self._discarding() if self._discard else None
        return self._filter_message(self._filters, event)

    async def _discarding(self) -> bool:
        self._discard_unfiltered()
        return False

    def _discard_unfiltered(self) -> None:
        """An access table's DISCARD, without filters: 250, and the file dropped."""
        if self._writer is not None:
            self._queue_id = self._writer.id
        reply = self._discarded()
        self._drop_message()
        self.connection.send(reply)

    async def _filter_message(self, filters: Filters, event: MessageComplete) -> bool:
        staged, self._staged = self._staged, None
        if staged is None:
            if not self._discard or self._writer is None:
                return True  # nothing staged: the content went straight to its file
            reply = self._discarded()  # before the drop forgets the queue id
            self._drop_message()
            self.connection.send(reply)
            await filters.reset()
            return False
        try:
            staged.finish()
            verdict = await filters.message(staged)
            refusal = self._refused("end of data", verdict)
            if refusal is not None:
                metrics.message_refused(verdict.reason or "filter", event.size)
            # A message whose recipients the milters all took away goes nowhere.
            nobody = not staged.envelope.recipients
            if refusal is not None or verdict.discard or self._discard or nobody:
                # The discard's 250 names the queue id the message would have had.
                reply = refusal or self._discarded()
                self._queue_id = None
                self.connection.send(reply)
                return False
            self._writer, self._write_error = await self._write_staged(staged)
            return True
        finally:
            staged.close()

    async def _write_staged(
        self, staged: StagedMessage
    ) -> tuple[MessageWriter | None, QueueError | None]:
        """The staged message's queue file, written as the filters left it."""
        assert self._staged_at is not None
        envelope = self._envelope(self._staged_at, staged)
        try:
            writer = self._queue.open(envelope, queue_id=staged.queue_id)
        except QueueError as exc:
            log.error("queue: cannot open a message: %s", exc)
            return None, exc
        try:
            if staged.on_disk:
                # A big message: copying it waits on the disk, not for the loop.
                await asyncio.to_thread(staged.write_to, writer)
            else:
                staged.write_to(writer)
        except QueueError as exc:
            return writer, exc
        return writer, None

    def _discarded(self) -> Reply:
        # The client is told what it would be told of a message queued: a
        # discard is the filter's secret (as in Sendmail and Postfix).
        queue_id, self._queue_id = self._queue_id, None
        log.info(
            "%s discarded id=%s client=%s[%s] from=<%s>",
            self.id,
            queue_id,
            self._log_host(),
            self.client.address,
            self._sender(),
        )
        return replies.QUEUED.with_text(f"Submitted & queued ({queue_id})")

    def _refused(
        self,
        stage: str,
        verdict: Verdict,
        *,
        sender: str | None = None,
        recipient: str | None = None,
    ) -> Reply | None:
        """The verdict's reply when it refuses, logged; None to go on."""
        reply = verdict.reply
        if reply is None or reply.is_positive:
            return None
        details = [f"stage={stage.replace(' ', '-')}"]
        if sender is not None or stage not in ("connect", "helo"):
            details.append(f"from=<{sender if sender is not None else self._sender()}>")
        if recipient is not None:
            details.append(f"to=<{recipient}>")
        self._log_refusal(reply, verdict.reason or "filter", " ".join(details))
        return reply

    def _rcpt(self, event: RcptTo) -> Reply:
        refusal, access = self._recipient_refusal(event)
        if refusal is not None:
            return refusal
        self._add_recipient(event, access)
        return replies.RECIPIENT_OK

    def _sender_refusal(self, event: MailFrom) -> Reply | None:
        """The senders access table's refusal, logged; else its hold or discard
        (or the clients table's) is the new transaction's."""
        self._hold, self._discard = self._client_access.hold, self._client_access.discard
        if self._access is None:
            return None
        verdict = self._access.sender(event.sender.address)
        refusal = self._refused("mail", verdict, sender=event.sender.address)
        if refusal is None:
            self._hold = self._hold or verdict.hold
            self._discard = self._discard or verdict.discard
        return refusal

    def _add_recipient(self, event: RcptTo, access: Verdict) -> None:
        # A recipient's HOLD or DISCARD (``access``), once it is accepted, is
        # the whole message's (as in Postfix: one message, one queue file).
        self._hold = self._hold or access.hold
        self._discard = self._discard or access.discard
        address = event.recipient.address
        self._recipients.append(address)
        if event.notify is not None or event.orcpt is not None:
            notify = ",".join(event.notify) if event.notify is not None else None
            self._recipient_dsn[address] = (notify, event.orcpt)
        else:
            self._recipient_dsn.pop(address, None)

    def _recipient_refusal(self, event: RcptTo) -> tuple[Reply | None, Verdict]:
        """The policy's refusal of a recipient (unknown user, relaying, the
        access table), logged, and the access table's word on it.  The relay
        rules come first: no access entry makes a recipient the host may not
        relay to acceptable."""
        assert self.channel is not None
        refusal = self._check_recipient(self.channel, event.recipient)
        if refusal is not None:
            reason = _RECIPIENT_REASONS.get(refusal.enhanced, "recipient")
            details = f"from=<{self._sender()}> to=<{event.recipient.address}>"
            self._log_refusal(refusal, reason, details)
            return refusal, CONTINUE
        if self._access is None:
            return None, CONTINUE
        address = event.recipient.address
        access = self._access.recipient(address)
        return self._refused("rcpt", access, recipient=address), access

    def _open_message(self, event: StartData) -> Reply:
        self._drop_message()
        now = self._clock()
        try:
            self._writer = self._queue.open(self._envelope(now), queue_id=self._queue_id)
        except QueueError as exc:
            log.error("queue: cannot open a message: %s", exc)
            return replies.QUEUE_FULL if exc.full else replies.QUEUE_FAILED
        self._write(self.received_header(self._writer.id, now))
        return replies.OK if event.chunking else replies.START_DATA

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._write_error is not None:
            return
        try:
            self._writer.write(data)
        except QueueError as exc:
            # Keep reading the message; the end of data gets the 4xx.
            self._write_error = exc

    def end_message(self) -> tuple[MessageWriter | None, QueueError | None]:
        """The message whose data ended, for its commit, and a write error it met.

        The commit is the caller's (a shell may gather several into one);
        :meth:`answer_commit` then answers the end of data.
        """
        writer, error = self._writer, self._write_error
        self._writer, self._write_error = None, None
        return writer, error

    def answer_commit(
        self, event: MessageComplete, writer: MessageWriter | None, error: QueueError | None
    ) -> None:
        """250 for a message committed, 4xx for one that was not."""
        self.connection.send(self._commit_reply(event, writer, error))

    def _commit_reply(
        self, event: MessageComplete, writer: MessageWriter | None, error: QueueError | None
    ) -> Reply:
        if writer is None or error is not None:
            metrics.message_refused("queue", event.size)
        if writer is None:
            return replies.QUEUE_FAILED
        if error is not None:
            writer.abort()
            log.error("queue: message not queued: id=%s %s", writer.id, error)
            return replies.QUEUE_FULL if error.full else replies.QUEUE_FAILED
        self._queued += 1
        metrics.message_accepted(self.channel.name if self.channel else "", writer.size)
        log.info(
            "%s queued id=%s client=%s[%s] helo=%s from=<%s> to=%s size=%d channel=%s",
            self.id,
            writer.id,
            self._log_host(),
            self.client.address,
            self.connection.helo,
            self._sender(),
            ",".join(f"<{r}>" for r in self._recipients),
            writer.size,
            self.channel.name if self.channel else "",
        )
        return replies.QUEUED.with_text(f"Submitted & queued ({writer.id})")

    def _log_session(self, event: ConnectionClosed) -> None:
        end = event.reason
        channel = self.channel.name if self.channel else "-"
        metrics.session_ended(channel, end, self.tls is not None, self.connection.replies_sent)
        log.info(
            "session %s client=%s[%s] helo=%s channel=%s tls=%s messages=%d end=%s duration=%.3fs",
            self.id,
            self._log_host(),
            self.client.address,
            self.connection.helo or "",
            channel,
            "yes" if self.tls else "no",
            self._queued,
            end,
            time.monotonic() - self._started,
        )

    def _log_core_refusal(self, event: Refused) -> None:
        details = f"command={event.command}"
        sender = event.sender if event.sender is not None else self._transaction_sender
        if sender is not None:
            details += f" from=<{sender}>"
        self._log_refusal(event.reply, event.reason, details)

    def _envelope_details(self) -> str:
        recipients = ",".join(f"<{r}>" for r in self._recipients)
        return f"from=<{self._transaction_sender or ''}> to={recipients}"

    def tls_failed(self, problem: str) -> None:
        """The STARTTLS handshake failed (``problem`` says how): logged, and the end."""
        log.info(
            "%s TLS handshake failed client=%s[%s] helo=%s: %s",
            self.id,
            self._log_host(),
            self.client.address,
            self.connection.helo or "",
            problem,
        )
        self.connection.tls_failed()

    def _log_out_of_turn(self, event: OutOfTurn) -> None:
        details = f"after={event.command} input={_quoted(event.received)}"
        self._log_refusal(event.reply, event.reason, details)

    def _log_refusal(self, reply: Reply, reason: str, details: str = "") -> None:
        """One line a refusal, in a form fail2ban and the like can match."""
        metrics.count("mmdf_refusals", (reason,))
        queue_id = self._queue_id or (self._writer.id if self._writer is not None else None)
        if queue_id:  # the message's id, on every line about it
            details = f"id={queue_id} {details}".rstrip()
        log.info(
            "%s refused client=%s[%s] helo=%s reply=%s reason=%s%s",
            self.id,
            self._log_host(),
            self.client.address,
            self.connection.helo or "",
            _quoted(reply.lines()[0].encode()),
            reason,
            f" {details}" if details else "",
        )

    def _log_host(self) -> str:
        return self.client.host if not self.client.host.startswith("[") else "unknown"

    def _drop_message(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._writer, self._write_error = None, None
        self._drop_staged()
        self._queue_id = None

    def _drop_staged(self) -> None:
        if self._staged is not None:
            self._staged.close()
            self._staged = None

    def _sender(self) -> str:
        mail = self.connection.mail
        return mail.sender.address if mail else ""

    def _envelope(self, now: datetime, staged: StagedMessage | None = None) -> Envelope:
        mail = self.connection.mail
        assert mail is not None and self.channel is not None
        recipients = tuple(staged.envelope.recipients if staged else self._recipients)
        quarantine = staged.quarantine if staged else None
        # A recipient a milter added had no RCPT of its own: nothing asked.
        asked = [self._recipient_dsn.get(r, (None, None)) for r in recipients]
        return Envelope(
            sender=staged.envelope.sender if staged else mail.sender.address,
            recipients=recipients,
            channel=self.channel.name,
            remote_host=self.client.host,
            remote_addr=self.client.address,
            helo=self.connection.helo or "",
            received=now,
            tls=self.tls,
            smtputf8=mail.smtputf8,
            body=mail.body,
            quarantine=self._hold if self._hold is not None else quarantine,
            ret=mail.ret,
            envid=mail.envid,
            notify=tuple(n for n, _ in asked) if self._recipient_dsn else (),
            orcpt=tuple(o for _, o in asked) if self._recipient_dsn else (),
            crlf=True,
        )

    def received_header(self, queue_id: str, now: datetime) -> bytes:
        """The trace header of RFC 5321 4.4, with RFC 3848/6531 ``with`` words."""
        conn = self.connection
        mail = conn.mail
        smtputf8 = mail is not None and mail.smtputf8
        if smtputf8:
            protocol = "UTF8SMTPS" if self.tls else "UTF8SMTP"
        elif conn.esmtp:
            protocol = "ESMTPS" if self.tls else "ESMTP"
        else:
            protocol = "SMTPS" if self.tls else "SMTP"
        tcp_info = self.client.host
        if self.client.address:
            literal = address_literal(self.client.address)
            if literal != tcp_info:
                tcp_info = f"{tcp_info} {literal}"
        helo = conn.helo or ""
        if is_domain_or_literal(helo, utf8=smtputf8):
            lines = [f"Received: from {helo} ({tcp_info})"]
        else:
            # RFC 5321 4.4: From-domain is a Domain or an address literal.
            # A HELO that is neither (a ";" in it ends the fields early for
            # a parser, 8-bit octets break a header) goes in a comment, as
            # Postfix does, after the client's name or address.
            shown = _comment_text(helo, utf8=smtputf8)
            lines = [f"Received: from {self.client.host} ({tcp_info} HELO {shown})"]
        by = f"\tby {self.hostname} (mmdf-smtp)"
        if self.tls:
            by += f" (using {self.tls})"
        lines.append(by)
        lines.append(f"\twith {protocol} id {queue_id}")
        date = _date_text(now.replace(microsecond=0), now.utcoffset())
        if len(self._recipients) == 1:
            lines.append(f"\tfor <{self._recipients[0]}>; {date}")
        else:
            lines[-1] += f"; {date}"
        return ("\r\n".join(lines) + "\r\n").encode()
