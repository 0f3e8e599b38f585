"""DNS for policy: forward-confirmed reverse names (FCrDNS), via dnspython.

A name is *confirmed* for an address when a PTR record of the address
names it and that name has an A/AAAA record equal to the address.  A DNS
failure (SERVFAIL, timeout, no server answering) is reported as
:class:`DnsTemporaryError`, never as "not found": a caller that turned a
failure into an answer would let policy be bypassed by breaking DNS.
"""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from ..config import DnsConfig, split_listen
from . import DnsTemporaryError
from .hosts import IPAddress, normalize_address, normalize_name

_NOT_FOUND = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)
_TEMPORARY = (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout)
# A PTR set with more names than this is not worth chasing (and is a trick).
MAX_PTR_NAMES = 10


def make_resolver(config: DnsConfig) -> dns.resolver.Resolver:
    if config.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        servers, ports = [], {}
        for server in config.nameservers:
            host, port = split_listen(server, default_port=53)
            servers.append(host)
            ports[host] = port
        resolver.nameservers = servers
        resolver.nameserver_ports = ports
    else:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.timeout = config.timeout
    resolver.lifetime = config.timeout
    if config.cache_size:
        resolver.cache = dns.resolver.LRUCache(config.cache_size)
    return resolver


class NameServer:
    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self._resolver = resolver

    def _query(self, name: dns.name.Name | str, rdtype: dns.rdatatype.RdataType) -> list[str]:
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
        except _NOT_FOUND:
            return []
        except _TEMPORARY as exc:
            raise DnsTemporaryError(f"{name} {rdtype.name}: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"{name} {rdtype.name}: {exc}") from exc
        return [rdata.to_text() for rdata in answer]

    def addresses(self, name: str) -> set[IPAddress]:
        """A and AAAA of ``name``; empty when it has none."""
        found: set[IPAddress] = set()
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for text in self._query(name, rdtype):
                found.add(ipaddress.ip_address(text))
        return found

    def confirmed_name(self, address: IPAddress) -> str | None:
        """The forward-confirmed reverse name of ``address``, or None."""
        address = normalize_address(address)
        names = self._query(dns.reversename.from_address(str(address)), dns.rdatatype.PTR)
        rdtype = dns.rdatatype.A if address.version == 4 else dns.rdatatype.AAAA
        failure: DnsTemporaryError | None = None
        for name in names[:MAX_PTR_NAMES]:
            try:
                forward = self._query(name, rdtype)
            except DnsTemporaryError as exc:
                failure = exc
                continue
            if any(_same(text, address) for text in forward):
                return normalize_name(name)
        if failure is not None:
            raise failure
        return None


def _same(text: str, address: IPAddress) -> bool:
    try:
        return normalize_address(ipaddress.ip_address(text)) == address
    except ValueError:
        return False
