"""Serve sessions on an asyncio event loop: the daemon's shell.

One :class:`SessionProtocol` per connection moves octets between the
transport and the protocol core, and answers the core's events through
the shared :class:`~mmdf_smtp.session.Session`.  It is driven by the
transport's callbacks alone, with no task per session: a session costs
the loop a few callbacks per command, not a coroutine's wake-ups, which
is most of what a short session of a connection per message spends.

The only blocking work runs elsewhere: the client look-up (DNS) in
threads, the commit (fsync) in the worker's commit process (see
:mod:`.committer`); while one is out the session is *held*: input is
still taken in, but no event is read until the answer is in.  A session
with filters (milters, checks) is held the same way while a task of the
loop waits for their verdict.
The tarpit's delay, a client that does not read its replies, and the TLS
handshake hold it the same way.

Flow control, as in uvicorn: reading pauses while the core holds more
unread input than :data:`HIGH_WATER` (a client pipelining into a slow
decision), and a session whose client does not take its replies waits up
to ``command_timeout`` for the transport to drain, then ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from .. import metrics
from ..protocol import (
    NEED_DATA,
    ConnectionClosed,
    MessageComplete,
    Reply,
    Signal,
    StartTLS,
    replies,
)
from ..proxy import NEED_MORE, ProxyError, ProxyHeader, ProxyReader
from ..queue import MessageWriter, QueueError
from ..service import IPAddress, Peer, Service, parse_address
from ..session import Session
from .committer import Committer
from .tls import describe
from .trace import trace_input, trace_output

log = logging.getLogger("mmdf_smtp.smtpd")

HIGH_WATER = 256 * 1024

# The blocking calls get threads of their own, as many as the sessions of a
# worker may want at once (threads start only when needed).  In the loop's
# default pool, a handful of clients whose look-ups wait on a silent
# nameserver for dns.timeout held up the greeting of every other client
# and the 250 of every message being committed.
LOOKUPS = ThreadPoolExecutor(max_workers=256, thread_name_prefix="lookup")

T = TypeVar("T")

# Tasks nobody waits for (telling the filters a session is over): the loop
# keeps only weak references to its tasks.
_BACKGROUND: set[asyncio.Task[None]] = set()


def _in_background(pending: Coroutine[Any, Any, None] | None) -> None:
    if pending is None:
        return
    task = asyncio.get_running_loop().create_task(pending)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


@dataclass(frozen=True, slots=True)
class ProxyDoor:
    """``[smtpd] proxy_protocol``: how long the header may take, and who is let in.

    ``admit`` is given the client's address as the header names it (the
    per-client limits are counted by it) and answers the reply that refuses
    it, or None.
    """

    timeout: float
    admit: Callable[[IPAddress | None], Reply | None]


class SessionProtocol(asyncio.Protocol):
    """One client connection.  ``on_end`` is called once, when the session is over.

    With a ``proxy`` door the connection comes from a load balancer and
    opens with a PROXY header: nothing is said and nobody identified until
    it is read; the client it names is the session's client.
    """

    def __init__(
        self,
        service: Service,
        committer: Committer,
        on_end: Callable[[], None] | None = None,
        proxy: ProxyDoor | None = None,
    ) -> None:
        self._service = service  # as it was when the connection came: reloads are for later ones
        self._committer = committer
        self._on_end = on_end
        self._proxy = proxy
        self._header: ProxyReader | None = None  # reading the PROXY header
        self._header_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self._early = bytearray()  # octets sent before the session was set up
        self._eof = False
        self._held = False  # waiting for a thread, a timer or the TLS handshake
        self._delay: asyncio.TimerHandle | None = None  # the tarpit holding replies back
        self._drain: asyncio.TimerHandle | None = None  # waiting for a client to read
        self._writable = True
        self._reading_paused = False
        self._stopping = False
        self._ended = False
        # The wait for input: one timer, moved on lazily as the core's waits
        # start (see _wait_for_input), rather than a new one per command.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._generation = -1
        self._filtering: asyncio.Task[Any] | None = None  # the filters' verdict, awaited

    # -- transport callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        if self._proxy is not None:
            # "The receiver MUST NOT start processing the connection before
            # it receives a complete and valid PROXY protocol header.  This
            # is particularly important for protocols where the receiver is
            # expected to speak first (eg: SMTP ...)" (proxy-protocol.txt 2).
            self._header = ProxyReader()
            self._header_timer = self._loop.call_later(self._proxy.timeout, self._header_late)
            return
        self._identify(self._peer())

    def _identify(self, peer: Peer) -> None:
        service = self._service
        # Most clients are known by address: decided here, at once.  Those
        # that need DNS wait for it in a thread, not on the loop.
        session = service.session_without_dns(peer)
        if session is not None:
            self._begin(session)
            return
        self._held = True
        future = LOOKUPS.submit(service.session, peer)
        loop = self._loop
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._identified, done))

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None:
            if self._header is not None:
                self._read_header(data)
                return
            self._early += data
            if len(self._early) > HIGH_WATER:
                self._pause_reading()
            return
        if session.tracing:
            trace_input(session, data)
        conn = session.connection
        conn.receive_data(data)
        if conn.pending_input > HIGH_WATER:
            self._pause_reading()
        self._pump()

    def eof_received(self) -> bool:
        self._end_of_input()
        # Keep the transport open for the replies still due (a commit may be
        # under way); asyncio's TLS transport closes at end of file anyway.
        return self._session is None or self._session.tls is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable = True
        # Nobody is left to wait for, nor to hold replies back from.
        self._stop_holding()
        self._end_of_input()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if self._drain is not None:
            self._stop_holding()
            self._pump()

    # -- control ------------------------------------------------------------

    def shut_down(self) -> None:
        """The server is stopping: 421 now, whatever the session was doing."""
        self._stopping = True
        if self._header is not None:
            self._closed_before_session("shutdown")
        elif self._session is not None:
            self._session.connection.shut_down()
            self._pump()

    def abandon(self) -> None:
        """The connection could not be set up: the session is over before it began."""
        self._close()

    # -- the session --------------------------------------------------------

    def _peer(self, header: ProxyHeader | None = None) -> Peer:
        """The client, from the connection, or from the PROXY header that names it.

        A header that names no one (v2 LOCAL, a health check; v1 UNKNOWN)
        leaves the connection's own endpoints, as the spec asks and as
        Postfix does.
        """
        if header is not None and header.source is not None and header.destination is not None:
            source, destination = header.source, header.destination
            return Peer(
                parse_address(str(source.address)),  # an IPv4-mapped address becomes IPv4
                parse_address(str(destination.address)),
                None,
                port=source.port,
                local_port=destination.port,
            )
        assert self._transport is not None
        peername = self._transport.get_extra_info("peername")
        sockname = self._transport.get_extra_info("sockname")
        address = parse_address(peername[0]) if peername else None
        local = parse_address(sockname[0]) if sockname else None
        return Peer(
            address,
            local,
            None,
            port=peername[1] if peername else 0,
            local_port=sockname[1] if sockname else 0,
        )

    # -- the PROXY header ----------------------------------------------------

    def _read_header(self, data: bytes) -> None:
        assert self._header is not None and self._proxy is not None
        try:
            header = self._header.receive_data(data)
        except ProxyError as exc:
            end = "proxy-eof" if not data else "proxy-invalid"
            self._closed_before_session(end, exc.reason)
            return
        if header is NEED_MORE:
            return
        self._header = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        peer = self._peer(header)
        refusal = self._proxy.admit(peer.address)
        if refusal is not None:
            assert self._transport is not None
            self._transport.write(refusal.to_bytes())
            self._close()
            return
        # The octets after the header are the client's first: what the
        # session would have had without a proxy (a pregreet among them).
        self._early += header.rest
        if len(self._early) > HIGH_WATER:
            self._pause_reading()
        self._identify(peer)

    def _header_late(self) -> None:
        self._header_timer = None
        if self._header is not None:
            self._closed_before_session("proxy-timeout")

    def _closed_before_session(self, end: str, reason: str = "") -> None:
        """No valid header: the connection is closed without a word, and logged."""
        self._header = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if end != "shutdown":
            metrics.count("mmdf_refusals", (end,))
        assert self._transport is not None
        peername = self._transport.get_extra_info("peername")
        where = f"[{peername[0]}]:{peername[1]}" if peername else "unknown"
        log.info(
            "connection from %s closed end=%s%s",
            where,
            end,
            f' reason="{reason}"' if reason else "",
        )
        self._close()

    def _identified(self, future: Future[Session]) -> None:
        self._held = False
        try:
            session = future.result()
        except Exception:
            log.exception("session failed")
            self._say_goodbye()
            self._close()
            return
        self._begin(session)

    def _begin(self, session: Session) -> None:
        self._session = session
        conn = session.connection
        greeting = session.begin()
        if self._early:
            conn.receive_data(bytes(self._early))
            self._early.clear()
        if self._eof:
            conn.receive_data(b"")
        if greeting is not None:
            self._await(session, greeting, self._greeted)
            return
        self._greeted(None)

    def _greeted(self, _: None) -> None:
        assert self._session is not None
        if self._stopping:
            self._session.connection.shut_down()
        self._pump()

    def _await(
        self, session: Session, pending: Coroutine[Any, Any, T], then: Callable[[T], None]
    ) -> None:
        """Hold the session while the filters decide; then go on with ``then``."""
        self._held = True
        task = self._loop.create_task(pending)
        self._filtering = task
        task.add_done_callback(functools.partial(self._decided, session, then))

    def _decided(self, session: Session, then: Callable[[T], None], task: asyncio.Task[T]) -> None:
        self._filtering = None
        self._held = False
        if task.cancelled():
            self._close()
            return
        try:
            result = task.result()
        except Exception:
            log.exception("session failed")
            self._say_goodbye()
            self._close()
            return
        then(result)

    def _end_of_input(self) -> None:
        self._eof = True
        if self._header is not None:
            self._read_header(b"")
        elif self._session is not None:
            self._session.connection.receive_data(b"")
            self._pump()

    def _pump(self) -> None:
        """Answer the core's events until it needs input, a thread, or a timer."""
        session = self._session
        if self._held or self._ended or session is None:
            return
        conn = session.connection
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    if self._flush(session):
                        self._wait_for_input()
                    return
                if isinstance(event, ConnectionClosed):
                    if self._flush(session):
                        _in_background(session.handle(event))
                        self._close()
                    return
                if isinstance(event, MessageComplete):
                    filtering = session.filter_message(event)
                    if filtering is not None:
                        then = functools.partial(self._filtered, session, event)
                        self._await(session, filtering, then)
                        return
                    if self._commit(session, event):
                        return
                    continue
                if isinstance(event, Signal):  # PAUSED: no decision is out
                    raise RuntimeError("the session left a decision unanswered")
                pending = session.handle(event)
                if pending is not None:
                    self._await(session, pending, lambda _: self._pump())
                    return
                if isinstance(event, StartTLS):
                    # "220 Ready to start TLS" goes out in plaintext, then the handshake.
                    self._held = True
                    data = conn.data_to_send()
                    if session.tracing:
                        trace_output(session, data)
                    assert self._transport is not None
                    self._transport.write(data)
                    self._loop.create_task(self._start_tls(session, self._service.tls_context))
                    return
        except Exception:
            log.exception("session failed")
            self._say_goodbye()
            self._close()

    def _commit(self, session: Session, event: MessageComplete) -> bool:
        """Commit the message that ended; True when the session is held for it."""
        writer, error = session.end_message()
        if writer is None or error is not None:
            session.answer_commit(event, writer, error)
            return False
        # The commit waits on the disk: the committer's job.
        self._held = True
        done = functools.partial(self._committed, session, event, writer)
        self._committer.submit(session.queue, writer, event.size, done)
        return True

    def _filtered(self, session: Session, event: MessageComplete, keep: bool) -> None:
        if keep and self._commit(session, event):
            return
        self._pump()

    def _committed(
        self,
        session: Session,
        event: MessageComplete,
        writer: MessageWriter,
        result: Exception | None,
    ) -> None:
        self._held = False
        if result is not None and not isinstance(result, QueueError):
            log.error("session failed", exc_info=result)
            writer.abort()
            self._say_goodbye()
            self._close()
            return
        try:
            session.answer_commit(event, writer, result)
        except Exception:
            log.exception("session failed")
            self._say_goodbye()
            self._close()
            return
        self._pump()

    def _flush(self, session: Session) -> bool:
        """Write the replies due; False when the session is held meanwhile."""
        conn = session.connection
        if conn.delay:
            # The tarpit or the greeting's pause: the replies are taken and
            # written later; what arrives meanwhile goes to the core, which
            # judges a client that did not wait for them.
            self._held = True
            self._delay = self._loop.call_later(conn.delay, self._write_held, session)
            return False
        data = conn.data_to_send()
        return not data or self._write(session, data)

    def _write_held(self, session: Session) -> None:
        self._delay = None
        self._held = False
        if self._write(session, session.connection.data_to_send()):
            self._pump()

    def _write(self, session: Session, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return True  # the client is gone; the core hears of it from connection_lost
        if session.tracing:
            trace_output(session, data)
        transport.write(data)
        if self._writable:
            return True
        # The client does not read: wait for the transport to drain, for
        # as long as it would be given to send a command.
        self._held = True
        timeout = session.connection.limits.command_timeout
        self._drain = self._loop.call_later(timeout, self._not_drained)
        return False

    def _stop_holding(self) -> None:
        """End the tarpit's delay or the drain wait, whichever holds the session."""
        for timer in (self._delay, self._drain):
            if timer is not None:
                timer.cancel()
                self._held = False
        self._delay = self._drain = None

    def _not_drained(self) -> None:
        self._drain = None
        self._held = False
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows and ends the session

    def _wait_for_input(self) -> None:
        """Start or go on with the core's wait for input, and read."""
        assert self._session is not None
        timer = self._session.connection.timer
        self._resume_reading()
        if timer is None:
            return
        if timer.generation != self._generation:
            self._generation = timer.generation
            self._deadline = self._loop.time() + timer.seconds
        if self._timer is None or self._deadline < self._timer_at:
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = self._loop.call_at(self._deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        session = self._session
        if session is None or self._ended:
            return
        timer = session.connection.timer
        if self._held or timer is None:
            return  # not waiting for input now; the next wait arms it again
        if timer.generation != self._generation or self._loop.time() < self._deadline:
            # The wait it was armed for is over; the current one ends later.
            self._wait_for_input()
            return
        session.connection.time_out()
        self._pump()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _close(self) -> None:
        """The session is over: close the connection, once, and say so."""
        if self._ended:
            return
        self._ended = True
        for timer in (self._timer, self._header_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._header_timer = None
        if self._transport is not None:
            self._transport.close()
        if self._on_end is not None:
            self._on_end()

    def _say_goodbye(self) -> None:
        """After a failure: the replies already due, then 421, and the message dropped.

        The client learns that the session is over and may try again; a
        message it was sending is not queued, and no 250 was said for it.
        """
        transport, session = self._transport, self._session
        pending = session.connection.data_to_send() if session is not None else b""
        if transport is not None and not transport.is_closing():
            transport.write(pending + replies.LOCAL_ERROR.to_bytes())
        if session is not None:
            try:
                _in_background(session.handle(ConnectionClosed(clean=False, reason="local-error")))
            except Exception:
                log.exception("session clean-up failed")

    async def _start_tls(self, session: Session, context: ssl.SSLContext | None) -> None:
        assert context is not None and self._transport is not None
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=session.connection.limits.command_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            problem = str(exc) or type(exc).__name__  # a TimeoutError says nothing
            transport = None
        self._held = False
        if transport is None:
            session.tls_failed(problem)
        else:
            self._transport = transport
            ssl_object = transport.get_extra_info("ssl_object")
            session.tls_established(describe(ssl_object.version(), ssl_object.cipher()))
        self._pump()
