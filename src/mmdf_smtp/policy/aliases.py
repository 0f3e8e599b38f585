"""The aliases file, in the classic aliases(5) format, and its expansion.

    # comment
    postmaster: root
    staff: alice, bob,
        carol            <- a line starting with white space continues the last

Keys are compared in lower case.  At RCPT time only the names matter (a
recipient exists when it is an alias); delivery expands the targets with
:class:`Aliases`.

Address extensions, as Postfix's ``recipient_delimiter``: ``alice+tag``
is the name ``alice+tag`` when that is an alias, else ``alice`` (see
:func:`base_name`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, read_text

POSTMASTER = "postmaster"
# Deeper than any sane alias tree, shallow enough to stop a runaway one.
MAX_DEPTH = 20


def read_aliases(path: Path) -> dict[str, tuple[str, ...]]:
    text = read_text(path, "aliases")
    aliases: dict[str, list[str]] = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line[0] in " \t":
            if current is None:
                raise ConfigError(f"{path}:{number}: continuation line with no alias before it")
            aliases[current].extend(_targets(line))
            continue
        name, colon, rest = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name:
            raise ConfigError(f"{path}:{number}: expected 'name: target, target'")
        current = name
        aliases.setdefault(name, []).extend(_targets(rest))
    return {name: tuple(targets) for name, targets in aliases.items()}


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def unquote(local: str) -> str:
    """A local part without its quotes and backslash escapes (RFC 5321 4.1.2)."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        body, out, escaped = local[1:-1], [], False
        for char in body:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return local


@dataclass(frozen=True, slots=True)
class Destination:
    """One address an envelope recipient expands to.

    ``mailbox`` is the local user whose Maildir receives it, None for an
    address that leaves through the next hop.  ``problem`` is set (an
    enhanced status code and text) when it cannot be delivered at all.
    """

    address: str
    mailbox: str | None = None
    problem: str | None = None

    @property
    def key(self) -> str:
        """Equal for destinations that must receive one copy between them."""
        return self.mailbox or self.address.lower()


class Aliases:
    """Recursive expansion of local recipients through the aliases table.

    A target is a local name, ``name@`` one of the local domains, or a
    remote address.  As in sendmail, an alias that reaches its own name
    again delivers to the user of that name when there is one; otherwise
    the cycle is a loop.  Each destination appears once per expansion.
    """

    def __init__(
        self,
        table: Mapping[str, tuple[str, ...]],
        *,
        users: Collection[str],
        local_domains: Collection[str],
        default_domain: str,
        delimiters: str = "",
    ) -> None:
        self._table = table
        self._delimiters = delimiters
        self._users = {u.lower() for u in users} | {POSTMASTER}
        self._domains = {d.lower().rstrip(".") for d in local_domains}
        self._default_domain = default_domain

    def is_local(self, address: str) -> bool:
        _, domain = _split(address)
        return not domain or domain.lower().rstrip(".") in self._domains

    def expand(self, address: str) -> list[Destination]:
        found: dict[str, Destination] = {}
        for destination in self._walk(address, ()):
            found.setdefault(destination.key, destination)
        return list(found.values())

    def _walk(self, address: str, chain: tuple[str, ...]) -> Iterable[Destination]:
        if address[:1] in ("|", "/") or address.startswith(":include:"):
            yield Destination(address, problem=f"5.3.5 Alias target not supported: {address}")
            return
        if not self.is_local(address):
            yield Destination(address)
            return
        local, domain = _split(address)
        name = unquote(local).lower()
        domain = domain.lower().rstrip(".") or self._default_domain
        qualified = f"{local}@{domain}"
        if name not in self._table and name not in self._users:
            # "alice+tag" that is no alias of its own is alice's (Postfix's
            # order: the name as given first, then without its extension).
            base = base_name(name, self._delimiters)
            if base in self._table or base in self._users:
                yield from self._walk_name(base, qualified, f"{name}@{domain}", chain)
                return
        yield from self._walk_name(name, qualified, f"{name}@{domain}", chain)

    def _walk_name(
        self, name: str, qualified: str, given: str, chain: tuple[str, ...]
    ) -> Iterable[Destination]:
        """The destinations of the local ``name``, found as ``qualified``;
        ``given``, the address with its extension, is what a Maildir
        delivery names in Delivered-To."""
        if name in self._table and name not in chain:
            if len(chain) >= MAX_DEPTH:
                yield Destination(qualified, problem=f"5.4.6 Alias nesting too deep at {name}")
                return
            for target in self._table[name]:
                yield from self._walk(target, (*chain, name))
            return
        if name in self._users:
            yield Destination(given, mailbox=name)
        elif name in chain:
            loop = " -> ".join((*chain, name))
            yield Destination(qualified, problem=f"5.4.6 Alias loop: {loop}")
        else:
            yield Destination(qualified, problem="5.1.1 No such user here")


def base_name(name: str, delimiters: str) -> str:
    """``name`` without its extension: up to the first of ``delimiters``
    (Postfix splits there too); ``name`` itself when it has none, or when
    nothing would be left of it."""
    cut = min((i for i in (name.find(d) for d in delimiters) if i > 0), default=-1)
    return name[:cut] if cut > 0 else name


def _split(address: str) -> tuple[str, str]:
    """Local part and domain; the domain is "" for a bare name."""
    if address.endswith('"') or "@" not in address:
        return address, ""
    local, _, domain = address.rpartition("@")
    return local, domain
