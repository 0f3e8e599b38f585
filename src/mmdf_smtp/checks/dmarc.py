"""DMARC (RFC 7489) over the SPF and DKIM verdicts.

Steps, as RFC 7489 6.6 orders them:

1. The RFC5322.From domain (6.6.1): exactly one From field holding exactly
   one address with a domain.  Anything else is ``permerror`` with no
   disposition: the RFC lets a receiver reject such a message but does not
   ask it to, and this module refuses nothing on its own.
2. Policy discovery (6.6.3): the TXT records at ``_dmarc.<From domain>``
   starting with ``v=DMARC1``; none there, those at
   ``_dmarc.<organizational domain>``.  Several records at one name is as
   good as none.  The organizational domain (3.2) is one label below the
   longest public suffix, from the ``publicsuffixlist`` package (it ships
   the list: nothing is fetched at run time).  A record without a valid
   ``p`` counts as ``p=none`` when it has ``rua``, else as no record.
3. Alignment (3.1): SPF of the MAIL FROM identity (the HELO identity for a
   null path, RFC 7208 2.4) that passed for a domain aligned with the From
   domain, or a DKIM signature that passed with an aligned ``d=``;
   relaxed (same organizational domain) or strict (same name), per
   ``aspf`` and ``adkim``.
4. Policy (6.3, 6.6.4): ``sp`` for a From domain below the organizational
   domain whose record was used, else ``p``; on failure the message is in
   the ``pct`` sample with probability pct/100, and out of it gets the next
   policy down (reject to quarantine, quarantine to none).  The sampling
   uses the ``random.Random`` given, so a seeded one is deterministic.

A DNS failure finding the record is ``temperror``.  A failure where an
identifier that would have aligned could not be checked (SPF or DKIM
``temperror``) is ``temperror`` too: a transient DNS fault must not turn
into a refusal.  An aligned signature left unverified because the message
was too large (DKIM ``policy``) gives ``fail`` with disposition none.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import replace
from email.headerregistry import AddressHeader, HeaderRegistry
from typing import cast

from publicsuffixlist import PublicSuffixList

from .dns import DnsTemporaryError, Resolver
from .verdicts import Disposition, DkimVerdict, DmarcVerdict, SpfVerdict

_registry = HeaderRegistry()
_POLICIES = ("none", "quarantine", "reject")
_LOWER: dict[Disposition, Disposition] = {
    "reject": "quarantine",
    "quarantine": "none",
    "none": "none",
}


@functools.cache
def public_suffixes() -> PublicSuffixList:
    """The public suffix list, read at its first use.

    Reading it takes tens of milliseconds, which no program that never
    evaluates DMARC (submit, checkque, deliver) should pay at start-up; a
    server that does evaluates it calls this before its loop starts.
    """
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (the name itself if it is a suffix)."""
    name = domain.lower().rstrip(".")
    suffix: str | None = public_suffixes().privatesuffix(name)
    return suffix or name


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 3.1: strict ("s") is the same name, relaxed ("r") the same organization."""
    left, right = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not left or not right:
        return False
    if mode == "s":
        return left == right
    return organizational_domain(left) == organizational_domain(right)


def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, str]:
    """The RFC5322.From domain, or ("", why not) (RFC 7489 6.6.1)."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return "", f"{len(values)} From fields"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
    try:
        addresses = cast(AddressHeader, _registry("from", text.strip())).addresses
    except Exception:  # the parser is lenient; a failure here is a malformed field
        return "", "From field cannot be parsed"
    if len(addresses) != 1:
        return "", f"{len(addresses)} addresses in From"
    domain = addresses[0].domain.strip().lower().rstrip(".")
    if not domain or "." not in domain:
        return "", "From address without a domain"
    return domain, ""


def parse_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record, or None when it is not one (RFC 7489 6.4)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.strip().partition("=")
        if not eq:
            if part.strip():
                return tags or None
            continue
        tags.setdefault(key.strip().lower(), value.strip())
    first = text.strip().split(";", 1)[0].replace(" ", "").replace("\t", "")
    if first != "v=DMARC1":
        return None
    return tags


async def _record(resolver: Resolver, domain: str) -> dict[str, str] | None:
    answer = await resolver.query(f"_dmarc.{domain}", "TXT")
    records = []
    for text in answer.txts:
        tags = parse_record(text.decode("utf-8", "replace"))
        if tags is not None:
            records.append(tags)
    return records[0] if len(records) == 1 else None


def _policy(value: str | None) -> Disposition | None:
    if value is None:
        return None
    word = value.strip().lower()
    return cast(Disposition, word) if word in _POLICIES else None


async def evaluate_dmarc(
    resolver: Resolver,
    headers: Sequence[tuple[bytes, bytes]],
    spf_mailfrom: SpfVerdict | None,
    signatures: Sequence[DkimVerdict],
    rng: random.Random,
) -> DmarcVerdict:
    """The DMARC verdict of a message whose header fields and other verdicts are given."""
    domain, why = from_domain(headers)
    if not domain:
        return DmarcVerdict(result="permerror", reason=why)
    organization = organizational_domain(domain)
    try:
        tags = await _record(resolver, domain)
        record_domain = domain
        if tags is None and organization != domain:
            tags = await _record(resolver, organization)
            record_domain = organization
    except DnsTemporaryError as exc:
        return DmarcVerdict(result="temperror", from_domain=domain, reason=str(exc))
    if tags is None:
        return DmarcVerdict(result="none", from_domain=domain)
    p, sp = _policy(tags.get("p")), tags.get("sp")
    if p is None or (sp is not None and _policy(sp) is None):
        # RFC 7489 6.6.3 step 6.
        if not tags.get("rua"):
            return DmarcVerdict(result="none", from_domain=domain, reason="invalid record")
        p, sp = "none", None
    policy: Disposition = p
    if record_domain != domain and sp is not None:
        policy = cast(Disposition, _policy(sp))
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    pct = min(max(pct, 0), 100)

    spf_aligned = bool(
        spf_mailfrom
        and spf_mailfrom.result == "pass"
        and aligned(spf_mailfrom.domain, domain, aspf)
    )
    dkim_aligned = any(s.result == "pass" and aligned(s.domain, domain, adkim) for s in signatures)
    base = DmarcVerdict(
        result="fail",
        from_domain=domain,
        policy=policy,
        record_domain=record_domain,
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
    )
    if spf_aligned or dkim_aligned:
        return replace(base, result="pass")
    spf_unknown = bool(
        spf_mailfrom
        and spf_mailfrom.result == "temperror"
        and aligned(spf_mailfrom.domain, domain, aspf)
    )
    dkim_unknown = [s for s in signatures if aligned(s.domain, domain, adkim)]
    if spf_unknown or any(s.result == "temperror" for s in dkim_unknown):
        return replace(
            base, result="temperror", reason="an aligned identifier could not be checked"
        )
    if any(s.result == "policy" for s in dkim_unknown):
        return replace(base, reason="aligned signature not verified")
    in_sample = rng.random() * 100 < pct
    return replace(
        base,
        disposition=policy if in_sample else _LOWER[policy],
        sampled_out=not in_sample and policy != "none",
    )
