"""The configured milters, applied in order, and what their changes do to a header.

:class:`MilterChain` has the same stage methods as :class:`~.client.Milter`
and asks each milter in configuration order, stopping at the first answer
that is neither CONTINUE nor ACCEPT; that answer is the chain's.  A
milter's ACCEPT excuses it for the rest of the message (at CONNECT or HELO:
for the rest of the session) while the others go on.  What the session does
with the chain's :class:`~.protocol.Verdict`:

=========  ==============================================================
CONTINUE   carry on as if there were no milters
DISCARD    answer as usual, and 250 at end of data, but queue nothing; the
           chain answers DISCARD, asking no milter, until the transaction
           ends (end of message, :meth:`MilterChain.abort`)
REJECT     send ``verdict.reply`` (5xx); at RCPT it refuses that recipient
TEMPFAIL   send ``verdict.reply`` (4xx)
SHUTDOWN   send ``verdict.reply`` (421) and close the session
=========  ==============================================================

A refusal at CONNECT or HELO (or a failed milter whose default action is
tempfail or reject) gives the same verdict at every later stage, as in
Postfix; the session may as well answer every command with it.  Call
:meth:`MilterChain.abort` whenever a transaction ends without an end of
message verdict (RSET, a refusal, the client gone), and
:meth:`MilterChain.quit` when the session ends.

At end of message, a CONTINUE verdict carries every milter's modifications
in order (first milter's first) and the first QUARANTINE reason.  Apply the
header ones with :func:`apply_header_changes`; the envelope ones
(:class:`~.codec.ChangeSender`, :class:`~.codec.AddRecipient`,
:class:`~.codec.AddRecipientWithArguments`, :class:`~.codec.DeleteRecipient`)
and :class:`~.codec.ReplaceBody` pieces (concatenated, in order) are the
queue's to apply.  Each milter sees the message as it arrived, not as an
earlier milter changed it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from . import codec
from .client import Milter
from .config import MilterConfig
from .protocol import CONTINUE, Action, Verdict

_NO_MACROS: Mapping[str, str] = {}
_GOING_ON = (Action.CONTINUE, Action.ACCEPT)


class MilterChain:
    """Every configured milter for one SMTP session, in order."""

    def __init__(self, configs: Sequence[MilterConfig]) -> None:
        self.milters = [Milter(config) for config in configs]
        self._discarding: Verdict | None = None

    async def _ask(self, stage: Callable[[Milter], Awaitable[Verdict]]) -> Verdict:
        if self._discarding is not None:
            return self._discarding
        for milter in self.milters:
            verdict = await stage(milter)
            if verdict.action not in _GOING_ON:
                if verdict.action is Action.DISCARD:
                    self._discarding = verdict
                return verdict
        return CONTINUE

    async def connect(
        self,
        *,
        hostname: str,
        address: str,
        port: int = 0,
        family: codec.Family | None = None,
        macros: Mapping[str, str] = _NO_MACROS,
    ) -> Verdict:
        for milter in self.milters:
            verdict = await milter.connect(
                hostname=hostname, address=address, port=port, family=family, macros=macros
            )
            if verdict.action not in _GOING_ON:
                return verdict
        return CONTINUE

    async def helo(self, name: str, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._ask(lambda m: m.helo(name, macros))

    async def mail(
        self, sender: str, arguments: tuple[str, ...] = (), macros: Mapping[str, str] = _NO_MACROS
    ) -> Verdict:
        self._discarding = None
        return await self._ask(lambda m: m.mail(sender, arguments, macros))

    async def rcpt(
        self,
        recipient: str,
        arguments: tuple[str, ...] = (),
        macros: Mapping[str, str] = _NO_MACROS,
    ) -> Verdict:
        return await self._ask(lambda m: m.rcpt(recipient, arguments, macros))

    async def data(self, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._ask(lambda m: m.data(macros))

    async def unknown(self, line: str, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._ask(lambda m: m.unknown(line, macros))

    async def header(
        self, name: str, value: str, macros: Mapping[str, str] = _NO_MACROS
    ) -> Verdict:
        return await self._ask(lambda m: m.header(name, value, macros))

    async def end_of_headers(self, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._ask(lambda m: m.end_of_headers(macros))

    async def body(self, data: bytes, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._ask(lambda m: m.body(data, macros))

    async def message(
        self,
        fields: Sequence[tuple[str, str]],
        chunks: Callable[[], Iterable[bytes]],
        macros: Mapping[str, str] = _NO_MACROS,
    ) -> Verdict:
        """The whole content to each milter in turn, pipelined (:meth:`.Milter.message`).

        ``chunks`` gives the body afresh for each milter.  The verdict is
        the first that is neither CONTINUE nor ACCEPT (every milter is then
        told ABORT), or CONTINUE with every milter's modifications, as
        :meth:`end_of_message` gives them.
        """
        if self._discarding is not None:
            return await self.end_of_message(macros)
        return await self._each_end(lambda m: m.message(fields, chunks(), macros))

    async def end_of_message(self, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        discarding, self._discarding = self._discarding, None
        if discarding is not None:
            for milter in self.milters:
                await milter.abort()
            return discarding
        return await self._each_end(lambda m: m.end_of_message(macros))

    async def _each_end(self, end: Callable[[Milter], Awaitable[Verdict]]) -> Verdict:
        """``end`` (a message's end) of each milter in turn: the first verdict
        that is neither CONTINUE nor ACCEPT, every milter then told ABORT (a
        no-op for those that saw the end), or CONTINUE with every milter's
        modifications and the first quarantine asked for."""
        modifications: list[codec.Modification] = []
        quarantine: str | None = None
        for milter in self.milters:
            verdict = await end(milter)
            if verdict.action not in _GOING_ON:
                for every in self.milters:
                    await every.abort()
                return verdict
            modifications.extend(verdict.modifications)
            if quarantine is None:
                quarantine = verdict.quarantine
        return Verdict(
            action=Action.CONTINUE, modifications=tuple(modifications), quarantine=quarantine
        )

    async def abort(self) -> None:
        self._discarding = None
        for milter in self.milters:
            await milter.abort()

    async def quit(self) -> None:
        for milter in self.milters:
            await milter.quit()


HeaderChange = codec.AddHeader | codec.InsertHeader | codec.ChangeHeader


def apply_header_changes(
    headers: Sequence[tuple[str, str]], modifications: Iterable[codec.Modification]
) -> list[tuple[str, str]]:
    """The header after a milter's changes, in the order sent; other changes are ignored.

    ``headers`` are (name, value) pairs, the value being all after the colon
    (as :class:`~.protocol.Verdict` gives the milter's values: with the
    space a milter without SMFIP_HDR_LEADSPC leaves out).  As Sendmail and
    Postfix's cleanup_milter.c index them:

    * ADDHEADER appends;
    * INSHEADER with index *n* puts the field before the *n*-th field
      counted from 0 over all fields (0: at the top), or at the end when
      there are fewer; Sendmail counts its own Received field, so pass the
      header with the trace fields the queued copy will have;
    * CHGHEADER with index *n* changes the *n*-th field of that name,
      counted from 1 without regard to case (0 is taken as 1, as Postfix
      does); an empty value deletes it; changing one that is not there adds
      it, and deleting one that is not there does nothing.
    """
    result = list(headers)
    for change in modifications:
        match change:
            case codec.AddHeader(name=name, value=value):
                result.append((name, value))
            case codec.InsertHeader(index=index, name=name, value=value):
                result.insert(min(index, len(result)), (name, value))
            case codec.ChangeHeader(index=index, name=name, value=value):
                position = _nth_named(result, name, max(index, 1))
                if position is None:
                    if value:
                        result.append((name, value))
                elif value:
                    result[position] = (name, value)
                else:
                    del result[position]
    return result


def _nth_named(headers: Sequence[tuple[str, str]], name: str, nth: int) -> int | None:
    wanted = name.lower()
    seen = 0
    for position, (field_name, _) in enumerate(headers):
        if field_name.lower() == wanted:
            seen += 1
            if seen == nth:
                return position
    return None
