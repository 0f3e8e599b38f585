"""Who may connect now: sessions and connection rates per client and network.

One client must not starve the others, so besides ``maxconnects`` the
daemon counts, for each client address and for its network (IPv4 /24,
IPv6 /64, the blocks one party usually holds), the sessions it has open and
the connections it made in the last minute, as Postfix's anvil does.  The
tables live in shared memory so that every worker process sees the same
counts; each is touched once per connection, never per command.
"""

from __future__ import annotations

import ctypes
import ipaddress
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import SmtpdConfig
from .protocol import Reply, replies
from .service import parse_address

Key = tuple[int, int]  # a 16-octet address as two 64-bit halves

NETWORK_PREFIX = {4: 24, 6: 64}
RATE_WINDOW = 60.0  # seconds: rates are connections a minute
_RATE_SLOTS = 4096
_PROBES = 8


def _key(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> Key:
    packed = address.packed.rjust(16, b"\0") if address is not None else bytes(16)
    return int.from_bytes(packed[:8]), int.from_bytes(packed[8:])


def client_keys(peer: str) -> tuple[Key, Key]:
    """The keys of a client address and of its network."""
    address = parse_address(peer)
    if address is None:
        return _key(None), _key(None)
    network = ipaddress.ip_network(f"{address}/{NETWORK_PREFIX[address.version]}", strict=False)
    return _key(address), _key(network.network_address)


class SessionCounts:
    """Open sessions per key, in a hash table with linear probing.

    At most ``sessions`` keys are counted at once (each needs an open
    session), so a table of twice that never fills and probe runs stay
    short.  A key whose count falls to zero leaves by backward-shift
    deletion (Knuth's Algorithm R), which keeps every run unbroken without
    tombstones, however many distinct clients come and go.
    """

    def __init__(self, sessions: int) -> None:
        size = 2 * sessions + 1
        self._high = multiprocessing.RawArray(ctypes.c_uint64, size)
        self._low = multiprocessing.RawArray(ctypes.c_uint64, size)
        self._counts = multiprocessing.RawArray(ctypes.c_int, size)  # 0: the slot is free
        self._size = size

    def _home(self, key: Key) -> int:
        return hash(key) % self._size

    def _slot(self, key: Key) -> int:
        """Where ``key`` is, or the free slot where it would go."""
        i = self._home(key)
        while self._counts[i] and (self._high[i], self._low[i]) != key:
            i = (i + 1) % self._size
        return i

    def acquire(self, key: Key, limit: int) -> bool:
        """Count a session; False (and not counted) at ``limit`` (0: none)."""
        i = self._slot(key)
        if limit and self._counts[i] >= limit:
            return False
        self._high[i], self._low[i] = key
        self._counts[i] += 1
        return True

    def release(self, key: Key) -> None:
        i = self._slot(key)
        if self._counts[i] > 1:
            self._counts[i] -= 1
        elif self._counts[i] == 1:
            self._remove(i)

    def _remove(self, hole: int) -> None:
        size = self._size
        j = hole
        while True:
            j = (j + 1) % size
            if not self._counts[j]:
                break
            home = self._home((self._high[j], self._low[j]))
            # The entry at j may fill the hole only if its run passes the hole.
            if (home - hole - 1) % size < (j - hole) % size:
                continue
            self._high[hole], self._low[hole] = self._high[j], self._low[j]
            self._counts[hole] = self._counts[j]
            hole = j
        self._counts[hole] = 0


class ConnectionRates:
    """Connections per key in the current minute, in a fixed-size hash table.

    A key hashes to a run of a few slots; a new key takes an empty or
    expired one there, else the oldest (under a flood of more distinct
    clients a minute than slots, some counts start again: the table stays
    bounded, and the busiest clients keep their counts).
    """

    def __init__(self, slots: int = _RATE_SLOTS) -> None:
        self._high = multiprocessing.RawArray(ctypes.c_uint64, slots)
        self._low = multiprocessing.RawArray(ctypes.c_uint64, slots)
        self._start = multiprocessing.RawArray(ctypes.c_double, slots)
        self._counts = multiprocessing.RawArray(ctypes.c_int, slots)
        self._slots = slots

    def count(self, key: Key, limit: int, now: float) -> bool:
        """Count a connection; False when it is over ``limit`` this minute."""
        first = hash(key) % self._slots
        probes = [(first + n) % self._slots for n in range(_PROBES)]
        slot = next((i for i in probes if (self._high[i], self._low[i]) == key), None)
        if slot is None or now - self._start[slot] >= RATE_WINDOW:
            if slot is None:
                slot = min(probes, key=lambda i: (self._counts[i] != 0, self._start[i]))
            self._high[slot], self._low[slot] = key
            self._start[slot] = now
            self._counts[slot] = 0
        self._counts[slot] += 1
        return self._counts[slot] <= limit


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted connection's keys, to give back when it ends."""

    client: Key
    network: Key


class Admission:
    """The per-client and per-network limits of ``[smtpd]``, across workers."""

    def __init__(self, maxconnects: int, clock: Callable[[], float] = time.monotonic) -> None:
        # CLOCK_MONOTONIC is one clock for the whole machine: workers agree on it.
        self._clock = clock
        self._lock = multiprocessing.Lock()
        self._clients = SessionCounts(maxconnects)
        self._networks = SessionCounts(maxconnects)
        self._client_rates = ConnectionRates()
        self._network_rates = ConnectionRates()

    def admit(self, peer: str, limits: SmtpdConfig) -> Ticket | Reply | None:
        """A ticket for a connection from ``peer``, or the 421 that refuses it.

        Refused connections count toward the rates: a client that keeps
        knocking stays refused until it slows down.  With no limit set
        nothing is counted, and the ticket is None.
        """
        if not (
            limits.max_per_client
            or limits.max_per_network
            or limits.rate_per_client
            or limits.rate_per_network
        ):
            return None
        client, network = client_keys(peer)
        now = self._clock()
        with self._lock:
            # Both counted before either refuses: every attempt is one for both.
            client_slow = not limits.rate_per_client or self._client_rates.count(
                client, limits.rate_per_client, now
            )
            network_slow = not limits.rate_per_network or self._network_rates.count(
                network, limits.rate_per_network, now
            )
            if not client_slow:
                return replies.CLIENT_CONNECTION_RATE
            if not network_slow:
                return replies.NETWORK_CONNECTION_RATE
            if not self._clients.acquire(client, limits.max_per_client):
                return replies.TOO_MANY_CONNECTIONS
            if not self._networks.acquire(network, limits.max_per_network):
                self._clients.release(client)
                return replies.TOO_MANY_NETWORK_CONNECTIONS
        return Ticket(client, network)

    def release(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        with self._lock:
            self._clients.release(ticket.client)
            self._networks.release(ticket.network)
