"""Policy: which channel a client belongs to, and where it may send.

The seed's model: the ``channels`` argument lists channels in order; the
client is looked up in each channel's host table and the first that knows
it is the source channel.  Not found: the last channel, or, finicky, a
refusal.  A channel without ``relay = true`` may send only to the local
domains.  The protocol core never imports this package; the session asks
it through :class:`Policy`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ChannelConfig, Config
from ..filters import CONTINUE, Verdict
from ..protocol import Path, Reply, replies
from .access import AccessTables, Action, Entry, Stage
from .aliases import POSTMASTER, Aliases, unquote
from .hosts import HostTable, IPAddress, build_table, normalize_name

if TYPE_CHECKING:
    import dns.resolver

    from .nameserver import NameServer

__all__ = ["AccessTables", "DnsTemporaryError", "Identification", "Policy", "UnknownChannel"]

NAMESERVER = "nameserver"


class UnknownChannel(Exception):
    """A channel named on the command line that the configuration lacks."""


class DnsTemporaryError(Exception):
    """DNS could not answer now; try again later."""


@dataclass(frozen=True, slots=True)
class Identification:
    channel: ChannelConfig | None  # the source channel; None when refused
    client_name: str | None  # the name the client was known by, if any
    refusal: Reply | None  # the greeting to give instead of 220
    # The clients access table's word on it: a refusal, a hold or discard
    # of its mail, or go on; ``trusted``: its entry said OK (no blocklists).
    access: Verdict = CONTINUE
    trusted: bool = False


def literal(address: IPAddress | None) -> str:
    if address is None:
        return "unknown"
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


class Policy:
    """Channels, host tables, DNS and the recipient rules of one configuration.

    Tables are read here, so a reload is a new Policy; a bad table raises
    ConfigError and the old Policy stays in use.
    """

    def __init__(
        self,
        config: Config,
        resolver: dns.resolver.Resolver | None = None,
        *,
        access: bool = False,
    ) -> None:
        """``access``: read the ``[access]`` tables too (the SMTP servers'
        alone: a local submission is not asked, as in Postfix)."""
        self.config = config
        self._tables: dict[str, HostTable] = {}
        for name, channel in config.channels.items():
            file = None
            if channel.table and channel.table != NAMESERVER:
                file = pathlib.Path(channel.table)
            self._tables[name] = build_table(channel.hosts, file, f"channels.{name}.hosts")
        self._local_domains = {normalize_name(d) for d in config.local_domains}
        self.aliases = Aliases.of(config)
        delimiters = config.deliver.recipient_delimiter
        self.access = AccessTables.read(config.access, delimiters) if access else AccessTables()
        self._resolver = resolver
        self._nameserver: NameServer | None = None

    @property
    def nameserver(self) -> NameServer:
        if self._nameserver is None:
            # dnspython only for a policy that asks DNS: not submit's nor deliver's start.
            from .nameserver import NameServer, make_resolver

            self._nameserver = NameServer(self._resolver or make_resolver(self.config.dns))
        return self._nameserver

    def check_channels(self, channels: Sequence[str]) -> None:
        for name in channels:
            if name not in self.config.channels:
                known = ", ".join(self.config.channels) or "none"
                raise UnknownChannel(f"unknown channel {name!r} (configured: {known})")

    def remote_name(self, address: IPAddress) -> str | None:
        """The client's forward-confirmed name, or None (also when DNS fails)."""
        try:
            return self.nameserver.confirmed_name(address)
        except DnsTemporaryError:
            return None

    def identify(
        self,
        channels: Sequence[str],
        address: IPAddress | None,
        name: str | None,
        *,
        finicky: bool,
        us: str,
        local_address: IPAddress | None = None,
        dns: bool = True,
    ) -> Identification | None:
        """Choose the source channel for a client.

        May ask DNS, which blocks; with ``dns=False`` it never does, and
        returns None where the choice would need an answer from DNS (so an
        event loop can decide most clients at once and send the rest to a
        thread).
        """
        lookup = _Lookup(self, address, name, dns=dns)
        try:
            for channel_name in channels:
                channel = self.config.channels[channel_name]
                if self._knows(channel, lookup, local_address):
                    return self._identified(channel, lookup)
            if not finicky:
                return self._identified(self.config.channels[channels[-1]], lookup)
        except _DnsNeeded:
            return None
        except DnsTemporaryError:
            text = f"{us}: Cannot resolve your address {literal(address)}, try again later"
            return Identification(None, None, replies.CANNOT_RESOLVE.with_text(text))
        them = name or lookup.name_if_known or literal(address)
        text = f"{us}: Your name, '{them}', is unknown to us."
        return Identification(None, lookup.name_if_known, replies.UNKNOWN_HOST.with_text(text))

    def _identified(self, channel: ChannelConfig, lookup: _Lookup) -> Identification:
        """The client of ``channel``, with what the clients access table says of it."""
        entry = self._client_entry(lookup)
        if entry is None:
            return Identification(channel, lookup.name_if_known, None)
        return Identification(
            channel,
            lookup.name_if_known,
            None,
            access=entry.verdict(Stage.CLIENT),
            trusted=entry.action is Action.OK,
        )

    def _client_entry(self, lookup: _Lookup) -> Entry | None:
        """The address decides first: a client it names never waits on DNS."""
        table = self.access.clients
        if table is None:
            return None
        entry = table.by_address(lookup.address)
        if entry is None and table.needs_name:
            try:
                entry = table.by_name(lookup.name())
            except DnsTemporaryError:
                return None  # no verified name now: the names cannot match it
        return entry

    def _knows(
        self, channel: ChannelConfig, lookup: _Lookup, local_address: IPAddress | None
    ) -> bool:
        table = self._tables[channel.name]
        # An address entry decides without DNS: a known client is never kept
        # waiting on, or refused for, a look-up its channel does not need.
        if table.matches(lookup.address, None):
            return True
        if table.needs_name and table.matches(None, lookup.name()):
            return True
        if channel.table == NAMESERVER and lookup.address is not None:
            return self._known_to_dns(lookup, local_address)
        return False

    def _known_to_dns(self, lookup: _Lookup, local_address: IPAddress | None) -> bool:
        """RFC 974's loop rule: the own host is never found through DNS."""
        if lookup.address == local_address:
            return False
        confirmed = lookup.confirmed()
        if confirmed is None:
            return False
        own = normalize_name(self.config.hostname)
        if confirmed == own or confirmed in self._local_domains:
            return False
        return lookup.address not in self.nameserver.addresses(own)

    def check_recipient(self, channel: ChannelConfig, recipient: Path) -> Reply | None:
        """None when ``channel`` may send to ``recipient``; else the refusal."""
        domain = normalize_name(recipient.domain)
        if recipient.domain and domain not in self._local_domains:
            if channel.relay:
                return None
            return replies.RELAY_DENIED.with_text(f"Relaying denied for {recipient.domain}")
        if recipient.domain:
            # Accepted when any key covers it: an address, a name, a user or
            # the domain's catch-all (the order of Aliases.find, which
            # delivery expands by too).
            found = self.aliases.find(f"{recipient.local}@{domain}")
            return None if found is not None else replies.UNKNOWN_USER
        # Without a domain (RFC 5321 4.1.1.3's <postmaster>): the names, as
        # they always were; an extension only on postmaster.
        found = self.aliases.find(recipient.local)
        local = unquote(recipient.local).lower()
        if found is not None and found.key in (local, POSTMASTER):
            return None
        return replies.RELAY_DENIED


class _DnsNeeded(Exception):
    """The choice needs DNS, and the caller said not to ask."""


class _Lookup:
    """One client's DNS answers, asked at most once each."""

    def __init__(
        self, policy: Policy, address: IPAddress | None, name: str | None, *, dns: bool
    ) -> None:
        self._policy = policy
        self.address = address
        self._given = normalize_name(name) if name else None
        self._confirmed: str | None = None
        self._asked = False
        self._dns = dns

    def confirmed(self) -> str | None:
        if not self._asked and self.address is not None:
            if not self._dns:
                raise _DnsNeeded
            self._asked = True
            self._confirmed = self._policy.nameserver.confirmed_name(self.address)
        return self._confirmed

    def name(self) -> str | None:
        return self._given or self.confirmed()

    @property
    def name_if_known(self) -> str | None:
        return self._given or self._confirmed
