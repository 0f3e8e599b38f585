"""DNS blocklists and allow lists at connect, in Postfix postscreen's model.

A site is written as ``postscreen_dnsbl_sites`` writes it::

    zone[=filter][*weight]

- ``zone``: the list's DNS domain; the client 192.0.2.7 is looked up as
  the A record of ``7.2.0.192.<zone>``, an IPv6 client as its 32 nibbles
  reversed (RFC 5782 2.1, 2.4).
- ``filter``: which answers count; without one, any A answer does.  It is
  one or more address patterns separated by ``;``; each pattern is four
  octets, each a number or a bracketed list of numbers and ``low..high``
  ranges separated by ``;``: ``127.0.0.[2..11]``, ``127.0.[0..255].[1..3]``,
  ``127.0.0.2;127.0.0.4``, ``127.0.0.[2;4;9..11]``.
- ``weight``: an integer added to the client's score when the site lists
  it (default 1); a negative weight makes an allow list.

All zones are asked at once; each site that lists the client adds its
weight; a client whose score reaches ``threshold`` is refused
(``DnsblVerdict.refusal``: 554 5.7.1 naming the zone with the heaviest
listing, as postscreen does).  A zone that does not answer within
``timeout`` seconds (or fails) counts as not listing and is logged;
answers, listings and NXDOMAIN alike, are cached for their TTL (capped;
NXDOMAIN for ``negative_ttl``) in a cache of at most ``cache_size``
names, least recently used out first.

:class:`~.config.DnsblConfig` and :class:`~.config.Site` (the table and
the parsed entries) are in :mod:`.config`, which every program may import;
this module, the look-ups, is imported only where they are made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from .config import DnsblConfig
from .dns import Answer, DnsTemporaryError, Resolver
from .verdicts import DnsblVerdict, Listing, Refusal

log = logging.getLogger(__name__)

MAX_TTL = 3600
NEGATIVE_TTL = 60
CACHE_SIZE = 10_000


def query_name(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """The name to look up for ``address`` in ``zone`` (RFC 5782 2.1 and 2.4)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        labels: Iterable[str] = reversed(str(ip).split("."))
    else:
        labels = reversed(ip.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


class Dnsbl:
    """Asks every zone about a client, at once, with a TTL cache."""

    def __init__(
        self,
        config: DnsblConfig,
        resolver: Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache_size: int = CACHE_SIZE,
        negative_ttl: int = NEGATIVE_TTL,
        max_ttl: int = MAX_TTL,
    ) -> None:
        self.config = config
        self._resolver = resolver
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._cache_size = cache_size
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl

    async def check(
        self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> DnsblVerdict:
        """The client's score; ``refusal`` set when it reaches the threshold."""
        config = self.config
        zones = list(dict.fromkeys(site.zone for site in config.sites))
        names = {zone: query_name(address, zone) for zone in zones}
        answers = await asyncio.gather(*(self._answers(names[zone]) for zone in zones))
        by_zone = dict(zip(zones, answers, strict=True))
        listings = []
        for site in config.sites:
            found = by_zone[site.zone]
            if found is None:
                continue
            matched = tuple(a for a in found if site.matches(a))
            if matched:
                listings.append(Listing(zone=site.zone, weight=site.weight, answers=matched))
        score = sum(listing.weight for listing in listings)
        unanswered = tuple(zone for zone in zones if by_zone[zone] is None)
        refusal = None
        if listings and score >= config.threshold:
            worst = max(listings, key=lambda listing: listing.weight)
            refusal = Refusal(
                554,
                "5.7.1",
                f"Service unavailable; client [{ipaddress.ip_address(address)}] "
                f"blocked using {worst.zone}",
            )
        return DnsblVerdict(
            score=score,
            threshold=config.threshold,
            listings=tuple(listings),
            unanswered=unanswered,
            refusal=refusal,
        )

    async def _answers(self, name: str) -> tuple[str, ...] | None:
        """The A records of ``name`` (cached); None when the zone did not answer."""
        now = self._clock()
        cached = self._cache.get(name)
        if cached is not None:
            if cached[0] > now:
                self._cache.move_to_end(name)
                return cached[1]
            del self._cache[name]
        try:
            answer: Answer = await asyncio.wait_for(
                self._resolver.query(name, "A"), self.config.timeout
            )
        except (DnsTemporaryError, TimeoutError) as exc:
            log.warning("dnsbl: %s: no answer, counted as not listed: %s", name, exc or "timeout")
            return None
        ttl = min(answer.ttl, self._max_ttl) if answer.texts else self._negative_ttl
        if ttl > 0:
            self._cache[name] = (now + ttl, answer.texts)
            self._cache.move_to_end(name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return answer.texts
