"""What a session asks of its filters, stage by stage.

An MX checks mail while the client is still there: DNS blocklists at
connect, SPF at MAIL, DKIM, ARC and DMARC at the end of data, and the
administrator's milters at every stage they ask for.  The session asks
one :class:`Filters` object at each stage and gets a :class:`Verdict`; how
the verdict was reached (which check, which milter) is the filters'
business, combined in one place (:mod:`.combined`).

A session of a channel with ``checks = false``, or of a configuration
with no filters at all, has none, and takes the path it always had: the
message goes straight into its queue file as it arrives.  With filters
that read the content, the message is staged instead
(:class:`~.staged.StagedMessage`) until the end of data, when the filters
have seen it and made their changes; only then is its queue file written,
with the envelope and header as they left it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..protocol import MailFrom, Path, Reply
from .staged import StagedMessage


@dataclass(frozen=True, slots=True)
class Verdict:
    """A stage's outcome: go on, give this reply instead of ours, or discard.

    ``discard``: the message is taken (250) and then dropped, as a milter's
    SMFIR_DISCARD asks; said before the end of data, it holds for the
    whole transaction, as ``hold`` does.
    """

    reply: Reply | None = None
    discard: bool = False
    reason: str = ""  # what refused: "dnsbl", "spf", "dmarc", "milter", "access" (for the log)
    # The message is taken and queued on hold, with this reason (an access
    # table's HOLD, as a milter's quarantine at the end of data).
    hold: str | None = None


CONTINUE = Verdict()


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """What the filters know of the client from the start."""

    client_name: str  # its name, or its address literal
    client_address: str  # "" when unknown (a pipe)
    client_port: int  # 0 when unknown
    local_address: str
    local_port: int
    hostname: str  # our own name, as in the greeting


class Filters(Protocol):
    """The filters of one session.  Every call is bounded in time.

    A filter that fails (a milter that is down, a DNS server that does not
    answer) never raises: its configured default decides the verdict.
    """

    @property
    def wants_content(self) -> bool:
        """Whether :meth:`message` reads the message: then it is staged."""
        ...

    async def connect(self) -> Verdict:
        """Before the greeting: a refusal replaces it."""
        ...

    async def helo(self, name: str, tls: str | None) -> Verdict: ...

    async def mail(self, mail: MailFrom, queue_id: str) -> Verdict:
        """``queue_id`` names the message to be (Postfix's ``i`` macro)."""
        ...

    async def rcpt(self, recipient: Path) -> Verdict: ...

    async def data(self) -> Verdict: ...

    async def message(self, message: StagedMessage) -> Verdict:
        """At the end of data: check, and change ``message`` in place."""
        ...

    async def reset(self) -> None:
        """The transaction ended without a message (RSET, a refusal, a new MAIL)."""
        ...

    async def close(self) -> None:
        """The session is over."""
        ...


__all__ = ["CONTINUE", "Connection", "Filters", "StagedMessage", "Verdict"]
