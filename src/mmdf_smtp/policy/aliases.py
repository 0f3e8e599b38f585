"""The aliases file, in the classic aliases(5) format, and its expansion.

    # comment
    postmaster: root
    staff: alice, bob,
        carol            <- a line starting with white space continues the last
    info@example.org: bob           <- that address only
    @example.net: carol             <- example.net's catch-all

Keys are compared in lower case.  A key with a domain (Postfix's
virtual(5) forms) must name one of the local domains: mail for any other
never reaches the aliases.  At RCPT time only the keys matter (a
recipient exists when a key covers it); delivery expands the targets
with :class:`Aliases`.  Both ask :meth:`Aliases.find`, the one place
that orders the keys.

Address extensions, as Postfix's ``recipient_delimiter``: ``alice+tag``
is the name ``alice+tag`` when that is an alias, else ``alice`` (see
:func:`base_name`).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, read_text

POSTMASTER = "postmaster"
# Deeper than any sane alias tree, shallow enough to stop a runaway one.
MAX_DEPTH = 20


def read_aliases(path: Path, local_domains: Collection[str]) -> dict[str, tuple[str, ...]]:
    return parse_aliases(read_text(path, "aliases"), str(path), local_domains)


def parse_aliases(
    text: str, where: str, local_domains: Collection[str]
) -> dict[str, tuple[str, ...]]:
    """The table of an aliases file's ``text``; ConfigError, naming
    ``where`` and the line, for anything else."""
    domains = {_domain(d) for d in local_domains}
    aliases: dict[str, list[str]] = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line[0] in " \t":
            if current is None:
                raise ConfigError(f"{where}:{number}: continuation line with no alias before it")
            aliases[current].extend(_targets(line))
            continue
        name, colon, rest = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name:
            raise ConfigError(f"{where}:{number}: expected 'name: target, target'")
        current = _key(name, domains, f"{where}:{number}")
        aliases.setdefault(current, []).extend(_targets(rest))
    return {name: tuple(targets) for name, targets in aliases.items()}


def _key(name: str, domains: Collection[str], where: str) -> str:
    """A classic name as it is; ``local@domain`` and ``@domain`` with the
    domain checked and the local part unquoted, as a recipient's is."""
    if "@" not in name:
        return name
    local, _, domain = name.rpartition("@")
    domain = _domain(domain)
    if not domain:
        raise ConfigError(f"{where}: expected 'name@domain: target' or '@domain: target'")
    if domain not in domains:
        raise ConfigError(
            f"{where}: {domain!r} is not one of local_domains (its mail never reaches the aliases)"
        )
    return f"{unquote(local)}@{domain}"


def _domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


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


class Kind(enum.Enum):
    ADDRESS = "address"  # a "local@domain" key
    NAME = "name"  # a classic aliases(5) name
    USER = "user"  # no key: a local user's mailbox (postmaster is always one)
    CATCH_ALL = "catch-all"  # an "@domain" key


@dataclass(frozen=True, slots=True)
class Found:
    """What covers a local address: ``key`` is the table's key (the user's
    name for a USER); ``targets`` are the key's, empty for a USER."""

    kind: Kind
    key: str
    targets: tuple[str, ...] = ()


class Aliases:
    """Recursive expansion of local recipients through the aliases table.

    A target is a local name, an address at one of the local domains, or a
    remote address.  As in sendmail, an alias that reaches its own key
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
        self._domains = {_domain(d) for d in local_domains}
        self._default_domain = default_domain

    @classmethod
    def of(cls, config: Config) -> Aliases:
        """The configuration's aliases file, users and domains: what smtpd
        asks at RCPT time and deliver expands by.  Raises ConfigError."""
        domains = config.local_domains
        path = config.local.aliases
        return cls(
            read_aliases(path, domains) if path else {},
            users=config.local.users,
            local_domains=domains,
            default_domain=domains[0] if domains else config.hostname,
            delimiters=config.deliver.recipient_delimiter,
        )

    def is_local(self, address: str) -> bool:
        _, domain = _split(address)
        return not domain or _domain(domain) in self._domains

    def find(self, address: str) -> Found | None:
        """What covers the local ``address``, most specific first (the
        order of Postfix's virtual(5), then the classic table):

        1. ``user+ext@domain``, 2. ``user@domain``,
        3. the name ``user+ext``, then ``user`` (an alias, else a local
           user of that name: postmaster is always one),
        4. ``@domain``, the catch-all.

        A local user outranks the catch-all, which takes only the names
        nothing else knows (as Postfix's luser_relay; Postfix's own
        ``@domain`` would also take its users' mail unless each were
        mapped to itself); ``user@domain`` still outranks the user.  An
        address without a domain is a classic name alone.  None: nothing
        covers it (5.1.1).
        """
        local, domain = _split(address)
        name = unquote(local).lower()
        base = base_name(name, self._delimiters)
        domain = _domain(domain)
        if domain:
            for key in dict.fromkeys((f"{name}@{domain}", f"{base}@{domain}")):
                if key in self._table:
                    return Found(Kind.ADDRESS, key, self._table[key])
        for candidate in dict.fromkeys((name, base)):
            if candidate in self._table:
                return Found(Kind.NAME, candidate, self._table[candidate])
            if candidate in self._users:
                return Found(Kind.USER, candidate)
        catch_all = f"@{domain}"
        if domain and catch_all in self._table:
            return Found(Kind.CATCH_ALL, catch_all, self._table[catch_all])
        return None

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
        domain = _domain(domain) or self._default_domain
        qualified = f"{local}@{domain}"
        # What a Maildir delivery names in Delivered-To: the address as
        # given, extension and all.
        given = f"{name}@{domain}"
        # A bare name is looked up as one (no address key or catch-all
        # covers it); its destinations are still named at the default domain.
        found = self.find(address)
        if found is None:
            yield Destination(qualified, problem="5.1.1 No such user here")
            return
        if found.kind is Kind.USER:
            yield Destination(given, mailbox=found.key)
            return
        if found.key in chain:
            # "alice: alice, alice@elsewhere" and "alice@example.org:
            # alice@example.org, archive" keep alice's copy.
            user = found.key.partition("@")[0]
            if user in self._users:
                yield Destination(given, mailbox=user)
            else:
                loop = " -> ".join((*chain, found.key))
                yield Destination(qualified, problem=f"5.4.6 Alias loop: {loop}")
            return
        if len(chain) >= MAX_DEPTH:
            yield Destination(qualified, problem=f"5.4.6 Alias nesting too deep at {found.key}")
            return
        for target in found.targets:
            yield from self._walk(target, (*chain, found.key))


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
