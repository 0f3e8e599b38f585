"""Everything a session needs that outlives it: configuration, policy, queue, TLS.

Both ``smtpsrvr`` and the daemon build one :class:`Service` and ask it for
a :class:`~mmdf_smtp.session.Session` per client.  A reload (SIGHUP) builds
a new Service; sessions already running keep the one they started with.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from .checks.dns import Resolver
from .checks.gate import Checks
from .config import Config, load
from .filters import Connection
from .filters.combined import SessionFilters
from .policy import Policy
from .queue import Queue, open_backend
from .queue.spool import IN_MEMORY
from .session import Client, Session, address_literal
from .shells.tls import server_context

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Peer:
    """The client as the shell found it."""

    address: IPAddress | None
    local_address: IPAddress | None = None
    name: str | None = None  # a host name given by the caller, trusted as the seed did
    port: int = 0  # 0 when unknown
    local_port: int = 0


@functools.lru_cache(maxsize=4096)  # clients come back; parsing an address is not cheap
def parse_address(text: str) -> IPAddress | None:
    """An address from ``[192.0.2.7]``, ``[IPv6:…]`` or a bare address.

    IPv4-mapped IPv6 addresses (from a dual-stack socket) become IPv4, so
    that tables and Received show the address the client really has.
    """
    body = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if body[:5].lower() == "ipv6:":
        body = body[5:]
    try:
        address = ipaddress.ip_address(body.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _address_text(address: IPAddress) -> str:
    return str(address)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    config: Config
    policy: Policy
    queue: Queue
    tls_context: ssl.SSLContext | None
    channels: tuple[str, ...]
    finicky: bool
    hostname: str
    # The built-in checks' DNS and threads, shared by the sessions; None
    # without [auth] and [dnsbl].
    checks: Checks | None = None

    @classmethod
    def load(
        cls,
        config_path: str | None,
        channels: Sequence[str],
        *,
        finicky: bool,
        hostname: str | None = None,
    ) -> Service:
        """Read configuration, tables and certificates.

        Raises ConfigError (or UnknownChannel for a channel the configuration
        does not define), so a bad reload leaves the running service alone.
        """
        config = load(config_path)
        policy = Policy(config, access=True)
        policy.check_channels(channels)
        return cls(
            config=config,
            policy=policy,
            queue=open_backend(config, in_memory=IN_MEMORY),
            tls_context=server_context(config.tls) if config.tls else None,
            channels=tuple(channels),
            finicky=finicky,
            hostname=hostname or config.hostname,
            checks=_checks(config),
        )

    def session(self, peer: Peer) -> Session:
        """Identify the client (DNS may be asked: this blocks) and greet it."""
        session = self._session(peer, dns=True)
        assert session is not None  # with DNS, every client is decided
        return session

    def session_without_dns(self, peer: Peer) -> Session | None:
        """The session, when the client is decided without asking DNS; else None."""
        return self._session(peer, dns=False)

    def _session(self, peer: Peer, *, dns: bool) -> Session | None:
        who = self.policy.identify(
            self.channels,
            peer.address,
            peer.name,
            finicky=self.finicky,
            us=self.hostname,
            local_address=peer.local_address,
            dns=dns,
        )
        if who is None:
            return None
        address = _address_text(peer.address) if peer.address is not None else ""
        host = who.client_name or peer.name or (address_literal(address) if address else "unknown")
        filters = None
        if who.channel is not None and who.channel.checks and self.config.filters:
            local = _address_text(peer.local_address) if peer.local_address else ""
            filters = SessionFilters(
                Connection(
                    client_name=host,
                    client_address=address,
                    client_port=peer.port,
                    local_address=local,
                    local_port=peer.local_port,
                    hostname=self.hostname,
                ),
                checks=self.checks,
                milters=self.config.milters,
                # An OK in the clients access table lets the client past the blocklists.
                dnsbl=not who.trusted,
            )
        return Session(
            hostname=self.hostname,
            client=Client(host=host, address=address, port=peer.port),
            channel=who.channel,
            refusal=who.refusal,
            check_recipient=self.policy.check_recipient,
            # Every channel's, checks = false or not: the administrator's own list.
            access=self.policy.access,
            client_access=who.access,
            queue=self.queue,
            limits=self.config.limits,
            tls_available=self.tls_context is not None,
            filters=filters,
            # Only filters that read the content stage it; a path join costs a
            # session more than its identification does.
            staging_directory=str(self.config.spool / "tmp") if filters is not None else None,
        )


def _checks(config: Config) -> Checks | None:
    """The built-in checks, when configured.  No thread starts until a session asks."""
    if config.auth is None and config.dnsbl is None:
        return None
    resolver = Resolver(
        config.dns.nameservers, lifetime=config.dns.timeout, cache_size=config.dns.cache_size
    )
    return Checks(auth=config.auth, dnsbl=config.dnsbl, resolver=resolver)
