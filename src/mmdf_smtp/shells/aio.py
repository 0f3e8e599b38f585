"""Serve sessions on an asyncio event loop: the daemon's shell.

One :class:`SessionProtocol` per connection moves octets between the
transport and the protocol core; a task per session answers the core's
events through the shared :class:`~mmdf_smtp.session.Session`.  The only
blocking work, the client look-up (DNS) and the commit (fsync), runs in
the loop's thread pool.

Flow control, as in uvicorn: reading pauses while the core holds more
unread input than :data:`HIGH_WATER` (a client pipelining into a slow
decision), and a session waits for the transport to drain before reading
more when the client does not read its replies.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from ..protocol import PAUSED, ConnectionClosed, MessageComplete, Signal, StartTLS, replies
from ..service import Peer, Service, parse_address
from ..session import Session
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
_COMMITS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="commit")


class SessionProtocol(asyncio.Protocol):
    def __init__(self, service: Service) -> None:
        self._service = service  # as it was when the connection came: reloads are for later ones
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self._early = bytearray()  # octets sent before the greeting
        self._eof = False
        self._wakeup = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- transport callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        self._task = self._loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self._session is None:
            self._early += data
            if len(self._early) > HIGH_WATER:
                self._pause_reading()
        else:
            if self._session.tracing:
                trace_input(self._session, data)
            self._session.connection.receive_data(data)
            if self._session.connection.pending_input > HIGH_WATER:
                self._pause_reading()
        self._wakeup.set()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._session is not None:
            self._session.connection.receive_data(b"")
        self._wakeup.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- control ------------------------------------------------------------

    def shut_down(self) -> None:
        """The server is stopping: 421 now, whatever the session was doing."""
        self._stopping = True
        if self._session is not None:
            self._session.connection.shut_down()
        self._wakeup.set()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    # -- the session --------------------------------------------------------

    def _peer(self) -> Peer:
        assert self._transport is not None
        peername = self._transport.get_extra_info("peername")
        sockname = self._transport.get_extra_info("sockname")
        address = parse_address(peername[0]) if peername else None
        local = parse_address(sockname[0]) if sockname else None
        return Peer(address, local, None)

    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception:
            log.exception("session failed")
            self._say_goodbye()
        finally:
            if self._transport is not None:
                self._transport.close()

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
                session.handle(ConnectionClosed(clean=False))
            except Exception:
                log.exception("session clean-up failed")

    async def _serve(self) -> None:
        service = self._service
        # Most clients are known by address: chosen here, at once.  Those
        # that need DNS wait for it in a thread, not on the loop.
        peer = self._peer()
        session = service.session_without_dns(peer)
        if session is None:
            session = await self._loop.run_in_executor(LOOKUPS, service.session, peer)
        self._session = session
        conn = session.connection
        if self._stopping:
            conn.shut_down()
        if self._early:
            conn.receive_data(bytes(self._early))
            self._early.clear()
        if self._eof:
            conn.receive_data(b"")
        generation, deadline = -1, 0.0
        while True:
            event = conn.next_event()
            if isinstance(event, Signal):
                if event is PAUSED:
                    raise RuntimeError("the session left a decision unanswered")
                if not await self._flush(session):
                    conn.receive_data(b"")
                    continue
                timer = conn.timer
                if timer is not None and timer.generation != generation:
                    generation, deadline = timer.generation, time.monotonic() + timer.seconds
                self._resume_reading()
                # data_received sets the flag: set here means input came in
                # since the core last looked, so look again before waiting.
                if not self._wakeup.is_set():
                    remaining = None if timer is None else deadline - time.monotonic()
                    try:
                        # asyncio.timeout, not wait_for: no task per wait.
                        async with asyncio.timeout(remaining):
                            await self._wakeup.wait()
                    except TimeoutError:
                        conn.time_out()
                self._wakeup.clear()
                continue
            if isinstance(event, ConnectionClosed):
                await self._flush(session)
                session.handle(event)
                return
            if isinstance(event, MessageComplete):
                await self._loop.run_in_executor(_COMMITS, session.handle, event)
            else:
                session.handle(event)
            if isinstance(event, StartTLS):
                await self._start_tls(session, service.tls_context)

    async def _flush(self, session: Session) -> bool:
        """Write the replies; False when the client cannot take them."""
        delay = session.connection.delay
        data = session.connection.data_to_send()
        if not data:
            return True
        if delay:
            await asyncio.sleep(delay)
        if session.tracing:
            trace_output(session, data)
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        if self._can_write.is_set():
            return True
        try:
            timeout = session.connection.limits.command_timeout
            async with asyncio.timeout(timeout):
                await self._can_write.wait()
        except TimeoutError:
            return False
        return not transport.is_closing()

    async def _start_tls(self, session: Session, context: ssl.SSLContext | None) -> None:
        assert context is not None and self._transport is not None
        if not await self._flush(session):
            session.connection.tls_failed()
            return
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=session.connection.limits.command_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake failed: %s", exc)
            session.connection.tls_failed()
            return
        if transport is None:
            session.connection.tls_failed()
            return
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        session.tls_established(describe(ssl_object.version(), ssl_object.cipher()))
