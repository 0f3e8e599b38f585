"""Access tables: the administrator's own list of clients, senders and recipients.

As Postfix's access(5) maps for ``check_client_access``,
``check_sender_access`` and ``check_recipient_access``: one entry a line,
``KEY ACTION [text]``, blank lines ignored.  Keys are
compared in lower case; a line whose first non-blank character is ``#``
is a comment (elsewhere ``#`` is text, as in Postfix's tables).

Sender and recipient keys, most specific first (Postfix's order)::

    user@domain     that address (also ``user+ext@domain`` without an entry of its own)
    domain          that domain exactly
    .domain         any name below it, the nearest parent first
    user@           that local part at any domain (``user+ext@`` first)
    <>              the null sender (senders only)

Client keys: an address, a network (``192.0.2.0/24``, ``2001:db8::/32``;
the longest prefix first), a host name (the client's verified name) or a
``.domain`` below which it lies.  The address decides before the name, so
a client matched by address never waits on DNS for its name.

Actions: ``OK``, ``REJECT [text]``, ``DEFER [text]``, ``HOLD [text]``,
``DISCARD [text]``, or a reply of its own, ``4NN text`` / ``5NN text``
(an enhanced status code after it is kept, else one is made up).

Everything is read once, into dictionaries and one sorted list of
networks: a look-up reads no file.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AccessConfig, ConfigError, read_text
from ..filters import CONTINUE, Verdict
from ..protocol import Reply
from .aliases import base_name, unquote
from .hosts import _LOOKS_NUMERIC, _NAME, IPAddress, normalize_address, normalize_name

NULL_SENDER = "<>"


class Action(enum.Enum):
    OK = "OK"
    REJECT = "REJECT"
    DEFER = "DEFER"
    HOLD = "HOLD"
    DISCARD = "DISCARD"
    REPLY = "REPLY"  # an explicit 4NN / 5NN reply


class Stage(enum.Enum):
    """Where a table is asked; each names itself in its default texts."""

    CLIENT = "Client host"
    SENDER = "Sender address"
    RECIPIENT = "Recipient address"


_CODE = re.compile(r"([45])[0-5][0-9]")
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")
_TEXT_ACTIONS = {Action.REJECT, Action.DEFER, Action.HOLD, Action.DISCARD}


@dataclass(frozen=True, slots=True)
class Entry:
    """One table entry's action; ``reply`` is set for REPLY only."""

    action: Action
    text: str = ""
    reply: Reply | None = None

    def verdict(self, stage: Stage) -> Verdict:
        """What the session does: a refusal, a hold, a discard, or go on."""
        match self.action:
            case Action.REJECT:
                text = self.text or f"{stage.value} rejected: Access denied"
                return _refusal(Reply(code=550, enhanced="5.7.1", text=text), stage)
            case Action.DEFER:
                text = self.text or f"{stage.value} deferred: Try again later"
                return _refusal(Reply(code=450, enhanced="4.7.1", text=text), stage)
            case Action.REPLY:
                assert self.reply is not None
                return _refusal(self.reply, stage)
            case Action.HOLD:
                return Verdict(hold=self.text or f"{stage.value} held by access table")
            case Action.DISCARD:
                return Verdict(discard=True, reason="access")
        return CONTINUE


def _refusal(reply: Reply, stage: Stage) -> Verdict:
    if stage is Stage.CLIENT:
        # Before the greeting only two refusals exist: 554, after which the
        # client may only QUIT (RFC 5321 3.1), and 421, which closes.
        code = 554 if reply.code >= 500 else 421
        reply = Reply(code=code, enhanced=reply.enhanced, text=reply.text)
    return Verdict(reply=reply, reason="access")


def parse_action(words: str) -> Entry:
    """``ACTION [text]``; ValueError saying what is wrong."""
    name, _, text = words.strip().partition(" ")
    text = text.strip()
    if text and not (text.isascii() and text.isprintable()):
        raise ValueError(f"{text!r}: reply text must be printable ASCII")
    if code := _CODE.fullmatch(name):
        first, _, rest = text.partition(" ")
        enhanced = _ENHANCED.fullmatch(first)
        if enhanced is not None and enhanced.group(1) != code.group(1):
            raise ValueError(f"{name} {first}: the enhanced code's class differs from the reply's")
        if enhanced is None:
            first, rest = f"{code.group(1)}.7.1", text
        if not rest.strip():
            raise ValueError(f"{name}: a reply needs its text")
        return Entry(Action.REPLY, reply=Reply(code=int(name), enhanced=first, text=rest.strip()))
    try:
        action = Action(name.upper())
    except ValueError:
        raise ValueError(
            f"{name!r}: unknown action (OK, REJECT, DEFER, HOLD, DISCARD, 4NN text, 5NN text)"
        ) from None
    if action is Action.REPLY:
        raise ValueError(f"{name!r}: unknown action")
    if text and action not in _TEXT_ACTIONS:
        raise ValueError(f"{action.value} takes no text")
    return Entry(action, text)


def split_line(line: str) -> tuple[str, str] | None:
    """(key, action and text) of one line; None for a blank or comment line."""
    body = line.strip()
    # As in Postfix's tables, only a whole line is a comment: a reply's text may hold "#".
    if not body or body.startswith("#"):
        return None
    parts = body.split(None, 1)
    if len(parts) < 2:
        raise ValueError(f"{parts[0]!r}: no action after the key")
    return parts[0], " ".join(parts[1].split())


@dataclass(slots=True)
class AddressTable:
    """A senders' or recipients' table."""

    addresses: dict[str, Entry] = field(default_factory=dict)  # "user@domain"
    domains: dict[str, Entry] = field(default_factory=dict)  # "domain"
    below: dict[str, Entry] = field(default_factory=dict)  # ".domain", kept without its dot
    locals: dict[str, Entry] = field(default_factory=dict)  # "user@", kept without its @
    null: Entry | None = None  # "<>"

    def add(self, key: str, entry: Entry, *, senders: bool) -> None:
        key = key.lower()
        if key == NULL_SENDER:
            if not senders:
                raise ValueError("<> is the null sender: a senders table's key only")
            self.null = entry
            return
        local, at, domain = key.rpartition("@")
        if not at:
            domain = key
        elif not local or "@" in local:
            raise ValueError(f"{key!r}: not an address, domain, .domain or user@")
        if at and not domain:
            self.locals[local] = entry
            return
        dot = domain.startswith(".")
        name = domain[1:] if dot and not at else domain
        if not _NAME.fullmatch(name):
            raise ValueError(f"{key!r}: not an address, domain, .domain or user@")
        if at:
            self.addresses[key] = entry
        elif dot:
            self.below[name] = entry
        else:
            self.domains[name] = entry

    def lookup(self, address: str, delimiters: str) -> Entry | None:
        """The most specific entry for ``address`` ("" the null sender)."""
        if not address:
            return self.null
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        local = unquote(local).lower()
        domain = normalize_name(domain)
        base = base_name(local, delimiters)
        if domain:
            for key in (f"{local}@{domain}", f"{base}@{domain}"):
                if (entry := self.addresses.get(key)) is not None:
                    return entry
            if (entry := self.domains.get(domain)) is not None:
                return entry
            parent = domain
            while "." in parent:
                parent = parent.split(".", 1)[1]
                if (entry := self.below.get(parent)) is not None:
                    return entry
        return self.locals.get(local) or self.locals.get(base)


@dataclass(slots=True)
class ClientTable:
    addresses: dict[IPAddress, Entry] = field(default_factory=dict)
    # Networks by IP version and prefix length: a client costs a look-up a
    # length the table uses, longest first, however many networks it holds
    # (a country's blocks run to thousands).
    # Each keyed by its first address as an integer.
    networks: dict[tuple[int, int], dict[int, Entry]] = field(default_factory=dict)
    _lengths: list[tuple[int, int]] = field(default_factory=list)  # the keys above, longest first
    names: dict[str, Entry] = field(default_factory=dict)
    below: dict[str, Entry] = field(default_factory=dict)  # ".domain", kept without its dot

    @property
    def needs_name(self) -> bool:
        return bool(self.names or self.below)

    def add(self, key: str, entry: Entry) -> None:
        try:
            network = ipaddress.ip_network(key, strict=False)
        except ValueError:
            network = None
        if network is not None:
            if "/" in key:
                length = (network.version, network.prefixlen)
                if length not in self.networks:
                    self._lengths.append(length)
                    self._lengths.sort(key=lambda length: -length[1])
                self.networks.setdefault(length, {})[int(network.network_address)] = entry
            else:
                self.addresses[normalize_address(network.network_address)] = entry
            return
        name = normalize_name(key)
        if name.startswith(".") and _NAME.fullmatch(name[1:]):
            self.below[name[1:]] = entry
        elif _NAME.fullmatch(name) and not _LOOKS_NUMERIC.fullmatch(name):
            self.names[name] = entry
        else:
            raise ValueError(f"{key!r}: not an address, network, host name or .domain")

    def by_address(self, address: IPAddress | None) -> Entry | None:
        if address is None:
            return None
        address = normalize_address(address)
        if (entry := self.addresses.get(address)) is not None:
            return entry
        number, bits = int(address), address.max_prefixlen
        for version, prefix in self._lengths:
            if version == address.version:
                first = number >> (bits - prefix) << (bits - prefix)
                if (entry := self.networks[version, prefix].get(first)) is not None:
                    return entry
        return None

    def by_name(self, name: str | None) -> Entry | None:
        if not name:
            return None
        name = normalize_name(name)
        if (entry := self.names.get(name)) is not None:
            return entry
        while "." in name:
            name = name.split(".", 1)[1]
            if (entry := self.below.get(name)) is not None:
                return entry
        return None


def parse_address_table(lines: Mapping[int, str], where: str, *, senders: bool) -> AddressTable:
    table = AddressTable()
    for number, line in lines.items():
        try:
            if (split := split_line(line)) is not None:
                table.add(split[0], parse_action(split[1]), senders=senders)
        except ValueError as exc:
            raise ConfigError(f"{where}:{number}: {exc}") from None
    return table


def parse_client_table(lines: Mapping[int, str], where: str) -> ClientTable:
    table = ClientTable()
    for number, line in lines.items():
        try:
            if (split := split_line(line)) is not None:
                table.add(split[0], parse_action(split[1]))
        except ValueError as exc:
            raise ConfigError(f"{where}:{number}: {exc}") from None
    return table


def _numbered(path: Path) -> dict[int, str]:
    return dict(enumerate(read_text(path, "access table").splitlines(), 1))


@dataclass(frozen=True, slots=True)
class AccessTables:
    """The three tables of ``[access]``; an absent one matches nothing."""

    clients: ClientTable | None = None
    senders: AddressTable | None = None
    recipients: AddressTable | None = None
    delimiters: str = ""  # recipient_delimiter: "alice+tag" is also alice

    @classmethod
    def read(cls, config: AccessConfig, delimiters: str) -> AccessTables:
        """Read and check the files; ConfigError names the file, the line and the fault."""
        clients = senders = recipients = None
        if config.clients is not None:
            clients = parse_client_table(_numbered(config.clients), str(config.clients))
        if config.senders is not None:
            lines = _numbered(config.senders)
            senders = parse_address_table(lines, str(config.senders), senders=True)
        if config.recipients is not None:
            lines = _numbered(config.recipients)
            recipients = parse_address_table(lines, str(config.recipients), senders=False)
        return cls(clients, senders, recipients, delimiters)

    def sender(self, address: str) -> Verdict:
        if self.senders is None:
            return CONTINUE
        entry = self.senders.lookup(address, self.delimiters)
        return entry.verdict(Stage.SENDER) if entry is not None else CONTINUE

    def recipient(self, address: str) -> Verdict:
        if self.recipients is None:
            return CONTINUE
        entry = self.recipients.lookup(address, self.delimiters)
        return entry.verdict(Stage.RECIPIENT) if entry is not None else CONTINUE
