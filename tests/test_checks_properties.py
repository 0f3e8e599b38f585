"""Properties of the checks' parsers: DNSBL sites, authserv-ids, results fields, DMARC records."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authdns import AuthZone, auth_dns_server
from mmdf_smtp.checks.config import Site
from mmdf_smtp.checks.dmarc import parse_record
from mmdf_smtp.checks.dns import DnsTemporaryError, Resolver
from mmdf_smtp.checks.results import (
    authentication_results,
    authserv_id_of,
    claims_authserv_id,
    pvalue,
    remove_claiming_fields,
)
from mmdf_smtp.checks.verdicts import DkimVerdict, SpfVerdict, SpfVerdicts

# --- DNSBL sites ------------------------------------------------------------------

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
zones = st.lists(label, min_size=2, max_size=4).map(".".join)
ranges = st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda r: (min(r), max(r)))
octets = st.lists(ranges, min_size=1, max_size=3).map(tuple)
patterns = st.tuples(octets, octets, octets, octets)
sites = st.builds(
    Site,
    zone=zones,
    patterns=st.lists(patterns, max_size=3).map(tuple),
    weight=st.integers(-20, 20),
)


@given(sites)
def test_site_round_trips(site: Site) -> None:
    assert Site.parse(str(site)) == site


@given(sites, st.tuples(*[st.integers(0, 255)] * 4))
def test_site_filter_matches_as_its_ranges_say(site: Site, answer: tuple[int, ...]) -> None:
    expected = not site.patterns or any(
        all(
            any(low <= value <= high for low, high in octet)
            for value, octet in zip(answer, p, strict=True)
        )
        for p in site.patterns
    )
    assert site.matches(".".join(map(str, answer))) == expected


@given(st.text(max_size=40))
def test_site_parser_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        Site.parse(text)


@pytest.mark.parametrize(
    ("text", "answers", "listed"),
    [
        ("bl.example=127.0.0.[2..11]", ["127.0.0.2", "127.0.0.11"], True),
        ("bl.example=127.0.0.[2..11]", ["127.0.0.1", "127.0.0.12"], False),
        ("bl.example=127.0.[0..255].[1..3]", ["127.0.200.3"], True),
        ("bl.example=127.0.0.2;127.0.0.4", ["127.0.0.4"], True),
        ("bl.example=127.0.0.2;127.0.0.4", ["127.0.0.3"], False),
        ("bl.example=127.0.0.[2;4;9..11]", ["127.0.0.10"], True),
        ("bl.example", ["127.0.0.255"], True),
    ],
)
def test_site_filters(text: str, answers: list[str], listed: bool) -> None:
    site = Site.parse(text)
    assert all(site.matches(a) == listed for a in answers)


# --- Authentication-Results: made, and read back ------------------------------------

ids = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True)
local_parts = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_characters="\x7f"),
    min_size=1,
    max_size=30,
)


@given(ids, local_parts, st.sampled_from(["pass", "fail", "temperror"]), label)
def test_made_field_claims_its_id_and_is_folded(
    authserv_id: str, local: str, result: str, selector: str
) -> None:
    spf = SpfVerdicts(
        mailfrom=SpfVerdict(
            identity="mailfrom",
            result=result,  # type: ignore[arg-type]
            domain="example.com",
            sender=f"{local}@example.com",
        )
    )
    dkim = [DkimVerdict(result="fail", domain="example.com", selector=selector, reason=local)]
    field = authentication_results(authserv_id, spf=spf, dkim=dkim)
    name, _, body = field.partition(b":")
    assert name == b"Authentication-Results"
    assert claims_authserv_id(body, authserv_id.upper())
    assert not claims_authserv_id(body, authserv_id + "x")
    assert field.endswith(b"\r\n")
    lines = field[:-2].split(b"\r\n")
    # Folded: every line after the first starts with white space, no bare CR or LF.
    assert all(line[:1] == b"\t" for line in lines[1:])
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    kept, removed = remove_claiming_fields(b"X: y\r\n" + field, authserv_id)
    assert (kept, removed) == (b"X: y\r\n", 1)


@given(local_parts)
def test_pvalue_is_a_token_address_or_quoted_string(text: str) -> None:
    value = pvalue(text)
    assert "\r" not in value and "\n" not in value
    if value.startswith('"'):
        assert value.endswith('"')
        inner = value[1:-1]
        assert inner.replace("\\\\", "").replace('\\"', "").count('"') == 0


comments = st.text(
    st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="()\\"), max_size=10
).map(lambda t: f"({t})")
spaces = st.sampled_from(["", " ", "\t", "\r\n ", "  "])


@given(ids, st.lists(st.tuples(spaces, comments), max_size=3), spaces, st.booleans())
def test_authserv_id_after_any_cfws(
    authserv_id: str, before: list[tuple[str, str]], after: str, versioned: bool
) -> None:
    prefix = "".join(space + comment for space, comment in before)
    version = " 1" if versioned else ""
    body = f"{prefix} {authserv_id}{after}{version}; spf=pass"
    assert authserv_id_of(body) == authserv_id


@given(st.binary(max_size=200))
def test_authserv_id_reader_never_raises(data: bytes) -> None:
    authserv_id_of(data)
    remove_claiming_fields(data, "mx.example.org")


@pytest.mark.parametrize(
    ("body", "claims"),
    [
        (" mx.example.org; spf=pass", True),
        (" MX.Example.ORG; spf=pass", True),
        (" mx.example.org 1; spf=pass", True),
        (" (forged (nested) comment) mx.example.org; dkim=pass", True),
        (' "mx.example.org"; dkim=pass', True),
        ("\r\n\tmx.example.org\r\n\t;\r\n\tdkim=pass", True),
        (" mx.example.org(comment)1; none", True),
        (" mx.example.org; none", True),
        (" mx.example.org.evil.example; spf=pass", False),
        (" evil.example; spf=pass smtp.mailfrom=mx.example.org", False),
        (" (mx.example.org) evil.example; spf=pass", False),
        (" (unclosed mx.example.org; spf=pass", False),
        (" ; spf=pass", False),
        ("", False),
    ],
)
def test_forged_results_recognised(body: str, claims: bool) -> None:
    assert claims_authserv_id(body, "mx.example.org") == claims


def test_remove_keeps_other_fields_and_folds() -> None:
    header = (
        b"Authentication-Results: mx.example.org;\n spf=pass\n"
        b"Authentication-Results : other.example; dkim=pass\n"
        b"authentication-results:(x)MX.example.org 1; dmarc=pass\n"
        b"Subject: s\n"
    )
    kept, removed = remove_claiming_fields(header, "mx.example.org")
    assert removed == 2
    assert kept == b"Authentication-Results : other.example; dkim=pass\nSubject: s\n"


# --- DMARC records ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tags"),
    [
        ("v=DMARC1; p=reject", {"v": "DMARC1", "p": "reject"}),
        (
            "v=DMARC1;p=none;sp=reject;pct=50",
            {"v": "DMARC1", "p": "none", "sp": "reject", "pct": "50"},
        ),
        ("v=DMARC1 ; p=quarantine ;", {"v": "DMARC1", "p": "quarantine"}),
        ("p=reject; v=DMARC1", None),
        ("v=spf1 -all", None),
        ("v=DMARC2; p=reject", None),
    ],
)
def test_dmarc_record_parse(text: str, tags: dict[str, str] | None) -> None:
    assert parse_record(text) == tags


@given(st.text(max_size=80))
def test_dmarc_record_parser_never_raises(text: str) -> None:
    parse_record(text)


# --- the resolver's answers -----------------------------------------------------------


def test_resolver_tells_nxdomain_nodata_failure_and_timeout_apart() -> None:
    zone = AuthZone()
    zone.add("host.example", "A", "127.0.0.7", ttl=42)
    zone.add("long.example", "TXT", "k=" + "x" * 600)
    zone.servfail.add("broken.example")
    zone.silent.add("silent.example")
    with auth_dns_server(zone) as server:

        async def go() -> None:
            resolver = Resolver([server], timeout=0.2, lifetime=0.4)
            found = await resolver.query("host.example", "A")
            assert (found.texts, found.ttl, found.exists) == (("127.0.0.7",), 42, True)
            nodata = await resolver.query("host.example", "TXT")
            assert (nodata.texts, nodata.exists) == ((), True)
            missing = await resolver.query("nowhere.example", "A")
            assert (missing.texts, missing.exists) == ((), False)
            long = await resolver.query("long.example", "TXT")
            assert long.txts == (b"k=" + b"x" * 600,) and len(long.strings[0]) == 3
            with pytest.raises(DnsTemporaryError):
                await resolver.query("broken.example", "A")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(DnsTemporaryError):
                await resolver.query("silent.example", "A")
            assert loop.time() - started < 1.0

        asyncio.run(go())


def test_resolver_rejects_bad_servers() -> None:
    with pytest.raises(ValueError, match="name server"):
        Resolver(["dns.example:53"])
    with pytest.raises(ValueError, match="port"):
        Resolver(["127.0.0.1:99999"])
    assert Resolver(["[::1]:5353", "127.0.0.1"]).lifetime > 0
