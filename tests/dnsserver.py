"""A small authoritative DNS server on loopback, for tests.

Records come from a dict ``{(name, type): [rdata text, ...]}``; names not
in it get NXDOMAIN.  Names in ``servfail`` get SERVFAIL; names in ``silent``
get no answer at all (the client times out).  It counts the queries it saw.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass
class Zone:
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((_norm(name), rdtype.upper()), []).extend(values)

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, rdtype, values)
            )
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


@contextmanager
def dns_server(zone: Zone, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``zone`` over UDP on ``host`` (loopback); yields "host:port".

    A fixed ``port`` (53) is for programs that ask only /etc/resolv.conf's
    nameservers, which libresolv asks on port 53 alone.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                wire, client = sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = zone.answer(wire)
            if reply is not None:
                sock.sendto(reply, client)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"{host}:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        sock.close()
