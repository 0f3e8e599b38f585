"""Local submission: a message from a program on this host, made ready for the queue.

``submit`` (and the maildrop's pickup, for users who may not write the
spool) read a message as sendmail does: lines end in LF or CRLF, and
unless told otherwise a line holding a single "." ends it.  The stored
message has CRLF line ends, like one received over SMTP.

Who submits decides what the message may claim.  Root and the mail
system's user (without one, the spool's owner) are *trusted*: they may
name any envelope sender and source channel.  Anyone else sends as their
login name at the origin domain; a ``-f`` naming another address is
recorded in an ``X-Authentication-Warning:`` header, as sendmail does,
and the ``Received:`` header always names the login.

Recipients and the envelope sender given without a domain belong to the
origin domain (:func:`origin_domain`).  Each recipient passes the same
policy check smtpd makes at RCPT, for the source channel, before anything
is queued.
"""

from __future__ import annotations

import pwd
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, formataddr
from itertools import chain
from typing import Literal, Protocol

from .config import ChannelConfig, Config, ConfigError
from .filters import Connection, Verdict
from .filters.staged import Envelope as StagedEnvelope
from .filters.staged import StagedMessage
from .milter.config import MilterConfig
from .policy import Policy
from .protocol import MailFrom, Path, Reply, replies
from .protocol.grammar import GrammarError, parse_path
from .queue import Envelope, MessageWriter

LOCAL_CHANNEL = "local"
CRLF = b"\r\n"
# Lines longer than this are read and stored in parts, never whole in memory.
PIECE = 64 * 1024

# RFC 5322 2.2 and 4.5.1: field-name = 1*ftext (printable but ":"), with
# obs-field's optional white space before the colon.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


class SubmissionError(Exception):
    """The message cannot be submitted; the text says why, for the submitter."""


class AddressError(SubmissionError):
    """An address that is not an address (RFC 5321 4.1.2)."""

    def __init__(self, text: str, where: str) -> None:
        places = {"argument": "", "-f": " (-f)", "header": " in To, Cc or Bcc"}
        super().__init__(f"bad address syntax{places.get(where, '')}: {text!r}")
        self.in_message = where == "header"


class RecipientRefused(SubmissionError):
    """Policy refuses recipients, with the replies smtpd would give at RCPT."""

    def __init__(self, refusals: Sequence[tuple[str, Reply]]) -> None:
        super().__init__(
            "\n".join(f"<{address}>: {r.code} {r.enhanced} {r.text}" for address, r in refusals)
        )
        self.refusals = tuple(refusals)

    @property
    def unknown_user(self) -> bool:
        return any(r.enhanced == replies.UNKNOWN_USER.enhanced for _, r in self.refusals)


class NoRecipients(SubmissionError):
    def __init__(self, extract: bool) -> None:
        where = " (none on the command line, To, Cc or Bcc)" if extract else ""
        super().__init__(f"no recipients{where}")


class MessageTooBig(SubmissionError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"message too big: over {limit} octets (limits.message_size)")


class MailLoop(SubmissionError):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} Received headers: {replies.TOO_MANY_HOPS.text}")


class UnknownLogin(SubmissionError):
    def __init__(self, uid: int) -> None:
        super().__init__(f"no login name for uid {uid}")


class NotPermitted(SubmissionError):
    """An untrusted submitter asked for what only trusted ones may."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What the submitter asked for on the command line."""

    recipients: tuple[str, ...] = ()  # as given: each may hold a list, "a, b"
    sender: str | None = None  # -f: None when not given, "" or "<>" for the null path
    full_name: str | None = None  # -F
    extract: bool = False  # -t: recipients from To, Cc and Bcc too
    body: str | None = None  # -B: "7BIT" or "8BITMIME"
    channel: str | None = None  # the source channel; None for "local"
    # DSN (RFC 3461) as sendmail's -N, -R and -V ask it: NOTIFY for every
    # recipient (("NEVER",) or conditions), RET, and the envelope id.
    notify: tuple[str, ...] | None = None
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Submitter:
    """The user handing a message in, as the kernel knows them."""

    uid: int
    login: str
    full_name: str  # from the password file's GECOS field, "" when none
    trusted: bool

    @classmethod
    def of_uid(cls, uid: int, *, trusted: bool) -> Submitter:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            raise UnknownLogin(uid) from None
        # GECOS: the full name is the first comma-separated field; BSD's "&"
        # stands for the login name, capitalised.
        gecos = entry.pw_gecos.split(",", 1)[0].replace("&", entry.pw_name.capitalize())
        return cls(uid=uid, login=entry.pw_name, full_name=gecos.strip(), trusted=trusted)


def is_trusted(uid: int, config: Config) -> bool:
    """Root, the configured ``user``, or (without one) the spool's owner.

    The spool's owner can write queue files directly, so trusting it with
    the envelope grants nothing more.
    """
    if uid == 0:
        return True
    if config.user:
        try:
            return uid == pwd.getpwnam(config.user).pw_uid
        except KeyError:
            return False
    try:
        return config.spool.stat().st_uid == uid
    except OSError:
        return False


def origin_domain(config: Config) -> str:
    """The domain of addresses given without one, like Postfix's myorigin.

    The host name when it is a local domain, else the first local domain
    (so that ``alice`` is a local user), else the host name.
    """
    hostname = config.hostname.lower().rstrip(".")
    if hostname in config.local_domains or not config.local_domains:
        return hostname
    return config.local_domains[0]


# Reading the message.


class LineSource(Protocol):
    """Where a message is read from: a binary file, or stdin."""

    def readline(self, size: int = -1, /) -> bytes: ...


def read_lines(stream: LineSource, *, dot_ends: bool, limit: int) -> Iterator[bytes]:
    """The message on ``stream`` with CRLF line ends, in pieces.

    Each piece is a whole line ending in CRLF, or a part of a line longer
    than :data:`PIECE` (only a line's last part ends in CRLF).  A line may
    end in LF, CRLF, or at the end of input.  With ``dot_ends`` a line of a
    single "." ends the message (sendmail without ``-i``) and the rest of
    the input is left unread.  Raises :class:`MessageTooBig` past
    ``limit`` octets (0: no limit).
    """
    total = 0
    at_line_start = True
    carry = b""  # a CR at the end of a part: the next part may start with LF
    while True:
        chunk = stream.readline(PIECE)
        if not chunk:
            if at_line_start and not carry:
                return
            # The last line lacks its line end (a lone CR there is one).
            piece = CRLF
        else:
            data, carry = carry + chunk, b""
            if data.endswith(b"\n"):
                line = data[:-1]
                piece = (line[:-1] if line.endswith(b"\r") else line) + CRLF
            elif data.endswith(b"\r"):
                carry, piece = b"\r", data[:-1]
            else:
                piece = data
        if dot_ends and at_line_start and piece == b"." + CRLF:
            return
        if piece:
            total += len(piece)
            if limit and total > limit:
                raise MessageTooBig(limit)
            yield piece
            at_line_start = piece.endswith(CRLF)
        if not chunk:
            return


@dataclass(slots=True)
class Message:
    """A message split at the end of its header section."""

    headers: list[bytes]  # whole fields with their continuation lines, each ending in CRLF
    separated: bool  # an empty line ended the headers
    body: Iterator[bytes]

    def field_values(self, *names: str) -> Iterator[str]:
        """The unfolded values of the fields called ``names`` (lower case)."""
        for field in self.headers:
            name, value = split_field(field)
            if name in names:
                yield value

    def has(self, name: str) -> bool:
        return any(split_field(field)[0] == name for field in self.headers)

    def octets(self) -> Iterator[bytes]:
        """The message as read: headers, separator, body."""
        yield from self.headers
        if self.separated:
            yield CRLF
        yield from self.body


def read_headers(pieces: Iterator[bytes]) -> Message:
    """Read up to the end of the header section; the body stays unread.

    A first line ``From ...`` (an mbox separator) is dropped, as sendmail
    does.  A line that is neither a field nor a continuation ends the
    headers and starts the body, as if an empty line came first.
    """
    headers: list[bytes] = []
    line = bytearray()
    first = True
    for piece in pieces:
        line += piece
        if not piece.endswith(CRLF):
            continue
        whole, line = bytes(line), bytearray()
        if first and whole.startswith(b"From "):
            first = False
            continue
        first = False
        if whole == CRLF:
            return Message(headers, True, pieces)
        if whole[:1] in (b" ", b"\t") and headers:
            headers[-1] += whole
        elif _FIELD.match(whole):
            headers.append(whole)
        else:
            return Message(headers, False, chain([whole], pieces))
    return Message(headers, False, iter(()))


def split_field(field: bytes) -> tuple[str, str]:
    """A header field's name (lower case) and its unfolded value."""
    name, _, value = field.decode("utf-8", "surrogateescape").partition(":")
    value = re.sub(r"\r\n(?=[ \t])", "", value).removesuffix("\r\n")
    return name.strip().lower(), value.strip()


def split_addresses(text: str) -> list[str]:
    """The addresses of an RFC 5322 address list, as written.

    ``a@b, Name <c@d>, group: e@f;`` gives ``a@b``, ``c@d`` and ``e@f``.
    Display names, comments and group names are dropped; what is left of
    each item is its address, checked later (an item such as ``a b`` is
    kept whole, so that it fails the check rather than lose a word).
    """
    addresses: list[str] = []
    outside: list[str] = []
    angle: list[str] | None = None
    angled: str | None = None

    def end_item() -> None:
        nonlocal angled
        address = angled if angled is not None else "".join(outside).strip()
        if angled is not None or address:
            addresses.append(address)
        outside.clear()
        angled = None

    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in {'"', "["}:
            close = '"' if char == '"' else "]"
            j = i + 1
            while j < n and text[j] != close:
                j += 2 if text[j] == "\\" else 1
            token = text[i : j + 1]
            (angle if angle is not None else outside).append(token)
            i = j + 1
            continue
        if char == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "\\":
                    j += 1
                elif text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth -= 1
                j += 1
            outside.append(" ")
            i = j
            continue
        if angle is not None:
            if char == ">":
                angled, angle = "".join(angle).strip(), None
            else:
                angle.append(char)
        elif char == "<":
            angle = []
        elif char in ",;":
            end_item()
        elif char == ":":
            outside.clear()  # a group's display name
        else:
            outside.append(char)
        i += 1
    if angle is not None:
        outside.append("<" + "".join(angle))
    end_item()
    return addresses


# Deciding the envelope.


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The envelope and the header lines a submission gets."""

    channel: str
    sender: str
    recipients: tuple[str, ...]
    submitter: Submitter
    hostname: str
    from_header: str  # the From: to add when the message has none
    warning: str | None  # the X-Authentication-Warning: text, if any
    body: str | None
    smtputf8: bool
    notify: tuple[str, ...] | None = None
    ret: str | None = None
    envid: str | None = None


class Planner:
    """Addresses checked and completed for one configuration and policy."""

    def __init__(self, config: Config, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.origin = origin_domain(config)

    def channel(self, request: Request, submitter: Submitter) -> ChannelConfig:
        """The source channel: ``local`` unless a trusted submitter names another.

        Raises UnknownChannel for a name the configuration lacks, and
        ConfigError when that is ``local`` itself.
        """
        name = request.channel or LOCAL_CHANNEL
        if name != LOCAL_CHANNEL and not submitter.trusted:
            raise NotPermitted(f"only trusted users may choose the source channel ({name})")
        if name not in self.config.channels:
            if request.channel:
                self.policy.check_channels([name])
            raise ConfigError(
                f"{self.config.source}: channels.{LOCAL_CHANNEL}: not configured,"
                " and local submissions come from it"
            )
        return self.config.channels[name]

    def address(self, text: str, where: str) -> Path:
        """``text`` as a mailbox, with the origin domain added when it has none."""
        address = text.strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        if "@" not in address or address.endswith('"'):
            address = f"{address}@{self.origin}"
        try:
            address.encode("utf-8")
            return parse_path(f"<{address}>", bad=replies.BAD_RECIPIENT_ADDRESS, allow_null=False)
        except (GrammarError, UnicodeEncodeError):
            raise AddressError(text, where) from None

    def recipients(
        self, channel: ChannelConfig, texts: Iterable[tuple[str, str]]
    ) -> tuple[str, ...]:
        """Each (text, where it came from) parsed, completed, checked; no duplicates."""
        found: dict[tuple[str, str], str] = {}
        refusals: list[tuple[str, Reply]] = []
        for text, where in texts:
            for item in split_addresses(text):
                path = self.address(item, where)
                key = (path.local, path.domain.lower())
                if key in found:
                    continue
                refusal = self.policy.check_recipient(channel, path)
                if refusal is not None:
                    refusals.append((path.address, refusal))
                found[key] = path.address
        if refusals:
            raise RecipientRefused(refusals)
        return tuple(found.values())

    def sender(self, request: Request, submitter: Submitter) -> tuple[str, str | None, bool]:
        """The envelope sender; what an untrusted ``-f`` claimed instead; and
        whether a From: made up for the message names the submitter."""
        own = f"{submitter.login}@{self.origin}"
        if request.sender is None:
            return own, None, True
        if request.sender.strip() in ("", "<>"):
            return ("", None, True) if submitter.trusted else (own, "<>", True)
        path = self.address(request.sender, "-f")
        if self._own_address(path, submitter):
            return path.address, None, True
        if submitter.trusted:
            return path.address, None, False
        return own, path.address, True

    def _own_address(self, path: Path, submitter: Submitter) -> bool:
        local = {self.origin, self.config.hostname.lower(), *self.config.local_domains}
        return path.local.lower() == submitter.login.lower() and path.domain.lower() in local

    def plan(self, request: Request, submitter: Submitter, message: Message | None = None) -> Plan:
        """The envelope for ``request``; without ``message``, from the arguments alone.

        Raises :class:`SubmissionError`: a bad address, a refused recipient,
        no recipients, a channel the submitter may not choose, a mail loop.
        """
        channel = self.channel(request, submitter)
        if message is not None:
            # A local program that feeds mail back in (a pipe in a .forward)
            # loops like a relay does; the same limit as smtpd's stops it.
            hops = sum(1 for field in message.headers if split_field(field)[0] == "received")
            if hops > self.config.limits.received_headers:
                raise MailLoop(hops)
        sender, claimed, own = self.sender(request, submitter)
        texts = [(text, "argument") for text in request.recipients]
        if request.extract and message is not None:
            texts += [(v, "header") for v in message.field_values("to", "cc", "bcc")]
        recipients = self.recipients(channel, texts)
        if not recipients and (message is not None or not request.extract):
            raise NoRecipients(request.extract)
        full_name = request.full_name or (submitter.full_name if own else "")
        author = sender or f"{submitter.login}@{self.origin}"
        warning = None
        if claimed is not None:
            warning = f"{self.config.hostname}: {submitter.login} set sender to {claimed} using -f"
        return Plan(
            channel=channel.name,
            sender=sender,
            recipients=recipients,
            submitter=submitter,
            hostname=self.config.hostname,
            from_header=mailbox(_CONTROLS.sub(" ", full_name).strip(), author),
            warning=warning,
            body=request.body,
            smtputf8=not all(a.isascii() for a in (sender, *recipients)),
            notify=request.notify,
            ret=request.ret,
            envid=request.envid,
        )


def mailbox(name: str, address: str) -> str:
    """``Name <address>`` for a header: the name quoted, or RFC 2047-encoded
    when not ASCII; the address as it is (UTF-8 under SMTPUTF8)."""
    if not name:
        return address
    # formataddr quotes and encodes the name, but refuses a UTF-8 address.
    placeholder = "x@x"
    return formataddr((name, placeholder)).removesuffix(f"<{placeholder}>") + f"<{address}>"


# Writing it to the queue.


def envelope(plan: Plan, now: datetime, staged: StagedMessage | None = None) -> Envelope:
    """The envelope to queue; as the milters left it, for a ``staged`` message."""
    recipients = tuple(staged.envelope.recipients) if staged else plan.recipients
    notify = ",".join(plan.notify) if plan.notify else None
    return Envelope(
        sender=staged.envelope.sender if staged else plan.sender,
        recipients=recipients,
        channel=plan.channel,
        remote_host="localhost",
        remote_addr="",
        helo="",
        received=now,
        smtputf8=plan.smtputf8,
        body=plan.body,
        submitter=plan.submitter.login,
        submitter_uid=plan.submitter.uid,
        quarantine=staged.quarantine if staged else None,
        ret=plan.ret,
        envid=plan.envid,
        notify=(notify,) * len(recipients) if notify else (),
        crlf=True,
    )


def head(plan: Plan, message: Message, queue_id: str, now: datetime) -> bytes:
    """Everything before the body: trace, the message's headers, the ones added.

    Bcc is removed, as Postfix does for local submissions: its addresses
    are in the envelope, and must not reach the other recipients.  Date,
    Message-ID and From are added, after the message's own, when missing.
    """
    date = format_datetime(now.astimezone())
    lines = [
        f"Received: (from {plan.submitter.login}@localhost)",
        f"\tby {plan.hostname} (mmdf-smtp) id {queue_id}; {date}",
    ]
    if plan.warning is not None:
        lines.append(f"X-Authentication-Warning: {plan.warning}")
    trace = "".join(line + "\r\n" for line in lines).encode()
    kept = b"".join(f for f in message.headers if split_field(f)[0] != "bcc")
    added = []
    if not message.has("from"):
        added.append(f"From: {plan.from_header}")
    if not message.has("date"):
        added.append(f"Date: {date}")
    if not message.has("message-id"):
        added.append(f"Message-ID: <{queue_id}@{plan.hostname}>")
    return trace + kept + "".join(line + "\r\n" for line in added).encode()


def queue_message(
    open_message: Callable[[Envelope], MessageWriter],
    plan: Plan,
    message: Message,
    now: datetime,
    *,
    queue_id: str,
    milters: Sequence[MilterConfig] = (),
    staging_directory: str | None = None,
) -> str:
    """Write the message through ``open_message`` and commit it; its queue id.

    ``queue_id`` is the id ``open_message`` gives its writer (it is in the
    trace header, written first).  With ``milters`` (those configured with
    ``submit = true``) the message is staged first and queued as they
    leave it, as smtpd does; a refusal raises :class:`FilterRefused`.

    Any error (a :class:`QueueError`, :class:`MessageTooBig` while the body
    is read, an interrupt) aborts the message, so nothing of it stays.
    """
    if milters:
        import asyncio  # a submission without milters runs no event loop

        staged = asyncio.run(
            _filtered(
                plan,
                message,
                now=now,
                queue_id=queue_id,
                milters=milters,
                staging_directory=staging_directory,
            )
        )
        if staged is None:
            return queue_id  # discarded: taken, and dropped, as the milter asked
        try:
            writer = open_message(envelope(plan, now, staged))
            try:
                staged.write_to(writer)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        finally:
            staged.close()
        return writer.id
    writer = open_message(envelope(plan, now))
    try:
        for piece in _octets(plan, message, queue_id, now):
            writer.write(piece)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return writer.id


def _octets(plan: Plan, message: Message, queue_id: str, now: datetime) -> Iterator[bytes]:
    """The message as queued: trace and header, then the body as read."""
    yield head(plan, message, queue_id, now)
    body = iter(message.body)
    first = next(body, None)
    if message.separated or first is not None:
        yield CRLF
    if first is not None:
        yield first
        yield from body


class FilterRefused(SubmissionError):
    """A milter refused the message: its reply, and whether to try again later."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(" ".join(reply.lines()))
        self.reply = reply
        self.temporary = reply.code < 500


async def _filtered(
    plan: Plan,
    message: Message,
    *,
    now: datetime,
    queue_id: str,
    milters: Sequence[MilterConfig],
    staging_directory: str | None,
) -> StagedMessage | None:
    """The message staged and through the milters, as a local client's would be;
    None when a milter discards it.

    Postfix hands locally submitted mail to its non_smtpd_milters as from
    ``localhost [127.0.0.1]``, so do we.  Raises :class:`FilterRefused`.
    """
    from .filters.combined import SessionFilters  # the milter client, for milters only

    filters = SessionFilters(
        Connection(
            client_name="localhost",
            client_address="127.0.0.1",
            client_port=0,
            local_address="127.0.0.1",
            local_port=0,
            hostname=plan.hostname,
        ),
        checks=None,
        milters=milters,
    )
    staged = StagedMessage(
        queue_id=queue_id,
        envelope=StagedEnvelope(sender=plan.sender, recipients=list(plan.recipients)),
        trace=b"",
        directory=staging_directory or tempfile.gettempdir(),
    )
    try:
        for piece in _octets(plan, message, queue_id, now):
            staged.write(piece)
        sender = _path(plan.sender)
        body: Literal["7BIT", "8BITMIME"] | None = None
        if plan.body in ("7BIT", "8BITMIME"):
            body = "8BITMIME" if plan.body == "8BITMIME" else "7BIT"
        mail = MailFrom(sender=sender, body=body, smtputf8=plan.smtputf8)
        stages = [filters.connect(), filters.helo("localhost", None), filters.mail(mail, queue_id)]
        stages += [filters.rcpt(_path(recipient)) for recipient in plan.recipients]
        stages.append(filters.data())
        discard = False
        for stage in stages:
            discard = _refuse(await stage) or discard
        staged.finish()
        discard = _refuse(await filters.message(staged)) or discard
    except BaseException:
        staged.close()
        raise
    finally:
        await filters.close()
    if discard or not staged.envelope.recipients:
        staged.close()
        return None
    return staged


def _refuse(verdict: Verdict) -> bool:
    """Raise a refusal; else whether the message is to be discarded."""
    if verdict.reply is not None and not verdict.reply.is_positive:
        raise FilterRefused(verdict.reply)
    return verdict.discard


def _path(address: str) -> Path:
    local, _, domain = address.rpartition("@")
    return Path(local=local, domain=domain) if local else Path(local=address, domain="")
