"""The ``[auth]`` and ``[dnsbl]`` tables, as typed values.

Only the standard library: every program reads the configuration, and
most never check mail; the checks themselves (dkimpy, pyspf, the
asynchronous resolver) are imported by the modules that run them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_SIZE = 16 * 1024 * 1024  # [auth] dkim_max_size: the octets of a message DKIM verifies
DEFAULT_TIMEOUT = 10.0  # [dnsbl] timeout; postscreen_dnsbl_timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """The ``[auth]`` table."""

    authserv_id: str
    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    reject_spf_fail: bool = False
    reject_dmarc: bool = True
    dkim_max_size: int = DEFAULT_MAX_SIZE

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, hostname: str) -> AuthConfig:
        """From the parsed TOML table; ``authserv_id`` defaults to ``hostname``.

        ValueError naming the key when a value is bad or a key unknown.
        """
        booleans = ("spf", "dkim", "dmarc", "reject_spf_fail", "reject_dmarc")
        unknown = set(table) - {"authserv_id", "dkim_max_size", *booleans}
        if unknown:
            raise ValueError(f"auth: unknown key {sorted(unknown)[0]!r}")
        values: dict[str, Any] = {}
        for key in booleans:
            if key in table:
                if not isinstance(table[key], bool):
                    raise ValueError(f"auth.{key}: expected true or false")
                values[key] = table[key]
        authserv_id = table.get("authserv_id", hostname)
        if not isinstance(authserv_id, str) or not authserv_id.strip():
            raise ValueError("auth.authserv_id: expected a non-empty string")
        if any(ch <= " " or ch in '()<>@,;:\\"/[]?=' for ch in authserv_id):
            # RFC 8601 2.5: an authserv-id is a token, a host name in practice.
            raise ValueError(f"auth.authserv_id: {authserv_id!r} is not a token")
        size = table.get("dkim_max_size", DEFAULT_MAX_SIZE)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1024:
            raise ValueError("auth.dkim_max_size: expected a size in octets, at least 1024")
        return cls(authserv_id=authserv_id, dkim_max_size=size, **values)


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
