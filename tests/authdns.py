"""An authoritative DNS server on loopback for the checks' tests: UDP and TCP, TTLs.

Records come from :class:`AuthZone`: ``zone.add(name, type, value, ttl=)``
for TXT (long values split into 255-octet strings, as DKIM keys are
published), A, AAAA, MX ("10 mx.example.com"), PTR and CNAME.  A name in
``silent`` never gets an answer (the client times out); a name in
``servfail`` gets SERVFAIL; a name in ``held`` is answered only once
``release`` is set, and each such query is put in ``arrivals`` when it
comes (a test proves by order what goes on meanwhile).  Names not in the zone get NXDOMAIN; a name
with records of other types only, NODATA.  Answers larger than the
client's UDP size are truncated, so that the client retries over TCP,
which is served too.  ``queries`` counts what was asked.
"""

from __future__ import annotations

import queue
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def txt_strings(value: str) -> str:
    """A TXT value as quoted strings of at most 255 octets (RFC 1035 3.3.14)."""
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(
        '"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks
    )


@dataclass
class AuthZone:
    records: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)
    held: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    arrivals: queue.Queue[str] = field(default_factory=queue.Queue)
    # The zone's SOA, sent with every answer that has no record (NXDOMAIN and
    # NODATA): its last field is the negative answers' time to live (RFC 2308 5).
    soa: str | None = None

    def add(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        kind = rdtype.upper()
        texts = [txt_strings(v) if kind == "TXT" else v for v in values]
        self.records.setdefault((_norm(name), kind), []).extend((t, ttl) for t in texts)

    def answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = _norm(question.name.to_text())
        kind = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, kind))
        if name in self.silent:
            return None
        if name in self.held:
            self.arrivals.put(name)
            self.release.wait(timeout=120)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        values = self.records.get((name, kind))
        cname = self.records.get((name, "CNAME"))
        if values:
            ttl = min(t for _, t in values)
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name,
                    ttl,
                    dns.rdataclass.IN,
                    kind,
                    [v for v, _ in values],
                    origin=dns.name.root,
                    relativize=False,
                )
            )
        elif cname:
            target = cname[0][0]
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name,
                    cname[0][1],
                    "IN",
                    "CNAME",
                    [target],
                    origin=dns.name.root,
                    relativize=False,
                )
            )
            for value, ttl in self.records.get((_norm(target), kind), []):
                response.answer.append(
                    dns.rrset.from_text_list(
                        target,
                        ttl,
                        dns.rdataclass.IN,
                        kind,
                        [value],
                        origin=dns.name.root,
                        relativize=False,
                    )
                )
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if not response.answer and self.soa is not None:
            response.authority.append(dns.rrset.from_text("example.", 300, "IN", "SOA", self.soa))
        limit = 65535
        if udp:
            limit = max(query.payload, 512) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()


@contextmanager
def auth_dns_server(zone: AuthZone) -> Iterator[str]:
    """Serve ``zone`` on 127.0.0.1 over UDP and TCP on one port; yields "127.0.0.1:port"."""

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply = zone.answer(data, udp=True)
            if reply is not None:
                sock.sendto(reply, self.client_address)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(5)
            try:
                while True:
                    head = _recv_exactly(sock, 2)
                    if not head:
                        return
                    data = _recv_exactly(sock, int.from_bytes(head, "big"))
                    reply = zone.answer(data, udp=False)
                    if reply is None:
                        return
                    sock.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                return

    for _ in range(20):
        tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Tcp)
        port = tcp.server_address[1]
        try:
            udp = socketserver.ThreadingUDPServer(("127.0.0.1", port), Udp)
        except OSError:
            tcp.server_close()
            continue
        break
    else:
        raise RuntimeError("no port free for both UDP and TCP")
    tcp.daemon_threads = udp.daemon_threads = True
    threads = [
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in (tcp, udp)
    ]
    for thread in threads:
        thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for server in (tcp, udp):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data
