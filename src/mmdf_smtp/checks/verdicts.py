"""The verdict of each check: one frozen type each, what the results field is made from.

Result words are RFC 8601's (2.7.1 DKIM, 2.7.2 SPF via RFC 7208 2.6,
RFC 8617 for ARC, RFC 7489 11.2 for DMARC): a verdict never holds free
text where a result word belongs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..protocol.replies import Reply

SpfResult = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
DkimResult = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror"]
ArcResult = Literal["pass", "fail", "none", "temperror"]
DmarcResult = Literal["pass", "fail", "none", "temperror", "permerror"]
Disposition = Literal["none", "quarantine", "reject"]

SPF_RESULTS: frozenset[str] = frozenset(
    ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfVerdict:
    """RFC 7208 ``check_host()`` of one identity ("mailfrom" or "helo")."""

    identity: Literal["mailfrom", "helo"]
    result: SpfResult
    domain: str  # the domain checked: the sender's, or the HELO name
    sender: str  # "user@domain" for mailfrom ("postmaster@helo" for <>); the HELO name for helo
    explanation: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfVerdicts:
    """Both SPF checks of a transaction, and the reply to MAIL when policy refuses it."""

    mailfrom: SpfVerdict | None = None
    helo: SpfVerdict | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimVerdict:
    """One DKIM-Signature field's verification (RFC 6376 6, RFC 8463)."""

    result: DkimResult
    domain: str = ""  # d=
    selector: str = ""  # s=
    signature: str = ""  # b=, whitespace removed (RFC 6008: header.b names it)
    algorithm: str = ""  # a=
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArcVerdict:
    """The ARC chain's validation status (RFC 8617 5.2)."""

    result: ArcResult
    instances: int = 0  # ARC sets on the message
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DmarcVerdict:
    """RFC 7489 evaluation of the RFC5322.From domain.

    ``policy`` is the policy that applies to the From domain (``sp`` for a
    subdomain of the organizational domain whose record was used, else
    ``p``); ``disposition`` is what to do with this message: ``policy`` on
    failure, lowered one step when the ``pct`` sample left the message out
    (RFC 7489 6.6.4), "none" on pass.
    """

    result: DmarcResult
    from_domain: str = ""
    policy: Disposition = "none"
    disposition: Disposition = "none"
    record_domain: str = ""  # where the record was found
    spf_aligned: bool = False
    dkim_aligned: bool = False
    sampled_out: bool = False  # failed, but pct left this message out of the policy
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """One ``[dnsbl] zones`` entry that matched the client."""

    zone: str
    weight: int
    answers: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsblVerdict:
    """All blocklists' say on one client: the summed weight against the threshold."""

    score: int = 0
    threshold: int = 1
    listings: tuple[Listing, ...] = ()
    unanswered: tuple[str, ...] = ()  # zones that did not answer in time (not listing)
    refusal: Refusal | None = None

    @property
    def blocked(self) -> bool:
        return self.refusal is not None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A reply the checks ask the session to send: the fields of a ``Reply``."""

    code: int
    enhanced: str
    text: str

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def reply(self) -> Reply:
        """The protocol's reply object for this refusal."""
        return Reply(code=self.code, enhanced=self.enhanced, text=self.text)
