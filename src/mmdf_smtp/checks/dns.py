"""One bounded asynchronous DNS resolver for every check (dnspython's asyncresolver).

:class:`Resolver` answers a look-up with a typed :class:`Answer` or raises
:class:`DnsTemporaryError`:

- NXDOMAIN and NODATA ("no such name", "no record of that type") are
  answers: an empty :class:`Answer`, ``exists`` telling which one it was.
  Every check treats them as the RFCs say ("none", "not listed", ...).
- A timeout, SERVFAIL, REFUSED or no server answering is a temporary
  failure: :class:`DnsTemporaryError`.  The checks turn it into
  ``temperror`` (RFC 8601 2.7), never into an answer: a caller that read a
  failure as "no record" would let a forger pass by breaking DNS.

Answers are kept for their time to live (``cache_size`` of them, least
recently used first out; 0 keeps none): a mail host asks about the same
few senders' domains and blocklisted networks all day, and each answer
kept is a query, a socket and a parse saved.  dnspython's cache keeps
records, NODATA and NXDOMAIN (for the zone's negative TTL, RFC 2308),
never a failure: a SERVFAIL or timeout is asked again next time.

Every look-up is bounded: ``timeout`` for one query to one server,
``lifetime`` for the whole look-up (retries and servers included), and at
most ``max_in_flight`` look-ups under way at once (the others wait, and
their wait counts in their lifetime).  The look-up runs on the event loop
(dnspython's asyncio backend), never in a thread, so it never blocks the
loop.

Libraries that resolve synchronously (pyspf, dkimpy) run in a worker
thread and reach this resolver through :meth:`Resolver.blocking`, which
submits the look-up to the loop and waits at most the lifetime for it:
their DNS goes through the same bounds and the same servers.

``nameservers`` take the ``[dns] nameservers`` syntax ("host",
"host:port", "[v6]:port"); an empty list means the system's resolver
configuration (/etc/resolv.conf).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

DEFAULT_TIMEOUT = 5.0  # seconds for one query to one server
DEFAULT_LIFETIME = 10.0  # seconds for one whole look-up
DEFAULT_MAX_IN_FLIGHT = 256
# The EDNS payload size of DNS flag day 2020: large enough for DKIM keys and
# SPF records over UDP, small enough not to fragment.
EDNS_PAYLOAD = 1232


class DnsTemporaryError(Exception):
    """DNS could not answer now (timeout, SERVFAIL, no server): a temporary error."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The records of one name and type, as text (TXT: the strings joined, as bytes).

    ``exists`` is False for NXDOMAIN, True for NODATA or records.  ``ttl``
    is the answer's time to live in seconds (0 when there is no record).
    """

    name: str
    rdtype: str
    texts: tuple[str, ...] = ()
    txts: tuple[bytes, ...] = ()  # TXT and SPF only: each record's strings concatenated
    strings: tuple[tuple[bytes, ...], ...] = ()  # TXT and SPF only: each record's strings
    mx: tuple[tuple[int, str], ...] = ()  # MX only: (preference, exchange)
    ttl: int = 0
    exists: bool = True

    @property
    def empty(self) -> bool:
        return not self.texts


Lookup = Callable[[str, str], Answer]


def _split_server(server: str) -> tuple[str, int]:
    """ "host", "host:port" or "[v6]:port" (the ``[dns] nameservers`` syntax)."""
    text = server.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, "53"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{server!r}: a name server is an address, with an optional :port"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{server!r}: bad port")
    return host, int(port)


class Resolver:
    """The checks' DNS: typed answers, bounded in time and in look-ups at once."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        lifetime: float = DEFAULT_LIFETIME,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        cache_size: int = 0,
    ) -> None:
        if timeout <= 0 or lifetime <= 0:
            raise ValueError("DNS timeout and lifetime must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if cache_size < 0:
            raise ValueError("cache_size must be at least 0")
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in map(_split_server, nameservers)
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        if cache_size:
            resolver.cache = dns.resolver.LRUCache(cache_size)
        self._resolver = resolver
        self.timeout = timeout
        self.lifetime = lifetime
        self._max_in_flight = max_in_flight
        self._slots: asyncio.Semaphore | None = None

    async def query(self, name: str, rdtype: str) -> Answer:
        """Look ``name`` up; DnsTemporaryError when DNS cannot say now."""
        kind = rdtype.upper()
        try:
            return await asyncio.wait_for(self._query(name, kind), self.lifetime)
        except TimeoutError:
            # The lifetime includes the wait for a slot.
            raise DnsTemporaryError(f"{name} {kind}: no answer in {self.lifetime:g}s") from None

    async def _query(self, name: str, kind: str) -> Answer:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_in_flight)
        async with self._slots:
            try:
                answer = await self._resolver.resolve(
                    name, kind, search=False, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                return Answer(name=name, rdtype=kind, exists=False)
            except (dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
                return Answer(name=name, rdtype=kind)
            except dns.name.NameTooLong:
                # A name no server can hold has no records (a macro can make one).
                return Answer(name=name, rdtype=kind, exists=False)
            except dns.exception.DNSException as exc:
                # Timeout, LifetimeTimeout, NoNameservers (every server said
                # SERVFAIL or REFUSED), and any malformed answer.
                raise DnsTemporaryError(f"{name} {kind}: {exc}") from exc
        rrset = answer.rrset
        if rrset is None:
            return Answer(name=name, rdtype=kind)
        return _typed(name, kind, rrset)

    def blocking(self, loop: asyncio.AbstractEventLoop) -> Lookup:
        """A synchronous look-up for a worker thread, submitting to ``loop``.

        Never call the function it returns on the loop's own thread: it
        waits for the loop.
        """

        def lookup(name: str, rdtype: str) -> Answer:
            future = asyncio.run_coroutine_threadsafe(self.query(name, rdtype), loop)
            try:
                # query() ends within the lifetime; the margin is for the hop
                # between threads.
                return future.result(timeout=self.lifetime + 1.0)
            except TimeoutError:
                future.cancel()
                raise DnsTemporaryError(f"{name} {rdtype}: no answer") from None

        return lookup


def _typed(name: str, kind: str, rrset: dns.rrset.RRset) -> Answer:
    texts: list[str] = []
    txts: list[bytes] = []
    strings: list[tuple[bytes, ...]] = []
    mx: list[tuple[int, str]] = []
    for rdata in rrset:
        if rdata.rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
            parts = tuple(rdata.strings)
            strings.append(parts)
            txts.append(b"".join(parts))
            texts.append(b"".join(parts).decode("utf-8", "replace"))
        elif rdata.rdtype == dns.rdatatype.MX:
            exchange = rdata.exchange.to_text(omit_final_dot=True)
            mx.append((rdata.preference, exchange))
            texts.append(exchange)
        elif rdata.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            texts.append(rdata.address)
        elif rdata.rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
            texts.append(rdata.target.to_text(omit_final_dot=True))
        else:
            texts.append(rdata.to_text())
    return Answer(
        name=name,
        rdtype=kind,
        texts=tuple(texts),
        txts=tuple(txts),
        strings=tuple(strings),
        mx=tuple(mx),
        ttl=rrset.ttl,
    )
