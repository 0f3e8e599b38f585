"""A milter, as the SMTP session sees it: one awaitable per SMTP stage.

One :class:`Milter` per configured milter per SMTP session.  A connection
serves one session at a time; with ``reuse = true``, when a session ends
out of a transaction and the protocol allows it (version 6; right after an
end of message the milter answered CONTINUE, or after anything else when
it negotiated SMFIP_NOUNKNOWN: see :attr:`.MilterProtocol.reusable`), it
ends with SMFIC_QUIT_NC (UNKNOWN first where needed) instead of QUIT and
the connection waits in a small pool for the next session of the same
worker; that farewell is written with the next session's first packet
(``reuse = false``, the default: one connection a session, as Postfix
does).  A connection that broke, timed out or ended any other way is closed,
never pooled.  Every stage method returns a :class:`~.protocol.Verdict` and
never raises for the milter's sake: a milter that cannot be reached, is
slow past its timeout, closes the connection or breaks the protocol costs
at most that timeout, is logged once (WARNING, logger
``mmdf_smtp.milter``), its connection is closed, and the verdict is then the
configured ``default_action`` for the rest of the session:

* ``tempfail``: TEMPFAIL with ``451 4.7.1 Service unavailable - try again later``;
* ``reject``: REJECT with ``550 5.7.1 Service unavailable``;
* ``accept``: CONTINUE; the milter is left out for the rest of the session.

Only cancellation (the SMTP session going away) propagates; the milter's
connection is closed first.

What to call, in SMTP order (``macros`` maps macro names, ``j`` or
``{client_addr}`` or ``client_addr``, to their values; each stage sends the
ones Postfix sends by default, or those the milter asked for)::

    await m.connect(hostname=..., address=..., port=..., macros=...)  # opens the socket
    await m.helo(name, macros)
    await m.mail("<sender>", ("SIZE=123",), macros)
    await m.rcpt("<rcpt>", (), macros)       # per recipient; see wants_rejected_recipients
    await m.data(macros)
    await m.header(name, value, macros)      # per field; value as after the colon
    await m.end_of_headers(macros)
    await m.body(chunk, macros)              # any sizes; sent in chunks of <= 65535
    verdict = await m.end_of_message(macros) # .modifications, .quarantine
    # or, instead of header ... end_of_message, the content pipelined:
    verdict = await m.message(fields, chunks, macros)
    await m.abort()                          # RSET, or a transaction that ends without EOM
    await m.quit()                           # end of the SMTP session

:meth:`Milter.message` writes every header, the end of headers and, for a
body of at most one chunk, the body and the end of message at once, and
then reads the answers in order: one wait on the milter a message instead of
one a header field.  The milter sees the same packets as in lock-step.  If
it answers a stage before the last with anything but CONTINUE, the packets
after it may or may not be answered (libmilter ignores them); that
connection is closed, and the next transaction opens a new one and repeats
CONNECT and HELO on it.

Timeouts are Postfix's: ``connect_timeout`` for the connection,
``command_timeout`` for negotiation and each envelope stage,
``content_timeout`` for each header, body chunk and end of message; an
SMFIR_PROGRESS restarts the wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import logging
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from .. import metrics
from . import codec
from .config import DefaultAction, MilterConfig
from .protocol import (
    CONTINUE,
    DEFAULT_REJECT,
    DEFAULT_TEMPFAIL,
    PROGRESS,
    Action,
    MilterProtocol,
    Negotiated,
    State,
    Step,
    Verdict,
)

logger = logging.getLogger("mmdf_smtp.milter")

_NO_MACROS: Mapping[str, str] = {}


class _Broken(Exception):
    """A failure on the milter's connection, with what went wrong."""


class _Stale(Exception):
    """A pooled connection that the milter had closed meanwhile: open a new one."""


#: Idle connections kept per milter per worker, and how long each may wait.
POOL_SIZE = 32
POOL_IDLE_SECONDS = 30.0


@dataclass(slots=True)
class _Idle:
    link: _Link
    negotiated: Negotiated
    since: float
    owed: int  # answers due to the UNKNOWN before QUIT_NC, not read yet
    # What ends the last conversation (QUIT_NC, UNKNOWN before it), not
    # written yet: it goes with the next session's first packet, or before
    # the connection is closed.  One write and one wake-up of the milter's
    # thread fewer a session.
    farewell: bytes

    def close(self) -> None:
        self.link.write(self.farewell)
        self.link.close()


class _Pool:
    """A worker's idle connections to one milter, newest last.

    Bounded in number (:data:`POOL_SIZE`) and in age
    (:data:`POOL_IDLE_SECONDS`): each is a thread held in a libmilter
    milter.  A timer closes the ones that waited too long, so a worker that
    goes quiet does not hold them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._idle: collections.deque[_Idle] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> _Idle | None:
        self._expire()
        while self._idle:
            idle = self._idle.pop()
            if idle.link.closed:
                idle.link.close()
                continue
            return idle
        return None

    def give(self, idle: _Idle) -> bool:
        """Keep ``idle``; False (the caller closes it) when the pool is full."""
        self._expire()
        if len(self._idle) >= POOL_SIZE:
            return False
        self._idle.append(idle)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(POOL_IDLE_SECONDS, self._sweep)
        return True

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _expire(self) -> None:
        oldest = self._loop.time() - POOL_IDLE_SECONDS
        while self._idle and self._idle[0].since <= oldest:
            # Nothing to say after the farewell: libmilter ignores a QUIT after QUIT_NC.
            self._idle.popleft().close()

    def _sweep(self) -> None:
        self._sweeper = None
        self._expire()
        if self._idle:
            self._sweeper = self._loop.call_later(POOL_IDLE_SECONDS, self._sweep)


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Pool]] = (
    weakref.WeakKeyDictionary()
)


def _pool(socket: str) -> _Pool:
    loop = asyncio.get_running_loop()
    pools = _POOLS.setdefault(loop, {})
    pool = pools.get(socket)
    if pool is None:
        pool = pools[socket] = _Pool(loop)
    return pool


def idle_connections(socket: str) -> int:
    """How many connections to the milter at ``socket`` wait in this loop's pool."""
    pools = _POOLS.get(asyncio.get_running_loop(), {})
    pool = pools.get(socket)
    return len(pool) if pool is not None else 0


def close_idle_connections() -> None:
    """Close every pooled milter connection of the running loop (at shutdown)."""
    for pool in _POOLS.pop(asyncio.get_running_loop(), {}).values():
        pool.close()


def default_verdict(action: DefaultAction) -> Verdict:
    """The verdict for every stage after a milter has failed."""
    if action is DefaultAction.TEMPFAIL:
        return Verdict(action=Action.TEMPFAIL, reply=DEFAULT_TEMPFAIL)
    if action is DefaultAction.REJECT:
        return Verdict(action=Action.REJECT, reply=DEFAULT_REJECT)
    return CONTINUE


def client_family(address: str) -> codec.Family:
    """SMFIA_* for a client address: IPv4, IPv6, a unix socket path, or unknown."""
    if address.startswith("/"):
        return codec.Family.UNIX
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return codec.Family.UNKNOWN
    return codec.Family.INET if parsed.version == 4 else codec.Family.INET6


class _Link(asyncio.Protocol):
    """One connection to a milter: answers parsed as they arrive, one wake-up a batch.

    :meth:`expect` hands it the conversation's sans-IO core and how many
    answers the driver waits for; :meth:`data_received` feeds the core at
    once and wakes the waiting task only when the last of them, or one that
    is not CONTINUE, is complete, or the wait is over (the milter closed,
    broke the protocol, or was too slow).  Between conversations (a kept
    connection) what arrives is held for the next one.

    One timer a connection bounds the waits: a wait only moves the deadline,
    and the timer, when it fires early, sets itself again for the deadline of
    the moment, so a message's round trips do not each make and cancel one.
    SMFIR_PROGRESS moves the deadline too.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._held = bytearray()
        self._sink: MilterProtocol | None = None
        self._wanted = 0
        self.answers: list[Verdict | Negotiated] = []
        self.error: str | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._timeout = 0.0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Over TCP: acknowledge what came at once before each wait (see _quickack_for).
        self.quickack: Callable[[], None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport's subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is None or not self._wanted:
            # Nothing awaited: the next wait (or conversation) reads it.
            self._held += data
            return
        sink.receive_data(data)
        self._collect()

    def eof_received(self) -> bool:
        self._end("the milter closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("connection lost" if exc is None else f"connection lost: {exc}")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # -- the driver's side

    def write(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self.closed = True
        self._sink = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def detach(self) -> None:
        """Between conversations: what comes is held for the next."""
        self._sink = None

    def expect(self, sink: MilterProtocol, count: int, timeout: float) -> None:
        """Wait for ``count`` answers of ``sink``'s conversation (fewer if one is not CONTINUE)."""
        self._sink = sink
        self.answers = []
        self.error = None
        self._wanted = count
        self._arm(timeout)
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            sink.receive_data(held)
        self._collect()
        if self._wanted and self.closed and self.error is None:
            self.error = "the milter closed the connection"

    @property
    def waiting(self) -> bool:
        return bool(self._wanted) and self.error is None

    async def wait(self) -> None:
        """Until the answers expected are in, or :attr:`error` says why not."""
        while self._wanted and self.error is None:
            if self.quickack is not None:
                self.quickack()
            await self._sleep()

    async def drain(self, timeout: float) -> None:
        """Until the transport takes more, if it asked to be spared (pause_writing)."""
        if not self._paused:
            return
        self._arm(timeout)
        while self._paused and self.error is None:
            await self._sleep()
        if self.error is not None:
            raise _Broken(self.error)

    async def _sleep(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _collect(self) -> None:
        sink = self._sink
        assert sink is not None
        try:
            while self._wanted:
                event = sink.next_event()
                if event is codec.NEED_DATA:
                    return
                if event is PROGRESS:
                    self._deadline = self._loop.time() + self._timeout
                    continue
                assert isinstance(event, Verdict | Negotiated)
                self.answers.append(event)
                self._wanted -= 1
                if isinstance(event, Verdict) and event.action is not Action.CONTINUE:
                    self._wanted = 0
        except codec.MilterProtocolError as error:
            self.error = f"protocol error: {error}"
        self._wake()

    def _end(self, why: str) -> None:
        self.closed = True
        if self._sink is not None and self._wanted and self.error is None:
            # Feeds the end of file: an answer cut short is a protocol error.
            self._sink.receive_data(b"")
            self._collect()
            if self._wanted and self.error is None:
                self.error = why
        if self._paused and self.error is None:
            self.error = why
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, timeout: float) -> None:
        self._timeout = timeout
        self._deadline = self._loop.time() + timeout
        timer = self._timer
        if timer is not None and timer.when() > self._deadline:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(self._deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.closed or not (self._wanted or self._paused):
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._fire)
            return
        self.error = (
            f"no answer in {self._timeout:g} s"
            if self._wanted
            else (f"no progress writing for {self._timeout:g} s")
        )
        self._wake()


def _quickack_for(transport: asyncio.BaseTransport) -> Callable[[], None] | None:
    """What sends the ACK of the octets received so far at once, on a TCP connection.

    A milter answers in several small writes (each header's answer when
    they come pipelined; a modification, then the verdict, at end of
    message), and libmilter sets no TCP_NODELAY: Nagle's algorithm holds
    each write back until the one before is acknowledged, and the kernel
    delays that acknowledgement (40 ms on Linux) in the hope of sending it
    with data, which this side has none of while it waits.  TCP_QUICKACK
    before each wait sends it now; it is not sticky (tcp(7)), hence each
    time.
    """
    sock = transport.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None:
        return None

    def acknowledge() -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    return acknowledge


class Milter:
    """One milter conversation for one SMTP session."""

    def __init__(self, config: MilterConfig, *, name: str | None = None) -> None:
        self.config = config
        self.name = name or config.socket
        self._protocol = MilterProtocol()
        self._link: _Link | None = None
        self._body = bytearray()
        # Packets that get no answer (the macros of a stage the milter
        # skips, a command it asked not to answer), sent with the next write:
        # each write on its own would wake the milter for nothing.
        self._unsent = bytearray()
        # A pooled connection that has not answered yet in this session: if
        # it turns out closed, the session opens a new one (once).
        self._untried = False
        # CONNECT and the last HELO, to say again on a new connection after
        # pipelined content left the old one out of step.
        self._introduction: list[tuple[codec.Command, Mapping[str, str]]] = []

    @property
    def negotiated(self) -> Negotiated | None:
        """What the milter asked for (None before it answered, or if it never did)."""
        return self._protocol.negotiated

    @property
    def wants_rejected_recipients(self) -> bool:
        """SMFIP_RCPT_REJ: call :meth:`rcpt` for refused recipients too."""
        negotiated = self._protocol.negotiated
        return negotiated is not None and negotiated.wants_rejected_recipients

    @property
    def failed(self) -> bool:
        return self._protocol.failed

    @property
    def connection_name(self) -> object:
        """This side's address of the connection to the milter (None when there is none).

        Two sessions with the same one went over the same connection.
        """
        link = self._link
        if link is None or link.transport is None:
            return None
        return link.transport.get_extra_info("sockname")

    # -- the stages

    async def connect(
        self,
        *,
        hostname: str,
        address: str,
        port: int = 0,
        family: codec.Family | None = None,
        macros: Mapping[str, str] = _NO_MACROS,
    ) -> Verdict:
        """Open the connection, negotiate, and send the SMTP client's identity.

        ``hostname`` is the client's verified name; without one ("" or
        "unknown") the milter is sent ``[address]``, as Sendmail and Postfix
        do.  The family is found from ``address`` unless given.
        """
        if family is None:
            family = client_family(address)
        if hostname in ("", "unknown"):
            hostname = f"[{address}]" if family is not codec.Family.UNKNOWN else "unknown"
        if family is codec.Family.UNKNOWN:
            command = codec.Connect(hostname=hostname, family=family)
        elif family is codec.Family.UNIX:
            command = codec.Connect(hostname=hostname, family=family, port=0, address=address)
        else:
            command = codec.Connect(hostname=hostname, family=family, port=port, address=address)
        self._introduction = [(command, dict(macros))]
        if self.config.reuse and self._protocol.state is State.NEW and self._take_pooled():
            try:
                return await self._stage(command, macros, self.config.command_timeout)
            except _Stale:
                self._close()
                self._protocol = MilterProtocol()
        if not await self.open():
            return self._protocol.begin(command).verdict or CONTINUE
        return await self._stage(command, macros, self.config.command_timeout)

    async def helo(self, name: str, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        command = codec.Helo(name=name)
        self._introduction[1:] = [(command, dict(macros))]
        return await self._stage(command, macros, self.config.command_timeout)

    async def mail(
        self, sender: str, arguments: tuple[str, ...] = (), macros: Mapping[str, str] = _NO_MACROS
    ) -> Verdict:
        """MAIL: ``sender`` with its angle brackets (``<>`` for the null path)."""
        self._body.clear()
        command = codec.MailFrom(sender=sender, arguments=arguments)
        return await self._stage(command, macros, self.config.command_timeout)

    async def rcpt(
        self,
        recipient: str,
        arguments: tuple[str, ...] = (),
        macros: Mapping[str, str] = _NO_MACROS,
    ) -> Verdict:
        command = codec.RcptTo(recipient=recipient, arguments=arguments)
        return await self._stage(command, macros, self.config.command_timeout)

    async def data(self, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._stage(codec.Data(), macros, self.config.command_timeout)

    async def unknown(self, line: str, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._stage(codec.Unknown(line=line), macros, self.config.command_timeout)

    async def header(
        self, name: str, value: str, macros: Mapping[str, str] = _NO_MACROS
    ) -> Verdict:
        """One header field: ``value`` is all after the colon (leading space, folds included)."""
        command = codec.Header(name=name, value=value)
        return await self._stage(command, macros, self.config.content_timeout)

    async def end_of_headers(self, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        return await self._stage(codec.EndOfHeaders(), macros, self.config.content_timeout)

    async def body(self, data: bytes, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        """Body octets (CRLF line ends), in pieces of any size.

        They are sent in chunks of 65535 octets as they fill; the rest goes
        at :meth:`end_of_message`.  After the milter's SKIP (or ACCEPT, or
        with SMFIP_NOBODY) nothing more is buffered or sent.
        """
        if not self._protocol.wants_body:
            self._body.clear()
            return await self._stage(codec.BodyChunk(data=b""), macros, self.config.content_timeout)
        self._body += data
        while len(self._body) >= codec.CHUNK_SIZE:
            verdict = await self._send_body(macros, codec.CHUNK_SIZE)
            if not verdict.is_continue:
                return verdict
        return CONTINUE

    async def _send_body(self, macros: Mapping[str, str], size: int) -> Verdict:
        chunk = bytes(self._body[:size])
        del self._body[:size]
        verdict = await self._stage(
            codec.BodyChunk(data=chunk), macros, self.config.content_timeout
        )
        if not self._protocol.wants_body:
            self._body.clear()
        return verdict

    async def message(
        self,
        fields: Iterable[tuple[str, str]],
        chunks: Iterable[bytes],
        macros: Mapping[str, str] = _NO_MACROS,
    ) -> Verdict:
        """The content stages, pipelined: header fields, end of headers, body, end of message.

        The same as :meth:`header` for each field, :meth:`end_of_headers`,
        :meth:`body` for each chunk and :meth:`end_of_message`, stopping at
        the first answer that is neither CONTINUE nor ACCEPT; but written
        at once and answered in one wait.  A body longer than one chunk
        follows the end of headers' answer, in lock-step as :meth:`body`.
        """
        commands: list[codec.Command] = [codec.Header(name=n, value=v) for n, v in fields]
        commands.append(codec.EndOfHeaders())
        pieces = iter(chunks)
        self._body.clear()
        for chunk in pieces:
            self._body += chunk
            if len(self._body) > codec.CHUNK_SIZE:
                break
        else:
            if self._body:
                commands.append(codec.BodyChunk(data=bytes(self._body)))
                self._body.clear()
            commands.append(codec.EndOfMessage())
            return await self._pipeline(commands, macros)
        held = bytes(self._body)
        self._body.clear()
        verdict = await self._pipeline(commands, macros)
        if verdict.action is not Action.CONTINUE and verdict.action is not Action.ACCEPT:
            return verdict
        for chunk in itertools.chain((held,), pieces):
            verdict = await self.body(chunk, macros)
            if not verdict.is_continue:
                return verdict
        return await self.end_of_message(macros)

    async def _pipeline(self, commands: list[codec.Command], macros: Mapping[str, str]) -> Verdict:
        timeout = self.config.content_timeout
        started = time.monotonic()
        protocol = self._protocol
        verdict = CONTINUE
        try:
            data = bytearray()
            awaited = 0
            for command in commands:
                step = protocol.begin(command, macros, pipelined=True)
                data += step.data
                if step.verdict is None:
                    awaited += 1
                elif step.verdict.action is not Action.CONTINUE:
                    verdict = step.verdict
                    break
            if awaited:
                await self._write(bytes(data), timeout)
                answers = await self._answers(awaited, timeout)
                result = answers[-1]
                assert isinstance(result, Verdict)
                verdict = result
            else:
                self._unsent += data
                if len(self._unsent) >= codec.CHUNK_SIZE:
                    await self._write(b"", timeout)
        except _Broken as error:
            return self._fail(f"content: {error}")
        if not protocol.usable:
            self._close()
        metrics.since("mmdf_milter_seconds", (self.name, "Message"), started)
        return verdict

    async def end_of_message(self, macros: Mapping[str, str] = _NO_MACROS) -> Verdict:
        """The last body octets, then end of message: the final verdict with modifications."""
        if self._body and self._protocol.wants_body:
            verdict = await self._send_body(macros, len(self._body))
            if verdict.action is not Action.CONTINUE and verdict.action is not Action.ACCEPT:
                return verdict
        self._body.clear()
        return await self._stage(codec.EndOfMessage(), macros, self.config.content_timeout)

    async def abort(self) -> None:
        """End the transaction without end of message (RSET, a refusal, a client gone)."""
        self._body.clear()
        data = self._protocol.abort()
        if data:
            try:
                await self._write(data, self.config.command_timeout)
            except _Broken as error:
                self._fail(f"abort: {error}")

    async def quit(self) -> None:
        """End of the SMTP session: QUIT if the conversation is still on, then close.

        Or QUIT_NC, and the connection goes to the pool, where the protocol
        allows it (see :attr:`.MilterProtocol.reusable`).
        """
        if self.config.reuse and self._protocol.reusable and self._pool_connection():
            return
        data = self._protocol.quit()
        if data and self._link is not None:
            self._link.write(bytes(self._unsent + data))
        self._close()

    # -- connection

    async def _reconnect(self) -> None:
        """A new connection after pipelined content left the old one out of step."""
        self._close()
        self._protocol = MilterProtocol()
        if not await self.open():
            return
        for command, macros in self._introduction:
            await self._stage(command, macros, self.config.command_timeout)
            if self._protocol.state is not State.READY:
                return

    def _take_pooled(self) -> bool:
        idle = _pool(self.config.socket).take()
        if idle is None:
            return False
        self._link = idle.link
        self._protocol.resume(idle.negotiated, owed=idle.owed)
        self._unsent += idle.farewell
        self._untried = True
        return True

    def _pool_connection(self) -> bool:
        link, negotiated = self._link, self._protocol.negotiated
        if link is None or negotiated is None or link.closed or link.transport is None:
            return False
        if link.transport.get_write_buffer_size():
            # The milter is not reading: not a connection to keep.
            self._protocol.quit()
            self._close()
            return True
        farewell = bytes(self._unsent + self._protocol.quit_new_connection())
        owed = self._protocol.owed
        self._unsent.clear()
        self._link = None
        link.detach()
        pool = _pool(self.config.socket)
        idle = _Idle(link, negotiated, asyncio.get_running_loop().time(), owed, farewell)
        if not pool.give(idle):
            idle.close()
        return True

    async def open(self) -> bool:
        """Connect and negotiate (done by :meth:`connect`); False if the milter failed."""
        if self._protocol.state is not State.NEW:
            return self._protocol.usable
        address = self.config.address
        loop = asyncio.get_running_loop()
        link = _Link(loop)
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                if address.kind == "unix":
                    await loop.create_unix_connection(lambda: link, address.path)
                else:
                    await loop.create_connection(lambda: link, address.host, address.port)
        except TimeoutError:
            link.close()
            self._fail(f"connect: no connection in {self.config.connect_timeout:g} s")
            return False
        except OSError as error:
            link.close()
            self._fail(f"connect: {error.strerror or error}")
            return False
        if address.kind != "unix" and link.transport is not None:
            link.quickack = _quickack_for(link.transport)
        self._link = link
        try:
            await self._write(self._protocol.negotiate(), self.config.command_timeout)
            await self._answers(1, self.config.command_timeout)
        except _Broken as error:
            self._fail(f"negotiation: {error}")
            return False
        return True

    async def _stage(
        self, command: codec.Command, macros: Mapping[str, str], timeout: float
    ) -> Verdict:
        what = type(command).__name__
        started = time.monotonic()
        if self._protocol.desynchronised:
            await self._reconnect()
        try:
            step: Step = self._protocol.begin(command, macros)
            if step.verdict is not None:
                self._unsent += step.data
                if len(self._unsent) >= codec.CHUNK_SIZE:
                    # Body chunks the milter does not answer (SMFIP_NR_BODY)
                    # go as they come: the body is never held whole.
                    await self._write(b"", timeout)
                verdict = step.verdict
            else:
                await self._write(step.data, timeout)
                [result] = await self._answers(1, timeout)
                assert isinstance(result, Verdict)
                verdict = result
                self._untried = False
        except _Broken as error:
            if self._untried and isinstance(command, codec.Connect):
                raise _Stale from None
            self._untried = False
            return self._fail(f"{what}: {error}")
        if not self._protocol.usable:
            self._close()
        metrics.since("mmdf_milter_seconds", (self.name, what), started)
        return verdict

    async def _write(self, data: bytes, timeout: float) -> None:
        link = self._link
        if link is None or link.closed:
            raise _Broken("connection closed")
        if self._unsent:
            data = bytes(self._unsent + data)
            self._unsent.clear()
        try:
            link.write(data)
            await link.drain(timeout)
        except asyncio.CancelledError:
            self._close()
            raise

    async def _answers(self, count: int, timeout: float) -> list[Verdict | Negotiated]:
        """The next ``count`` answers, or those up to the first that is not CONTINUE."""
        link = self._link
        assert link is not None
        link.expect(self._protocol, count, timeout)
        try:
            if link.waiting:
                await link.wait()
        except asyncio.CancelledError:
            self._close()
            raise
        if link.error is not None:
            raise _Broken(link.error)
        return link.answers

    def _fail(self, what: str) -> Verdict:
        verdict = default_verdict(self.config.default_action)
        logger.warning(
            "milter %s: %s; default action %s", self.name, what, self.config.default_action.value
        )
        self._protocol.fail(verdict)
        self._close()
        return verdict

    def _close(self) -> None:
        self._unsent.clear()
        link, self._link = self._link, None
        if link is not None:
            link.close()
