"""SPF (RFC 7208) of the MAIL FROM and HELO identities, by pyspf.

pyspf (module ``spf``) evaluates the record: mechanisms, macros
(RFC 7208 7), the limits of 10 DNS mechanisms and 2 void look-ups
(4.6.4).  It resolves synchronously, through its module-level
``spf.DNSLookup``.  This module replaces that function, once, by a
dispatcher that uses the look-up function set for the *current thread*
(and pyspf's own resolver in a thread that set none, so that other users
of pyspf in the process are unaffected).  :func:`check_spf` runs in a
worker thread, sets the thread's look-up to :meth:`Resolver.blocking`
(which submits each query to the event loop's resolver and waits at most
its lifetime), and runs pyspf.  So:

- the event loop never waits: pyspf's evaluation and its waits are in the
  worker thread, the DNS traffic is on the loop (dnspython's asyncio
  backend);
- every look-up has the resolver's bounds, and the whole evaluation has
  ``querytime`` (RFC 7208 4.6.4 allows a limit of at least 20 seconds),
  checked by pyspf between look-ups;
- a DNS failure is pyspf's ``TempError``, the ``temperror`` result
  (RFC 7208 2.6.6), never "none".

Writing SPF anew over the async resolver would have kept the thread out,
but macro expansion and the processing limits are where SPF
implementations go wrong; pyspf has passed the RFC 7208 test suite for
years.

A null reverse-path is checked as "postmaster@<HELO>" (RFC 7208 2.4); a
HELO that is an address literal or not a domain name gives "none" for the
HELO identity without a look-up.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from typing import Any, cast

import spf

from .dns import DnsTemporaryError, Lookup
from .verdicts import SPF_RESULTS, SpfResult, SpfVerdict

# RFC 7208 4.6.4: "MAY impose a limit of at least 20 seconds".
DEFAULT_QUERYTIME = 20.0

_thread = threading.local()
_original_lookup: Callable[..., Any] = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: object = True, timeout: float = 30) -> list[Any]:
    lookup: Lookup | None = getattr(_thread, "lookup", None)
    if lookup is None:
        return cast(list[Any], _original_lookup(name, qtype, strict, timeout))
    try:
        answer = lookup(name, qtype)
    except DnsTemporaryError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    key = (name, qtype)
    if qtype in ("TXT", "SPF"):
        # pyspf wants each record as its list of strings (bytes).
        return [(key, list(parts)) for parts in answer.strings]
    if qtype == "MX":
        return [(key, (preference, exchange)) for preference, exchange in answer.mx]
    return [(key, text) for text in answer.texts]


spf.DNSLookup = _dispatch


def _is_domain(name: str) -> bool:
    if not name or name.startswith("[") or "." not in name.strip("."):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def check_spf(
    lookup: Lookup,
    *,
    ip: str,
    sender: str,
    helo: str,
    identity: str,
    receiver: str,
    querytime: float = DEFAULT_QUERYTIME,
) -> SpfVerdict:
    """``check_host()`` of one identity; call it in a worker thread, never on the loop.

    ``sender`` is the MAIL FROM address without angle brackets ("" for the
    null path); ``identity`` is "mailfrom" or "helo".
    """
    if identity == "helo":
        if not _is_domain(helo):
            return SpfVerdict(identity="helo", result="none", domain=helo, sender=helo)
        checked_sender, domain = f"postmaster@{helo}", helo
    elif sender:
        checked_sender, domain = sender, sender.rpartition("@")[2]
    else:
        if not _is_domain(helo):
            return SpfVerdict(
                identity="mailfrom", result="none", domain=helo, sender=f"postmaster@{helo}"
            )
        checked_sender, domain = f"postmaster@{helo}", helo
    kind: Any = "helo" if identity == "helo" else "mailfrom"
    if not domain or not _is_domain(domain):
        # RFC 7208 4.3: a malformed domain is "none".
        return SpfVerdict(identity=kind, result="none", domain=domain, sender=checked_sender)
    _thread.lookup = lookup
    try:
        query = spf.query(
            i=ip,
            s=checked_sender,
            h=helo,
            receiver=receiver,
            querytime=querytime,
        )
        result, _code, explanation = query.check()
    except Exception as exc:  # pyspf raising is a defect of the record or of pyspf
        result, explanation = "permerror", f"SPF evaluation failed: {exc}"
    finally:
        _thread.lookup = None
    if result not in SPF_RESULTS:
        # pyspf's RFC 4408 words, should a record bring them back.
        result = {"error": "temperror", "unknown": "permerror"}.get(result, "permerror")
    return SpfVerdict(
        identity=kind,
        result=cast(SpfResult, result),
        domain=domain.lower(),
        sender=helo if identity == "helo" else checked_sender,
        explanation=str(explanation),
    )
