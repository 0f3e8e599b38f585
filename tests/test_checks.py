"""The built-in checks against the tests' own DNS server on loopback, with keys the tests make.

SPF (every result, include:, macros), DKIM (RSA and Ed25519, broken body,
missing key, DNS failure), ARC (a chain sealed by dkimpy), DMARC
(alignment, policies, sp, pct, organizational domain), the
Authentication-Results field made and the forged ones recognised, and the
DNS blocklists (listing, filters, allow lists, IPv6, timeouts, TTL cache).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dkim
import pytest

from authdns import AuthZone, auth_dns_server
from dkimkeys import ED_PRIVATE, ED_PUBLIC, RSA_PRIVATE, RSA_PUBLIC
from mmdf_smtp.checks.config import AuthConfig, DnsblConfig
from mmdf_smtp.checks.dmarc import evaluate_dmarc, organizational_domain
from mmdf_smtp.checks.dns import DnsTemporaryError, Resolver
from mmdf_smtp.checks.dnsbl import Dnsbl, query_name
from mmdf_smtp.checks.gate import Checks
from mmdf_smtp.checks.results import authentication_results, remove_claiming_fields
from mmdf_smtp.checks.verdicts import DkimVerdict, SpfVerdict, SpfVerdicts
from mmdf_smtp.protocol.replies import Reply

T = TypeVar("T")
CLIENT = "127.0.0.1"
TIMEOUT = 0.3  # seconds a query to a silent server may take in these tests


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


# --- keys and the zone --------------------------------------------------------


def make_zone() -> AuthZone:
    zone = AuthZone()
    zone.add("example.com", "TXT", "v=spf1 ip4:127.0.0.0/24 -all")
    zone.add("example.com", "MX", "10 mx.example.com")
    zone.add("mx.example.com", "A", "127.0.0.9")
    zone.add("mxonly.example.com", "TXT", "v=spf1 mx:example.com -all")
    zone.add("soft.example.com", "TXT", "v=spf1 ~all")
    zone.add("neutral.example.com", "TXT", "v=spf1 ?all")
    zone.add("broken.example.com", "TXT", "v=spf1 ip4:127.0.0.0/24 frobnicate -all")
    zone.add("nospf.example.com", "A", "127.0.0.5")
    zone.add("inc.example.com", "TXT", "v=spf1 include:spf.example.net -all")
    zone.add("spf.example.net", "TXT", "v=spf1 ip4:127.0.0.10 -all")
    zone.add("macro.example.com", "TXT", "v=spf1 exists:%{i}.%{l}._spf.%{d} -all")
    zone.add("127.0.0.1.alice._spf.macro.example.com", "A", "127.0.0.2")
    zone.add("dnsfail.example.com", "TXT", "v=spf1 include:failing.example.net -all")
    zone.servfail.add("failing.example.net")
    zone.add("mail.example.com", "TXT", "v=spf1 a -all")
    zone.add("mail.example.com", "A", "127.0.0.1")
    # DKIM keys
    zone.add("rsa._domainkey.example.com", "TXT", f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    zone.add("ed._domainkey.example.com", "TXT", f"v=DKIM1; k=ed25519; p={ED_PUBLIC}")
    zone.add("rsa._domainkey.signer.example.net", "TXT", f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    zone.add("arc._domainkey.forwarder.example.org", "TXT", f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    zone.servfail.add("slow._domainkey.example.com")
    # DMARC
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    zone.add("_dmarc.quarantine.example", "TXT", "v=DMARC1; p=quarantine")
    zone.add("_dmarc.lax.example", "TXT", "v=DMARC1; p=none; rua=mailto:d@lax.example")
    zone.add("_dmarc.pct0.example", "TXT", "v=DMARC1; p=reject; pct=0")
    zone.add("_dmarc.strict.example", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")
    zone.add("_dmarc.example.co.uk", "TXT", "v=DMARC1; p=reject")
    zone.servfail.add("_dmarc.dmarcfail.example")
    return zone


@pytest.fixture(scope="module")
def zone() -> AuthZone:
    return make_zone()


@pytest.fixture(scope="module")
def server(zone: AuthZone) -> Iterator[str]:
    with auth_dns_server(zone) as address:
        yield address


def checks_for(
    server: str, *, seed: int | None = 1, dnsbl: DnsblConfig | None = None, **auth: Any
) -> Checks:
    config = AuthConfig.from_table(auth, hostname="mx.test.example")
    resolver = Resolver([server], timeout=TIMEOUT, lifetime=2 * TIMEOUT)
    return Checks(auth=config, dnsbl=dnsbl, resolver=resolver, seed=seed)


def spf_of(server: str, ip: str, helo: str, sender: str, **auth: Any) -> SpfVerdicts:
    async def go() -> SpfVerdicts:
        checks = checks_for(server, **auth)
        try:
            return await checks.at_mail(ip, helo, sender)
        finally:
            checks.close()

    return run(go)


def message(
    from_: str = "Alice <alice@example.com>", body: bytes = b"Hello.\r\n", extra: bytes = b""
) -> bytes:
    return (
        extra
        + f"From: {from_}\r\nTo: bob@test.example\r\nSubject: test\r\n".encode()
        + b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
        + body
    )


def signed(msg: bytes, selector: str = "rsa", domain: str = "example.com") -> bytes:
    if selector == "ed":
        sig = dkim.sign(
            msg, b"ed", domain.encode(), ED_PRIVATE, signature_algorithm=b"ed25519-sha256"
        )
    else:
        sig = dkim.sign(msg, selector.encode(), domain.encode(), RSA_PRIVATE)
    return sig + msg


def end_of(server: str, msg: bytes | Path, spf: SpfVerdicts | None = None, **auth: Any) -> Any:
    async def go() -> Any:
        checks = checks_for(server, **auth)
        try:
            return await checks.at_end_of_message(msg, spf or SpfVerdicts())
        finally:
            checks.close()

    return run(go)


# --- SPF ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "sender", "result"),
    [
        ("127.0.0.1", "alice@example.com", "pass"),
        ("192.0.2.1", "alice@example.com", "fail"),
        ("127.0.0.9", "alice@mxonly.example.com", "pass"),
        ("127.0.0.8", "alice@mxonly.example.com", "fail"),
        ("192.0.2.1", "alice@soft.example.com", "softfail"),
        ("192.0.2.1", "alice@neutral.example.com", "neutral"),
        ("192.0.2.1", "alice@nospf.example.com", "none"),
        ("192.0.2.1", "alice@nxdomain.example.com", "none"),
        ("127.0.0.1", "alice@broken.example.com", "permerror"),
        ("127.0.0.10", "alice@inc.example.com", "pass"),
        ("127.0.0.11", "alice@inc.example.com", "fail"),
        ("127.0.0.1", "alice@macro.example.com", "pass"),
        ("127.0.0.1", "bob@macro.example.com", "fail"),
        ("127.0.0.1", "alice@dnsfail.example.com", "temperror"),
    ],
)
def test_spf_mail_from(server: str, ip: str, sender: str, result: str) -> None:
    verdicts = spf_of(server, ip, "client.test.example", sender)
    assert verdicts.mailfrom is not None
    assert verdicts.mailfrom.result == result
    assert verdicts.mailfrom.domain == sender.partition("@")[2]
    assert verdicts.refusal is None  # reject_spf_fail is off by default


def test_spf_helo_and_null_sender(server: str) -> None:
    verdicts = spf_of(server, "127.0.0.1", "mail.example.com", "")
    assert verdicts.helo is not None and verdicts.mailfrom is not None
    assert (verdicts.helo.result, verdicts.helo.identity) == ("pass", "helo")
    # RFC 7208 2.4: the null path is checked as postmaster@<HELO>.
    assert verdicts.mailfrom.result == "pass"
    assert verdicts.mailfrom.sender == "postmaster@mail.example.com"
    other = spf_of(server, "127.0.0.2", "mail.example.com", "alice@example.com")
    assert other.helo is not None and other.helo.result == "fail"
    assert other.mailfrom is not None and other.mailfrom.result == "pass"
    literal = spf_of(server, "127.0.0.1", "[127.0.0.1]", "alice@example.com")
    assert literal.helo is not None and literal.helo.result == "none"


def test_spf_timeout_is_temperror_within_bounds(server: str, zone: AuthZone) -> None:
    zone.add("slowspf.example.com", "TXT", "v=spf1 include:silent.example.net -all")
    zone.silent.add("silent.example.net")
    started = time.monotonic()
    verdicts = spf_of(server, "127.0.0.1", "client.test.example", "a@slowspf.example.com")
    assert verdicts.mailfrom is not None and verdicts.mailfrom.result == "temperror"
    assert time.monotonic() - started < 5 * TIMEOUT + 1


def test_spf_refusals_when_rejecting(server: str) -> None:
    fail = spf_of(server, "192.0.2.1", "c.test", "alice@example.com", reject_spf_fail=True)
    assert fail.refusal is not None
    assert fail.refusal.reply() == Reply(
        code=550, enhanced="5.7.23", text="SPF validation failed for example.com"
    )
    temp = spf_of(server, "127.0.0.1", "c.test", "a@dnsfail.example.com", reject_spf_fail=True)
    assert temp.refusal is not None and (temp.refusal.code, temp.refusal.enhanced) == (451, "4.4.3")
    soft = spf_of(server, "192.0.2.1", "c.test", "a@soft.example.com", reject_spf_fail=True)
    assert soft.refusal is None
    passed = spf_of(server, "127.0.0.1", "c.test", "alice@example.com", reject_spf_fail=True)
    assert passed.refusal is None


def test_spf_off(server: str) -> None:
    assert spf_of(server, "192.0.2.1", "c.test", "alice@example.com", spf=False) == SpfVerdicts()


# --- DKIM and ARC ---------------------------------------------------------------


def test_dkim_rsa_and_ed25519_pass(server: str) -> None:
    msg = signed(signed(message(), "ed"), "rsa")
    end = end_of(server, msg)
    assert [(d.result, d.selector, d.algorithm) for d in end.dkim] == [
        ("pass", "rsa", "rsa-sha256"),
        ("pass", "ed", "ed25519-sha256"),
    ]
    assert all(d.domain == "example.com" for d in end.dkim)
    text = end.field.decode()
    assert "dkim=pass header.d=example.com header.s=rsa header.a=rsa-sha256" in text
    assert f'header.b="{end.dkim[0].signature[:8]}"' in text or (
        f"header.b={end.dkim[0].signature[:8]}" in text
    )
    assert "dkim=pass header.d=example.com header.s=ed header.a=ed25519-sha256" in text


def test_dkim_from_a_file_with_lf_line_ends(server: str, tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(signed(message()).replace(b"\r\n", b"\n"))
    end = end_of(server, path)
    assert [d.result for d in end.dkim] == ["pass"]


def test_dkim_broken_body_hash(server: str) -> None:
    msg = signed(message(body=b"Pay 10 euros.\r\n")).replace(b"10 euros", b"1000 euros")
    end = end_of(server, msg)
    assert [d.result for d in end.dkim] == ["fail"]
    assert "body hash" in end.dkim[0].reason
    assert b"dkim=fail (body hash mismatch" in end.field


def test_dkim_missing_key_and_dns_failure(server: str) -> None:
    missing = end_of(server, signed(message(), "nokey"))
    assert [(d.result, d.reason) for d in missing.dkim] == [("permerror", "no key")]
    failing = end_of(server, signed(message(), "slow"))
    assert [d.result for d in failing.dkim] == ["temperror"]
    # A DMARC that could have passed through that signature is not a failure.
    assert failing.dmarc.result == "temperror"
    assert failing.refusal is None


def test_dkim_none_and_over_the_size_cap(server: str) -> None:
    end = end_of(server, message())
    assert end.dkim == ()
    assert b"dkim=none" in end.field
    big = signed(message(body=b"x" * 2000 + b"\r\n"))
    capped = end_of(server, big, dkim_max_size=1024)
    assert [d.result for d in capped.dkim] == ["policy"]
    assert capped.arc is None
    # The From domain's reject policy is not applied to a message whose
    # aligned signature was not verified.
    assert capped.dmarc.result == "fail" and capped.refusal is None


def test_arc_chain_sealed_and_verified(server: str) -> None:
    msg = message(
        from_="alice@example.com",
        extra=b"Authentication-Results: forwarder.example.org; spf=pass\r\n",
    )
    seal = dkim.arc_sign(
        msg, b"arc", b"forwarder.example.org", RSA_PRIVATE, b"forwarder.example.org"
    )
    sealed = b"".join(seal) + msg
    end = end_of(server, sealed)
    assert end.arc is not None and (end.arc.result, end.arc.instances) == ("pass", 1)
    assert b"arc=pass" in end.field
    tampered = sealed.replace(b"Subject: test", b"Subject: changed")
    assert end_of(server, tampered).arc.result == "fail"
    assert end_of(server, msg).arc.result == "none"


# --- DMARC ----------------------------------------------------------------------


def dmarc_of(
    server: str,
    from_domain: str,
    *,
    spf_domain: str | None = None,
    spf_result: str = "pass",
    dkim_domain: str | None = None,
    seed: int = 1,
) -> Any:
    spf = None
    if spf_domain is not None:
        spf = SpfVerdict(
            identity="mailfrom",
            result=spf_result,  # type: ignore[arg-type]
            domain=spf_domain,
            sender=f"bounce@{spf_domain}",
        )
    signatures = []
    if dkim_domain is not None:
        signatures.append(DkimVerdict(result="pass", domain=dkim_domain, selector="s"))
    headers = ((b"From", f" Alice <alice@{from_domain}>".encode()),)

    async def go() -> Any:
        resolver = Resolver([server], timeout=TIMEOUT, lifetime=2 * TIMEOUT)
        return await evaluate_dmarc(resolver, headers, spf, signatures, random.Random(seed))

    return run(go)


def test_dmarc_alignment(server: str) -> None:
    by_spf = dmarc_of(server, "example.com", spf_domain="bounces.example.com")
    assert (by_spf.result, by_spf.spf_aligned, by_spf.dkim_aligned) == ("pass", True, False)
    by_dkim = dmarc_of(server, "example.com", dkim_domain="example.com")
    assert (by_dkim.result, by_dkim.dkim_aligned) == ("pass", True)
    unaligned = dmarc_of(
        server, "example.com", spf_domain="example.net", dkim_domain="signer.example.net"
    )
    assert (unaligned.result, unaligned.policy, unaligned.disposition) == (
        "fail",
        "reject",
        "reject",
    )
    softfail = dmarc_of(server, "example.com", spf_domain="example.com", spf_result="softfail")
    assert softfail.result == "fail"
    strict = dmarc_of(server, "strict.example", spf_domain="mail.strict.example")
    assert strict.result == "fail"
    assert dmarc_of(server, "strict.example", dkim_domain="strict.example").result == "pass"


def test_dmarc_policies_sp_pct_and_organizational_domain(server: str) -> None:
    quarantine = dmarc_of(server, "quarantine.example")
    assert (quarantine.result, quarantine.disposition) == ("fail", "quarantine")
    lax = dmarc_of(server, "lax.example")
    assert (lax.result, lax.disposition) == ("fail", "none")
    # sp applies to a subdomain found through the organizational domain.
    sub = dmarc_of(server, "news.example.com")
    assert (sub.record_domain, sub.policy, sub.disposition) == (
        "example.com",
        "quarantine",
        "quarantine",
    )
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    uk = dmarc_of(server, "mail.example.co.uk")
    assert (uk.record_domain, uk.policy) == ("example.co.uk", "reject")
    for seed in range(20):
        pct0 = dmarc_of(server, "pct0.example", seed=seed)
        assert (pct0.result, pct0.disposition, pct0.sampled_out) == ("fail", "quarantine", True)
        full = dmarc_of(server, "example.com", seed=seed)
        assert (full.disposition, full.sampled_out) == ("reject", False)
    assert dmarc_of(server, "nodmarc.example").result == "none"
    assert dmarc_of(server, "dmarcfail.example").result == "temperror"


def test_dmarc_from_field_rules(server: str) -> None:
    async def of(headers: tuple[tuple[bytes, bytes], ...]) -> Any:
        resolver = Resolver([server], timeout=TIMEOUT, lifetime=2 * TIMEOUT)
        return await evaluate_dmarc(resolver, headers, None, [], random.Random(1))

    two = run(lambda: of(((b"From", b" a@example.com"), (b"From", b" b@example.com"))))
    assert two.result == "permerror"
    both = run(lambda: of(((b"From", b" a@example.com, b@example.org"),)))
    assert both.result == "permerror"
    assert run(lambda: of(())).result == "permerror"
    folded = run(lambda: of(((b"FROM", b" Alice\r\n <a@example.com>"),)))
    assert (folded.result, folded.from_domain) == ("fail", "example.com")


def test_end_of_message_policy_replies(server: str) -> None:
    spf_pass = SpfVerdicts(
        mailfrom=SpfVerdict(
            identity="mailfrom", result="pass", domain="example.com", sender="a@example.com"
        )
    )
    good = end_of(server, message(), spf_pass)
    assert (good.dmarc.result, good.refusal, good.quarantine) == ("pass", None, None)
    assert b"dmarc=pass (p=reject dis=none) header.from=example.com" in good.field
    forged = end_of(server, message())
    assert forged.refusal is not None
    assert forged.refusal.reply() == Reply(
        code=550, enhanced="5.7.1", text="Email rejected per DMARC policy for example.com"
    )
    lenient = end_of(server, message(), reject_dmarc=False)
    assert lenient.refusal is None and lenient.quarantine is not None
    quarantined = end_of(server, message(from_="q@quarantine.example"))
    assert quarantined.refusal is None
    assert quarantined.quarantine == (
        b"X-MMDF-Quarantine: DMARC policy quarantine of quarantine.example\r\n"
    )
    dkim_passed = end_of(server, signed(message()))
    assert dkim_passed.dmarc.result == "pass" and dkim_passed.refusal is None


def test_results_field_whole(server: str) -> None:
    spf = spf_of(server, "127.0.0.1", "mail.example.com", "alice@example.com")
    end = end_of(server, signed(message()), spf)
    lines = end.field.split(b"\r\n")
    assert lines[0] == b"Authentication-Results: mx.test.example;"
    assert lines[1] == b"\tspf=pass smtp.mailfrom=alice@example.com;"
    assert lines[2] == b"\tspf=pass smtp.helo=mail.example.com;"
    assert lines[3].startswith(b"\tdkim=pass header.d=example.com header.s=rsa")
    assert b"\tarc=none;" in lines
    assert lines[-2] == b"\tdmarc=pass (p=reject dis=none) header.from=example.com"
    assert lines[-1] == b""
    assert all(len(line) <= 78 for line in lines)
    assert authentication_results("mx.test.example") == (
        b"Authentication-Results: mx.test.example; none\r\n"
    )


def test_forged_results_removed_from_header() -> None:
    header = (
        b"Received: from x\r\n"
        b"Authentication-Results: MX.Test.Example (forged) 1;\r\n\tdkim=pass\r\n"
        b"Authentication-Results: other.example; spf=pass\r\n"
        b"Subject: hi\r\n"
    )
    kept, removed = remove_claiming_fields(header, "mx.test.example")
    assert removed == 1
    assert kept == (
        b"Received: from x\r\nAuthentication-Results: other.example; spf=pass\r\nSubject: hi\r\n"
    )


# --- DNSBL ----------------------------------------------------------------------


def blocklists(zone: AuthZone) -> None:
    zone.add("2.0.0.127.bl.example", "A", "127.0.0.2", ttl=60)
    zone.add("2.0.0.127.multi.example", "A", "127.0.0.4", "127.0.0.10", ttl=60)
    zone.add("3.0.0.127.multi.example", "A", "127.0.0.20", ttl=60)
    zone.add("2.0.0.127.wl.example", "A", "127.0.2.1", ttl=60)
    v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0"
    zone.add(f"{v6}.bl.example", "A", "127.0.0.2", ttl=60)
    zone.silent.add("2.0.0.127.slow.example")


def dnsbl_of(server: str, zones: list[str], address: str, threshold: int = 1) -> Any:
    config = DnsblConfig.from_table({"zones": zones, "threshold": threshold, "timeout": TIMEOUT})

    async def go() -> Any:
        checks = Checks(
            auth=None,
            dnsbl=config,
            resolver=Resolver([server], timeout=TIMEOUT, lifetime=2 * TIMEOUT),
        )
        try:
            return await checks.at_connect(address)
        finally:
            checks.close()

    return run(go)


def test_dnsbl_listed_and_not(server: str, zone: AuthZone) -> None:
    blocklists(zone)
    listed = dnsbl_of(server, ["bl.example*2", "multi.example"], "127.0.0.2")
    assert listed.score == 3
    assert [(entry.zone, entry.weight) for entry in listed.listings] == [
        ("bl.example", 2),
        ("multi.example", 1),
    ]
    assert listed.refusal.reply() == Reply(
        code=554,
        enhanced="5.7.1",
        text="Service unavailable; client [127.0.0.2] blocked using bl.example",
    )
    clean = dnsbl_of(server, ["bl.example*2", "multi.example"], "127.0.0.6")
    assert (clean.score, clean.listings, clean.refusal) == (0, (), None)
    assert dnsbl_of(server, [], "127.0.0.2").refusal is None


def test_dnsbl_filters_allow_lists_and_threshold(server: str, zone: AuthZone) -> None:
    blocklists(zone)
    filtered = dnsbl_of(server, ["multi.example=127.0.0.[2..11]*3"], "127.0.0.3")
    assert filtered.score == 0  # answered 127.0.0.20, outside the filter
    hit = dnsbl_of(server, ["multi.example=127.0.0.2;127.0.0.4*3"], "127.0.0.2")
    assert hit.score == 3 and hit.listings[0].answers == ("127.0.0.4",)
    allowed = dnsbl_of(server, ["bl.example", "wl.example=127.0.[0..255].[1..3]*-2"], "127.0.0.2")
    assert allowed.score == -1 and allowed.refusal is None
    under = dnsbl_of(server, ["bl.example*2"], "127.0.0.2", threshold=3)
    assert under.score == 2 and under.refusal is None


def test_dnsbl_ipv6(server: str, zone: AuthZone) -> None:
    blocklists(zone)
    assert query_name("::1", "bl.example").startswith("1.0.0.0.")
    assert dnsbl_of(server, ["bl.example"], "::1").score == 1
    assert query_name("::ffff:127.0.0.2", "bl.example") == "2.0.0.127.bl.example"


def test_dnsbl_zone_timing_out_counts_as_not_listing(server: str, zone: AuthZone) -> None:
    blocklists(zone)
    started = time.monotonic()
    verdict = dnsbl_of(server, ["slow.example*5", "bl.example"], "127.0.0.2")
    elapsed = time.monotonic() - started
    assert verdict.score == 1 and verdict.unanswered == ("slow.example",)
    assert elapsed < 2 * TIMEOUT + 1


def test_dnsbl_cache_follows_ttl(server: str, zone: AuthZone) -> None:
    blocklists(zone)
    zone.add("5.0.0.127.ttl.example", "A", "127.0.0.2", ttl=30)
    now = [1000.0]
    config = DnsblConfig.from_table({"zones": ["ttl.example"], "timeout": TIMEOUT})

    async def go() -> list[int]:
        resolver = Resolver([server], timeout=TIMEOUT, lifetime=2 * TIMEOUT)
        lists = Dnsbl(config, resolver, clock=lambda: now[0], cache_size=4)
        scores = []
        for advance in (0, 29, 2):
            now[0] += advance
            scores.append((await lists.check("127.0.0.5")).score)
        return scores

    before = zone.queries.count(("5.0.0.127.ttl.example", "A"))
    assert run(go) == [1, 1, 1]
    # Asked at t=0, answered from the cache at t=29, asked again after 30 s.
    assert zone.queries.count(("5.0.0.127.ttl.example", "A")) - before == 2


# --- the resolver's cache ----------------------------------------------------------


def test_resolver_keeps_answers_for_their_ttl_and_asks_again_after_a_failure(
    server: str, zone: AuthZone
) -> None:
    zone.add("kept.cache.example", "TXT", "v=spf1 -all", ttl=300)
    zone.add("fleeting.cache.example", "TXT", "v=spf1 ~all", ttl=0)
    zone.servfail.add("broken.cache.example")

    async def go(cache_size: int) -> tuple[list[tuple[str, ...]], int]:
        resolver = Resolver([server], timeout=TIMEOUT, lifetime=2 * TIMEOUT, cache_size=cache_size)
        texts = []
        for name in ["kept.cache.example", "fleeting.cache.example"] * 2:
            texts.append((await resolver.query(name, "TXT")).texts)
        failures = 0
        for _ in range(2):
            with pytest.raises(DnsTemporaryError):
                await resolver.query("broken.cache.example", "TXT")
            failures += 1
        return texts, failures

    def asked(name: str) -> int:
        return zone.queries.count((name, "TXT"))

    names = ("kept.cache.example", "fleeting.cache.example", "broken.cache.example")
    before = {name: asked(name) for name in names}
    texts, failures = run(lambda: go(100))
    assert texts == [("v=spf1 -all",), ("v=spf1 ~all",)] * 2 and failures == 2
    # The record is asked once; one with no time to live, and a failure, each time.
    assert [asked(name) - before[name] for name in names] == [1, 2, 2]

    before = {name: asked(name) for name in names}
    run(lambda: go(0))  # no cache: every look-up is a query
    assert [asked(name) - before[name] for name in names] == [2, 2, 2]


def test_resolver_keeps_no_such_name_and_no_such_record_for_the_negative_ttl() -> None:
    zone = AuthZone(soa="ns.example. hostmaster.example. 1 7200 900 86400 60")
    zone.add("records.example", "A", "192.0.2.1")  # the name exists; it has no TXT

    async def go(address: str) -> list[tuple[bool, tuple[str, ...]]]:
        resolver = Resolver([address], timeout=TIMEOUT, lifetime=2 * TIMEOUT, cache_size=100)
        found = []
        for name in ["absent.example", "records.example"] * 2:
            answer = await resolver.query(name, "TXT")
            found.append((answer.exists, answer.texts))
        return found

    with auth_dns_server(zone) as address:
        assert run(lambda: go(address)) == [(False, ()), (True, ())] * 2
    assert zone.queries == [("absent.example", "TXT"), ("records.example", "TXT")]


# --- configuration ----------------------------------------------------------------


def test_auth_config() -> None:
    config = AuthConfig.from_table({}, hostname="mx.example.org")
    assert (config.authserv_id, config.reject_spf_fail, config.reject_dmarc) == (
        "mx.example.org",
        False,
        True,
    )
    for table, key in [
        ({"spf": "yes"}, "auth.spf"),
        ({"authserv_id": "a b"}, "auth.authserv_id"),
        ({"authserv_id": ""}, "auth.authserv_id"),
        ({"rejects": True}, "rejects"),
        ({"dkim_max_size": 10}, "auth.dkim_max_size"),
    ]:
        with pytest.raises(ValueError, match=key):
            AuthConfig.from_table(table, hostname="mx.example.org")


def test_dnsbl_config() -> None:
    config = DnsblConfig.from_table({"zones": ["zen.example.net*2"], "threshold": 2})
    assert (str(config.sites[0]), config.threshold) == ("zen.example.net*2", 2)
    for table, key in [
        ({"zones": "zen.example.net"}, "dnsbl.zones"),
        ({"zones": ["zen.example.net=127.0.0"]}, "four octets"),
        ({"zones": ["zen.example.net=127.0.0.[9..2]"]}, "empty range"),
        ({"zones": ["zen.example.net=127.0.0.256"]}, "not an address octet"),
        ({"zones": ["zen.example.net*x"]}, "zone"),
        ({"threshold": "1"}, "dnsbl.threshold"),
        ({"timeout": 0}, "dnsbl.timeout"),
        ({"zone": []}, "unknown key"),
    ]:
        with pytest.raises(ValueError, match=key):
            DnsblConfig.from_table(table)


async def feed(path: Path, data: bytes, written: list[int]) -> None:
    """Write ``data`` into the FIFO ``path`` for its next reader, a chunk a loop callback.

    Each chunk written is put in ``written``; a reader that stops reading
    early (closes) ends the feed.
    """
    loop = asyncio.get_running_loop()
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY)  # until a reader opens it
    os.set_blocking(fd, False)
    sent = 0
    try:
        while sent < len(data):
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            try:
                sent += os.write(fd, data[sent : sent + 65536])
            except BrokenPipeError:
                return
            written.append(sent)
    finally:
        os.close(fd)


def test_verification_leaves_the_loop_free(server: str, tmp_path: Path) -> None:
    """The loop turns while a message is verified: it is the loop that feeds it the message.

    The message is a FIFO that the loop writes a chunk a callback: the
    verification (its header read in a thread, the signature checked in a
    worker process) cannot end before the loop's last callback; run on the
    loop, it would wait for ever for a loop it blocks.
    """
    big = signed(message(body=(b"x" * 76 + b"\r\n") * 55_000))  # 4 MiB of base64-like lines
    fifo = tmp_path / "message"
    os.mkfifo(fifo)

    async def go() -> tuple[list[str], list[int], Any]:
        checks = checks_for(server)
        order: list[str] = []
        written: list[int] = []
        try:
            verification = asyncio.ensure_future(checks.at_end_of_message(fifo, SpfVerdicts()))
            verification.add_done_callback(lambda _: order.append("verified"))
            await feed(fifo, big, written)  # the header, read in a thread
            order.append("header fed")
            await feed(fifo, big, written)  # the message, read by the worker process
            order.append(f"message fed, pending: {not verification.done()}")
            return order, written, await verification
        finally:
            checks.close()

    order, written, end = run(go)
    assert [d.result for d in end.dkim] == ["pass"]
    assert order == ["header fed", "message fed, pending: True", "verified"]
    assert written[-1] == len(big) and len(written) > 2  # many loop callbacks, all before the end
