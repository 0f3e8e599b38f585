"""DKIM (RFC 6376; Ed25519 per RFC 8463) and ARC (RFC 8617) verification, by dkimpy.

dkimpy does the cryptography and canonicalization; this module turns its
booleans and exceptions into verdicts that keep apart what RFC 8601 2.7.1
keeps apart: a bad signature (``fail``), a missing key (``permerror``), a
signature that cannot be parsed (``neutral``), a key too small or a message
too large to verify (``policy``) and a DNS failure (``temperror``).  dkimpy
reads a DNS failure as "no key"; the look-up function given to it here
records each key's outcome, so a DNS failure is told apart.

Where it runs: in two steps.  :func:`key_names` reads the key names from
the header (DKIM-Signature, ARC-Seal, ARC-Message-Signature ``s=``/``d=``)
and :func:`fetch_keys` fetches them all at once on the event loop through
the resolver.  Then :func:`verify_message`, which needs no DNS, does the
CPU work (parsing, canonicalization, hashing the body, RSA or Ed25519) in
a worker *process*: dkimpy's parse and canonicalization are long calls
that hold the GIL (a 4 MiB message stalled a loop beside a worker thread
for 50-100 ms), so a thread would not keep the loop free.  dkimpy's own
asyncio support covers DKIM only (not ARC), wants aiodns, and would hash
on the loop.

Memory: dkimpy verifies a message held in memory, and its parse and
canonicalization make copies (about four times the message at the peak).
So the bytes verified are bounded: a message larger than ``max_size``
(``[auth] dkim_max_size``, 16 MiB by default) is not read beyond its
header; each of its signatures gets ``policy`` ("message too large to
verify") and ARC is not evaluated (no ``arc=`` result).  The caller
bounds how many verifications run at once (the combiner's process pool
has ``verifications`` processes), so the memory of all verifications
together is bounded too.  A message may
be given as bytes or as the path of its file; from a file only
``max_size + 1`` bytes are ever read.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, cast

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from .config import DEFAULT_MAX_SIZE
from .dns import DnsTemporaryError, Resolver
from .verdicts import ArcResult, ArcVerdict, DkimResult, DkimVerdict

# RFC 8301 3.2: "Verifiers MUST NOT consider signatures using RSA keys of
# less than 1024 bits as valid signatures."
MIN_RSA_BITS = 1024
# A header block larger than this is not a header worth parsing (RFC 5322
# lines are at most 998 octets; this is thousands of fields).
MAX_HEADER_SIZE = 1024 * 1024

# RFC 6376 6.1: "Verifiers MAY limit the number of signatures they will attempt to verify";
# past this many, a signature is not verified (policy).
MAX_SIGNATURES = 10
MAX_ARC_SETS = 50  # RFC 8617 4.2.1

MessageSource = bytes | PathLike[str] | str
TEMPORARY = "temporary"  # a key record whose look-up failed
KeyRecord = bytes | str | None  # the TXT record, TEMPORARY, or None: there is none

_quiet = logging.getLogger("mmdf_smtp.checks.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimReport:
    """Every signature's verdict, ARC's (None: not evaluated), and the header fields seen."""

    signatures: tuple[DkimVerdict, ...] = ()
    arc: ArcVerdict | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # (name, value) as received, unfolded not
    too_large: bool = False


@dataclass(slots=True)
class _KeyLookups:
    """dkimpy's ``dnsfunc`` over the keys fetched beforehand, remembering what it gave."""

    records: Mapping[str, KeyRecord]
    outcomes: dict[str, str] = field(default_factory=dict)  # name: "found" | "absent" | "temporary"

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        key = text.rstrip(".").lower()
        # A name not fetched beforehand (there is none) cannot be asked now.
        record = self.records.get(key, TEMPORARY)
        if record == TEMPORARY:
            self.outcomes[key] = "temporary"
            # dkimpy turns this into "signature does not verify": the
            # outcome recorded above makes it temperror.
            raise dkim.DnsTimeoutError(key)
        if record is None:
            self.outcomes[key] = "absent"
            return None
        self.outcomes[key] = "found"
        return cast(bytes, record)

    def outcome(self, selector: str, domain: str) -> str:
        return self.outcomes.get(f"{selector}._domainkey.{domain}".lower(), "")

    def any_temporary(self) -> bool:
        return "temporary" in self.outcomes.values()


def read_message(source: MessageSource, max_size: int) -> tuple[bytes, bool]:
    """The message's bytes, or only its header when it is over ``max_size``: (bytes, too_large)."""
    if isinstance(source, bytes):
        if len(source) <= max_size:
            return source, False
        return _header_of(source[: max_size + 1]), True
    with open(source, "rb") as file:
        data = file.read(max_size + 1)
    if len(data) <= max_size:
        return data, False
    return _header_of(data), True


def read_header(source: MessageSource) -> bytes:
    """The message's header block only (at most MAX_HEADER_SIZE octets read)."""
    if isinstance(source, bytes):
        return _header_of(source[: MAX_HEADER_SIZE + 4])
    with open(source, "rb") as file:
        return _header_of(file.read(MAX_HEADER_SIZE + 4))


def _header_of(data: bytes) -> bytes:
    match = re.search(rb"\r?\n\r?\n", data[:MAX_HEADER_SIZE])
    end = match.end() if match else min(len(data), MAX_HEADER_SIZE)
    return data[:end]


def parse_header(message: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The header fields of ``message`` as (name, raw value with its folds), in order.

    Lines that are not fields (an mbox "From " line, garbage) are skipped.
    """
    fields: list[list[bytes]] = []
    for line in re.split(rb"\r?\n", _header_of(message[: MAX_HEADER_SIZE + 4])):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += b"\r\n" + line
            continue
        name, colon, value = line.partition(b":")
        if colon and name and re.fullmatch(rb"[\x21-\x39\x3b-\x7e]+", name):
            fields.append([name, value])
    return tuple((name, value) for name, value in fields)


def key_names(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The key records the signatures of a header name: ``selector._domainkey.domain``.

    From the first :data:`MAX_SIGNATURES` DKIM-Signature fields, and from
    every ARC-Seal and ARC-Message-Signature of at most :data:`MAX_ARC_SETS`
    instances (RFC 8617 4.2.1).
    """
    names: dict[str, None] = {}
    dkim_seen = 0
    for name, value in headers:
        kind = name.lower()
        if kind == b"dkim-signature":
            dkim_seen += 1
            if dkim_seen > MAX_SIGNATURES:
                continue
        elif kind not in (b"arc-seal", b"arc-message-signature"):
            continue
        tags = _tags(value)
        selector = tags.get(b"s", b"").strip().decode("ascii", "replace")
        domain = tags.get(b"d", b"").strip().decode("ascii", "replace")
        if selector and domain:
            names[f"{selector}._domainkey.{domain}".rstrip(".").lower()] = None
    return list(names)[: MAX_SIGNATURES + 2 * MAX_ARC_SETS]


async def fetch_keys(resolver: Resolver, names: Sequence[str]) -> dict[str, KeyRecord]:
    """The key records of ``names``, all at once, on the loop: TXT, None (absent) or TEMPORARY."""

    async def one(name: str) -> KeyRecord:
        try:
            answer = await resolver.query(name, "TXT")
        except DnsTemporaryError:
            return TEMPORARY
        # RFC 6376 3.6.2.2: a key is one TXT record; more than one is the
        # publisher's error, and the first is what dkimpy would take.
        return answer.txts[0] if answer.txts else None

    records = await asyncio.gather(*(one(name) for name in names))
    return dict(zip(names, records, strict=True))


def too_large_report(headers: tuple[tuple[bytes, bytes], ...], max_size: int) -> DkimReport:
    """The report on a message over ``max_size``: each signature ``policy``, no ARC result."""
    verdicts = tuple(
        _unverified(value, "policy", f"message over {max_size} octets not verified")
        for name, value in headers
        if name.lower() == b"dkim-signature"
    )
    return DkimReport(signatures=verdicts, arc=None, headers=headers, too_large=True)


def verify_message(
    records: Mapping[str, KeyRecord],
    source: MessageSource,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    arc: bool = True,
) -> DkimReport:
    """Verify every DKIM-Signature and the ARC chain with the keys in ``records``.

    Pure CPU work, no DNS: :class:`~mmdf_smtp.checks.gate.Checks` runs it in a
    worker process, the keys fetched beforehand by :func:`fetch_keys`.
    """
    message, too_large = read_message(source, max_size)
    headers = parse_header(message)
    if too_large:
        return too_large_report(headers, max_size)
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    keys = _KeyLookups(records)
    try:
        verifier = dkim.DKIM(message, logger=_quiet, minkey=MIN_RSA_BITS)
    except dkim.DKIMException as exc:
        verdicts = tuple(_unverified(value, "neutral", str(exc)) for value in signatures)
        return DkimReport(signatures=verdicts, arc=_arc_unparsable(headers), headers=headers)
    verdicts = tuple(
        _verify_one(verifier, keys, index, value)
        if index < MAX_SIGNATURES
        else _unverified(value, "policy", f"more than {MAX_SIGNATURES} signatures")
        for index, value in enumerate(signatures)
    )
    arc_verdict = _verify_arc(message, records, headers) if arc else None
    return DkimReport(signatures=verdicts, arc=arc_verdict, headers=headers)


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return cast(dict[bytes, bytes], parse_tag_value(value))
    except InvalidTagValueList:
        return {}


def _described(value: bytes, result: DkimResult, reason: str = "") -> DkimVerdict:
    tags = _tags(value)

    def text(tag: bytes) -> str:
        return re.sub(r"\s+", "", tags.get(tag, b"").decode("ascii", "replace"))

    return DkimVerdict(
        result=result,
        domain=text(b"d").lower(),
        selector=text(b"s"),
        signature=text(b"b"),
        algorithm=text(b"a").lower(),
        reason=reason,
    )


_unverified = _described


def _verify_one(verifier: dkim.DKIM, keys: _KeyLookups, index: int, value: bytes) -> DkimVerdict:
    described = _described(value, "fail")
    # dkimpy keeps the last key on the object; a key that cannot be parsed
    # leaves it unset, which is how it is told apart from a bad signature.
    verifier.pk = None
    try:
        valid = verifier.verify(idx=index, dnsfunc=keys)
    except dkim.ValidationError as exc:
        # The body hash or the header's signature does not match.
        reason = str(exc)
        if reason.startswith("body hash mismatch"):
            reason = "body hash mismatch"  # without dkimpy's two hashes
        return _described(value, "fail", reason)
    except dkim.KeyFormatError as exc:
        # Raised by dkimpy after the key was found: too small for RFC 8301.
        return _described(value, "policy", str(exc))
    except dkim.DKIMException as exc:
        # Unparsable signature field, unknown algorithm or canonicalization.
        return _described(value, "neutral", str(exc))
    if valid:
        return _described(value, "pass")
    outcome = keys.outcome(described.selector, described.domain)
    if outcome == "temporary":
        return _described(value, "temperror", "key look-up failed")
    if outcome == "absent":
        return _described(value, "permerror", "no key")
    if outcome == "found" and not _key_usable(verifier):
        return _described(value, "permerror", "key unusable")
    return _described(value, "fail", "signature did not verify")


def _key_usable(verifier: dkim.DKIM) -> bool:
    # A revoked key (empty p=, RFC 6376 3.6.1) cannot be parsed either.
    return getattr(verifier, "pk", None) is not None


def _arc_unparsable(headers: tuple[tuple[bytes, bytes], ...]) -> ArcVerdict | None:
    sets = _arc_instances(headers)
    if not sets:
        return ArcVerdict(result="none")
    return ArcVerdict(result="fail", instances=sets, reason="message cannot be parsed")


def _arc_instances(headers: tuple[tuple[bytes, bytes], ...]) -> int:
    instances = set()
    for name, value in headers:
        if name.lower() == b"arc-seal":
            instance = _tags(value).get(b"i", b"")
            if instance.strip().isdigit():
                instances.add(int(instance))
    return len(instances)


def _verify_arc(
    message: bytes, records: Mapping[str, KeyRecord], headers: tuple[tuple[bytes, bytes], ...]
) -> ArcVerdict:
    instances = _arc_instances(headers)
    if not instances and not any(
        name.lower() in (b"arc-message-signature", b"arc-authentication-results")
        for name, _ in headers
    ):
        return ArcVerdict(result="none")
    if instances > MAX_ARC_SETS:
        # RFC 8617 4.2.1: more than 50 sets is a failed chain.
        return ArcVerdict(result="fail", instances=instances, reason="too many ARC sets")
    keys = _KeyLookups(records)
    try:
        chain: Any
        chain, _results, reason = dkim.ARC(message, logger=_quiet, minkey=MIN_RSA_BITS).verify(
            dnsfunc=keys
        )
    except dkim.DKIMException as exc:
        return ArcVerdict(result="fail", instances=instances, reason=str(exc))
    text = chain.decode() if isinstance(chain, bytes) else str(chain or "fail")
    result: ArcResult = "pass" if text == "pass" else "none" if text == "none" else "fail"
    if result == "fail" and keys.any_temporary():
        result = "temperror"
    return ArcVerdict(result=result, instances=instances, reason=str(reason))
