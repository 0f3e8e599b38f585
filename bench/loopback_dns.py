"""A small authoritative DNS server on loopback, in a process of its own, for the benchmark.

    python bench/loopback_dns.py NAME=TYPE=VALUE ...

Answers the records given over UDP on a free port of 127.0.0.1 (printed
as "listening on 127.0.0.1:PORT" once bound), NXDOMAIN for any other name,
NODATA for another type of a known name, until it is terminated.  A
process, not a thread of the benchmark: the benchmark's own client runs
in its process, and the answers must not take its time.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serve(records: Mapping[tuple[str, str], Sequence[str]]) -> None:
    import dns.exception
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

    names = {name for name, _ in records}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
        while True:
            wire, client = sock.recvfrom(4096)
            try:
                query = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                continue
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            kind = dns.rdatatype.to_text(question.rdtype)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            values = records.get((name, kind))
            if values:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN, kind, values)
                )
            elif name not in names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(response.to_wire(), client)


def txt(text: str) -> str:
    """A TXT record's data in zone-file syntax (one string: the benchmark's are short)."""
    assert len(text) <= 255 and '"' not in text
    return f'"{text}"'


@contextlib.contextmanager
def loopback_dns(records: Mapping[tuple[str, str], Sequence[str]]) -> Iterator[str]:
    """Serve ``records`` ({(name, type): [rdata, ...]}); yields "127.0.0.1:PORT"."""
    argv = [
        f"{name}={kind}={value}" for (name, kind), values in records.items() for value in values
    ]
    process = subprocess.Popen(
        [sys.executable, str(HERE / "loopback_dns.py"), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the loopback DNS server did not start: {line!r}")
        yield line.removeprefix("listening on ").strip()
    finally:
        process.terminate()
        process.wait()


def main(argv: list[str]) -> int:
    records: dict[tuple[str, str], list[str]] = {}
    for argument in argv:
        name, kind, value = argument.split("=", 2)
        records.setdefault((name.rstrip(".").lower(), kind.upper()), []).append(value)
    with contextlib.suppress(KeyboardInterrupt):
        serve(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
