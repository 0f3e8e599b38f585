"""Real milters from Debian's packages, as pytest fixtures, on loopback.

Each fixture starts one milter (bench/milter_servers.py: the same start-up
code the benchmark uses) as a foreground child process in a temporary
directory, on a free port of 127.0.0.1, waits (bounded) until the port
accepts, and stops it at the end of the session.  Each yields the
:class:`~milter_servers.Milter`, whose ``socket`` is the address in
Postfix's syntax (``inet:127.0.0.1:PORT``) and ``port`` the port.

- ``opendkim_signer``: OpenDKIM, Mode s, signing mail whose From: is in
  :data:`SIGNER_DOMAIN` with an RSA 2048 key it made (opendkim-genkey).
  Its ``keys`` carry the record's name and TXT data; they are also
  published in ``milter_dns``.
- ``opendkim_ed25519_signer``: the same with an Ed25519 key (RFC 8463):
  a second instance, OpenDKIM having one signing algorithm per instance.
  Both as milters, one after the other, give a message two signatures.
- ``opendkim_verifier``: OpenDKIM, Mode v, adding
  ``Authentication-Results: milter.test; dkim=...``; keys looked up in
  ``milter_dns`` only.
- ``opendmarc``: OpenDMARC refusing a DMARC failure under p=reject, doing
  its own SPF; its DNS is ``opendmarc.zone`` (see OpenDMARC's docstring:
  it needs a mount namespace, so root).
- ``rspamd_milter``: rspamd's proxy worker in milter mode; DNS from
  ``milter_dns``.

``milter_dns`` is the session's DNS server on loopback (tests/dnsserver.py);
a test adds the records it needs to its ``zone``, under names of its own.

A missing program fails the test when CI=true (CI installs every one,
.ci/run), and skips it, naming the Debian package, when run by hand.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import dns.message
import dns.query
import dns.rdatatype
import pytest

from dnsserver import Zone, dns_server

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))

from milter_servers import (  # noqa: E402 - bench/ is put on the path just above
    DkimKey,
    Milter,
    MilterUnavailable,
    OpenDKIM,
    OpenDMARC,
    Rspamd,
    have_namespaces,
    loopback_address,
    make_ed25519_key,
    make_rsa_key,
)

SIGNER_DOMAIN = "signer.test"
AUTHSERV_ID = "milter.test"
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Fail under CI, where .ci/run installs everything; skip when run by hand."""
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@dataclass
class LoopbackDns:
    zone: Zone
    address: str  # "127.0.0.1:port"

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def publish(self, key: DkimKey) -> None:
        self.zone.add(key.record_name, "TXT", txt_rdata(key.txt))

    def txt(self, name: str | bytes, timeout: float = 5.0) -> bytes | None:
        """The TXT record at ``name``, as dkimpy's ``dnsfunc`` returns it (strings joined)."""
        if isinstance(name, bytes):
            name = name.decode("ascii")
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        response = dns.query.udp(query, self.host, port=self.port, timeout=timeout)
        for rrset in response.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)  # type: ignore[attr-defined]
        return None


def txt_rdata(text: str) -> str:
    """TXT record data in zone-file syntax: quoted strings of at most 255 octets (RFC 1035 3.3)."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


M = TypeVar("M", bound=Milter)
_ENDING: list[Milter] = []


def _run(milter: M) -> Iterator[M]:
    try:
        milter.start()
    except MilterUnavailable as exc:
        unavailable(str(exc))
    try:
        yield milter
    finally:
        # Told now, reaped together at the session's end (pytest_sessionfinish):
        # each takes up to libmilter's poll interval to go.
        milter.terminate()
        _ENDING.append(milter)


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _ENDING:
        _ENDING.pop().stop()


@pytest.fixture(scope="session")
def milter_dns() -> Iterator[LoopbackDns]:
    zone = Zone()
    with dns_server(zone) as address:
        yield LoopbackDns(zone, address)


def _signer(
    directory: Path, dns: LoopbackDns, make_key: Callable[[], DkimKey]
) -> Iterator[OpenDKIM]:
    try:
        key = make_key()
    except MilterUnavailable as exc:
        unavailable(str(exc))
    dns.publish(key)
    yield from _run(OpenDKIM(directory, mode="s", keys=[key], authserv_id=AUTHSERV_ID))


@pytest.fixture(scope="session")
def opendkim_signer(
    tmp_path_factory: pytest.TempPathFactory, milter_dns: LoopbackDns
) -> Iterator[OpenDKIM]:
    directory = tmp_path_factory.mktemp("opendkim-signer")
    yield from _signer(
        directory, milter_dns, lambda: make_rsa_key(directory / "keys", SIGNER_DOMAIN, "rsa2048")
    )


@pytest.fixture(scope="session")
def opendkim_ed25519_signer(
    tmp_path_factory: pytest.TempPathFactory, milter_dns: LoopbackDns
) -> Iterator[OpenDKIM]:
    directory = tmp_path_factory.mktemp("opendkim-ed25519-signer")
    yield from _signer(
        directory,
        milter_dns,
        lambda: make_ed25519_key(directory / "keys", SIGNER_DOMAIN, "ed25519"),
    )


@pytest.fixture(scope="session")
def opendkim_verifier(
    tmp_path_factory: pytest.TempPathFactory, milter_dns: LoopbackDns
) -> Iterator[OpenDKIM]:
    directory = tmp_path_factory.mktemp("opendkim-verifier")
    yield from _run(
        OpenDKIM(directory, mode="v", resolver=milter_dns.address, authserv_id=AUTHSERV_ID)
    )


class DmarcMilter(OpenDMARC):
    """OpenDMARC with the zone its resolv.conf's nameserver serves."""

    def __init__(self, directory: Path, zone: Zone, resolver_ip: str) -> None:
        super().__init__(directory, resolver_ip=resolver_ip, authserv_id=AUTHSERV_ID)
        self.zone = zone


@pytest.fixture(scope="session")
def opendmarc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmarcMilter]:
    if not have_namespaces():
        unavailable("OpenDMARC's DNS needs a mount namespace of its own: root, unshare --mount")
    directory = tmp_path_factory.mktemp("opendmarc")
    zone = Zone()
    with ExitStack() as stack:
        # libresolv asks port 53 only: an address of our own on it (from the
        # pid, so that concurrent runs differ), bound before OpenDMARC starts.
        for attempt in range(5):
            try:
                address = loopback_address(os.getpid() + 7919 * attempt)
                stack.enter_context(dns_server(zone, address, 53))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
        yield from _run(DmarcMilter(directory, zone, address))


@pytest.fixture(scope="session")
def rspamd_milter(
    tmp_path_factory: pytest.TempPathFactory, milter_dns: LoopbackDns
) -> Iterator[Rspamd]:
    directory = tmp_path_factory.mktemp("rspamd")
    yield from _run(Rspamd(directory, resolver=milter_dns.address))
