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
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .dns import Answer, DnsTemporaryError, Resolver
from .verdicts import DnsblVerdict, Listing, Refusal

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # postscreen_dnsbl_timeout
MAX_TTL = 3600
NEGATIVE_TTL = 60
CACHE_SIZE = 10_000

Range = tuple[int, int]
Octet = tuple[Range, ...]
Pattern = tuple[Octet, Octet, Octet, Octet]

_SITE = re.compile(r"(?P<zone>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>[-+]?\d+))?")
_ZONE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_NUMBER = r"\d{1,3}"
_ITEM = re.compile(rf"({_NUMBER})(?:\.\.({_NUMBER}))?")


def _number(text: str, site: str) -> int:
    value = int(text)
    if value > 255:
        raise ValueError(f"{site!r}: {value} is not an address octet")
    return value


def _octet(text: str, site: str) -> Octet:
    bracketed = text.startswith("[") and text.endswith("]")
    items = text[1:-1].split(";") if bracketed else [text]
    ranges: list[Range] = []
    for item in items:
        match = _ITEM.fullmatch(item)
        if match is None or (not text.startswith("[") and match.group(2)):
            raise ValueError(f"{site!r}: bad filter octet {text!r}")
        low = _number(match.group(1), site)
        high = _number(match.group(2), site) if match.group(2) else low
        if low > high:
            raise ValueError(f"{site!r}: empty range {item!r}")
        ranges.append((low, high))
    return tuple(ranges)


def _split_patterns(text: str) -> list[str]:
    """Split at the ``;`` outside brackets (those inside separate an octet's items)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == ";" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _pattern(text: str, site: str) -> Pattern:
    octets = text.split(".")
    # A range's ".." splits too: join the pieces back inside brackets.
    joined: list[str] = []
    for piece in octets:
        if joined and joined[-1].count("[") > joined[-1].count("]"):
            joined[-1] += "." + piece
        else:
            joined.append(piece)
    if len(joined) != 4:
        raise ValueError(f"{site!r}: a filter is four octets, like 127.0.0.[2..11]")
    a, b, c, d = (_octet(part, site) for part in joined)
    return (a, b, c, d)


@dataclass(frozen=True, slots=True)
class Site:
    """One ``zone[=filter][*weight]`` entry."""

    zone: str
    patterns: tuple[Pattern, ...] = ()  # empty: any answer counts
    weight: int = 1

    @classmethod
    def parse(cls, text: str) -> Site:
        match = _SITE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r}: expected zone[=filter][*weight]")
        zone = match.group("zone").rstrip(".").lower()
        if not _ZONE.fullmatch(zone) or "." not in zone:
            raise ValueError(f"{text!r}: {zone!r} is not a DNS zone")
        patterns: tuple[Pattern, ...] = ()
        if match.group("filter") is not None:
            patterns = tuple(
                _pattern(part, text) for part in _split_patterns(match.group("filter"))
            )
        weight = int(match.group("weight")) if match.group("weight") else 1
        return cls(zone=zone, patterns=patterns, weight=weight)

    def __str__(self) -> str:
        text = self.zone
        if self.patterns:
            text += "=" + ";".join(".".join(map(_octet_text, p)) for p in self.patterns)
        if self.weight != 1:
            text += f"*{self.weight}"
        return text

    def matches(self, answer: str) -> bool:
        if not self.patterns:
            return True
        try:
            octets = ipaddress.IPv4Address(answer).packed
        except ValueError:
            return False
        return any(
            all(
                any(low <= value <= high for low, high in octet)
                for value, octet in zip(octets, pattern, strict=True)
            )
            for pattern in self.patterns
        )


def _octet_text(octet: Octet) -> str:
    if len(octet) == 1 and octet[0][0] == octet[0][1]:
        return str(octet[0][0])
    items = (str(low) if low == high else f"{low}..{high}" for low, high in octet)
    return "[" + ";".join(items) + "]"


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsblConfig:
    """The ``[dnsbl]`` table."""

    sites: tuple[Site, ...] = ()
    threshold: int = 1
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> DnsblConfig:
        """From the parsed TOML table; ValueError naming the key when a value is bad."""
        unknown = set(table) - {"zones", "threshold", "timeout"}
        if unknown:
            raise ValueError(f"dnsbl: unknown key {sorted(unknown)[0]!r}")
        zones = table.get("zones", [])
        if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
            raise ValueError("dnsbl.zones: expected a list of strings")
        sites = tuple(Site.parse(zone) for zone in zones)
        threshold = table.get("threshold", 1)
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise ValueError("dnsbl.threshold: expected an integer")
        timeout = table.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError("dnsbl.timeout: expected a positive number of seconds")
        return cls(sites=sites, threshold=threshold, timeout=float(timeout))


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
