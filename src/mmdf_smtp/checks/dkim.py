"""DKIM (RFC 6376; Ed25519 per RFC 8463) and ARC (RFC 8617) verification, by dkimpy.

dkimpy does the cryptography and canonicalization; this module turns its
booleans and exceptions into verdicts that keep apart what RFC 8601 2.7.1
keeps apart: a bad signature (``fail``), a missing key (``permerror``), a
signature that cannot be parsed (``neutral``), a key too small or a message
too large to verify (``policy``) and a DNS failure (``temperror``).  dkimpy
reads a DNS failure as "no key"; the look-up function given to it here
records each key look-up's outcome, so a DNS failure is told apart.

Threads: verification is CPU work (hashing up to the whole message, RSA or
Ed25519) and dkimpy resolves synchronously, so :func:`verify_message` is
called in a worker thread with :meth:`Resolver.blocking` as its look-up:
the loop neither hashes nor waits.  dkimpy's asyncio support covers DKIM
only (not ARC), wants aiodns, and would still hash on the loop.

Memory: dkimpy verifies a message held in memory, and its parse and
canonicalization make copies (about four times the message at the peak).
So the bytes verified are bounded: a message larger than ``max_size``
(``[auth] dkim_max_size``, 16 MiB by default) is not read beyond its
header; each of its signatures gets ``policy`` ("message too large to
verify") and ARC is not evaluated (no ``arc=`` result).  The caller
bounds how many verifications run at once (the combiner's semaphore), so
the memory of all verifications together is bounded too.  A message may
be given as bytes or as the path of its file; from a file only
``max_size + 1`` bytes are ever read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, cast

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from .dns import DnsTemporaryError, Lookup
from .verdicts import ArcResult, ArcVerdict, DkimResult, DkimVerdict

DEFAULT_MAX_SIZE = 16 * 1024 * 1024
# RFC 8301 3.2: "Verifiers MUST NOT consider signatures using RSA keys of
# less than 1024 bits as valid signatures."
MIN_RSA_BITS = 1024
# A header block larger than this is not a header worth parsing (RFC 5322
# lines are at most 998 octets; this is thousands of fields).
MAX_HEADER_SIZE = 1024 * 1024

MessageSource = bytes | PathLike[str] | str

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
    """dkimpy's ``dnsfunc`` over the resolver, remembering how each look-up ended."""

    lookup: Lookup
    outcomes: dict[str, str] = field(default_factory=dict)  # name: "found" | "absent" | "temporary"

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        key = text.rstrip(".").lower()
        try:
            answer = self.lookup(text, "TXT")
        except DnsTemporaryError:
            self.outcomes[key] = "temporary"
            # dkimpy turns this into "signature does not verify": the
            # outcome recorded above makes it temperror.
            raise dkim.DnsTimeoutError(key) from None
        if not answer.txts:
            self.outcomes[key] = "absent"
            return None
        self.outcomes[key] = "found"
        # RFC 6376 3.6.2.2: a key is one TXT record; more than one is the
        # publisher's error, and the first is what dkimpy would take.
        return answer.txts[0]

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


def verify_message(
    lookup: Lookup,
    source: MessageSource,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    arc: bool = True,
) -> DkimReport:
    """Verify every DKIM-Signature and the ARC chain; call it in a worker thread."""
    message, too_large = read_message(source, max_size)
    headers = parse_header(message)
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if too_large:
        verdicts = tuple(
            _unverified(value, "policy", f"message over {max_size} octets not verified")
            for value in signatures
        )
        return DkimReport(signatures=verdicts, arc=None, headers=headers, too_large=True)
    keys = _KeyLookups(lookup)
    try:
        verifier = dkim.DKIM(message, logger=_quiet, minkey=MIN_RSA_BITS)
    except dkim.DKIMException as exc:
        verdicts = tuple(_unverified(value, "neutral", str(exc)) for value in signatures)
        return DkimReport(signatures=verdicts, arc=_arc_unparsable(headers), headers=headers)
    verdicts = tuple(
        _verify_one(verifier, keys, index, value) for index, value in enumerate(signatures)
    )
    arc_verdict = _verify_arc(message, lookup, headers) if arc else None
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
    message: bytes, lookup: Lookup, headers: tuple[tuple[bytes, bytes], ...]
) -> ArcVerdict:
    instances = _arc_instances(headers)
    if not instances and not any(
        name.lower() in (b"arc-message-signature", b"arc-authentication-results")
        for name, _ in headers
    ):
        return ArcVerdict(result="none")
    keys = _KeyLookups(lookup)
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
