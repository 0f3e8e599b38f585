"""Host tables: which clients a channel knows.

An entry is a host name (case-insensitive, trailing dot ignored), a
``.domain`` suffix (any name below the domain, not the domain itself, as
Postfix reads it), an IPv4/IPv6 address, or a CIDR network.  A table comes
from a channel's inline ``hosts`` list and its ``table`` file: one entry a
line, ``#`` comments, and MMDF's ``name:value`` or ``name value`` lines
(only the key counts).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, read_text

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*"
)
_LOOKS_NUMERIC = re.compile(r"[0-9.]+(/.*)?|.*:.*")


def normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def normalize_address(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (a dual-stack socket's view) compares as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(slots=True)
class HostTable:
    names: set[str] = field(default_factory=set)
    suffixes: set[str] = field(default_factory=set)  # each with its leading "."
    # Networks by IP version and prefix length, each its first address as an
    # integer: a client costs a look-up a length the table uses, however many
    # networks a table file holds.
    networks: dict[tuple[int, int], set[int]] = field(default_factory=dict)

    @property
    def needs_name(self) -> bool:
        """Whether matching can use the client's name (so it is worth looking up)."""
        return bool(self.names or self.suffixes)

    def add(self, entry: str, where: str) -> None:
        """Add one entry; ``where`` names its origin for the error message."""
        text = entry.strip()
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            pass
        else:
            length = (network.version, network.prefixlen)
            self.networks.setdefault(length, set()).add(int(network.network_address))
            return
        if _LOOKS_NUMERIC.fullmatch(text):
            raise ConfigError(f"{where}: {text!r} is not a valid address or network")
        name = normalize_name(text)
        if name.startswith(".") and _NAME.fullmatch(name[1:]):
            self.suffixes.add(name)
        elif _NAME.fullmatch(name):
            self.names.add(name)
        else:
            raise ConfigError(f"{where}: {text!r} is not a host name, address or network")

    def matches(self, address: IPAddress | None, name: str | None) -> bool:
        if address is not None:
            address = normalize_address(address)
            number, bits = int(address), address.max_prefixlen
            for (version, prefix), firsts in self.networks.items():
                if (
                    version == address.version
                    and number >> (bits - prefix) << (bits - prefix) in firsts
                ):
                    return True
        if name:
            name = normalize_name(name)
            if name in self.names:
                return True
            labels = name.split(".")
            for start in range(1, len(labels)):
                if "." + ".".join(labels[start:]) in self.suffixes:
                    return True
        return False


def read_table_file(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, key) for each entry of an MMDF table file."""
    text = read_text(path, "table")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # An address entry may hold ':' (IPv6); otherwise ':' ends the key.
        key = line.split()[0]
        if not _is_address(key):
            key = key.split(":", 1)[0]
        yield number, key


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def build_table(inline: Iterable[str], file: Path | None, where: str) -> HostTable:
    table = HostTable()
    for entry in inline:
        table.add(entry, where)
    if file is not None:
        for number, key in read_table_file(file):
            table.add(key, f"{file}:{number}")
    return table
