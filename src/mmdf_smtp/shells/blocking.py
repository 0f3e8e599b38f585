"""Serve one session on a pair of file descriptors, blocking.

This is ``smtpsrvr``'s shell: stdin and stdout may be a socket (inetd,
systemd ``Accept=yes``, tcpserver, smtpd's fork), or pipes (tests).  TLS
runs through :class:`ssl.SSLObject` over memory BIOs, so STARTTLS works on
any descriptor, pipes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..protocol import PAUSED, ConnectionClosed, Signal, StartTLS, Timer, replies
from ..session import Session
from .tls import describe
from .trace import trace_input, trace_output

log = logging.getLogger("mmdf_smtp.smtpsrvr")

READ_SIZE = 65536


class _Gone(Exception):
    """The client cannot be written to any more."""


class BlockingShell:
    def __init__(
        self,
        session: Session,
        *,
        rfd: int = 0,
        wfd: int = 1,
        tls_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._session = session
        self._conn = session.connection
        self._rfd = rfd
        self._wfd = wfd
        self._tls_context = tls_context
        self._clock = clock
        self._sleep = sleep
        self._generation = -1
        self._deadline = 0.0
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._loop: asyncio.Runner | None = None  # made for the first filter's verdict

    def run(self) -> bool:
        """Serve until the session ends; False when it failed.

        A failure (an exception from the session) is logged, never written
        to the client (under inetd stderr is the connection): the client gets
        the replies already due and 421, and a message it was sending is
        dropped, as when it goes away.
        """
        try:
            self._serve()
        except Exception:
            log.exception("session failed")
            self._say_goodbye()
            return False
        finally:
            if self._loop is not None:
                self._loop.close()
        return True

    def _wait_for(self, pending: Coroutine[Any, Any, None] | None) -> None:
        """Run what the filters have to say to its end."""
        if pending is None:
            return
        if self._loop is None:
            self._loop = asyncio.Runner()
        self._loop.run(pending)

    def _say_goodbye(self) -> None:
        data = self._conn.data_to_send() + replies.LOCAL_ERROR.to_bytes()
        try:
            if self._tls is not None:
                self._tls.write(data)
                data = self._outgoing.read()
            self._write_all(data)
        except (_Gone, ssl.SSLError):
            pass
        try:
            self._wait_for(
                self._session.handle(ConnectionClosed(clean=False, reason="local-error"))
            )
        except Exception:
            log.exception("session clean-up failed")

    def _serve(self) -> None:
        conn = self._conn
        self._wait_for(self._session.begin())
        while True:
            event = conn.next_event()
            if isinstance(event, Signal):
                if event is PAUSED:
                    raise RuntimeError("the session left a decision unanswered")
                if self._flush():
                    continue  # input came while the replies were held: the core's first
                data = self._read(conn.timer)
                if data is None:
                    conn.time_out()
                    continue
                if self._session.tracing and data:
                    trace_input(self._session, data)
                conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                self._flush()
                self._wait_for(self._session.handle(event))
                return
            self._wait_for(self._session.handle(event))
            if isinstance(event, StartTLS):
                self._flush()
                self._start_tls()

    # -- output ----------------------------------------------------------

    def _flush(self) -> bool:
        """Write the replies due; True when input was taken while they were held."""
        took_input = self._hold(self._conn.delay) if self._conn.delay else False
        data = self._conn.data_to_send()
        if not data:
            return took_input
        if self._session.tracing:
            trace_output(self._session, data)
        if self._tls is not None:
            self._tls.write(data)
            data = self._outgoing.read()
        try:
            self._write_all(data)
        except _Gone:
            # Nobody to answer: end the session as if the client had left.
            self._conn.receive_data(b"")
        return took_input

    def _hold(self, seconds: float) -> bool:
        """The tarpit or the greeting's pause: the replies wait ``seconds``.

        What the client sends meanwhile goes to the core, which judges a
        client that did not wait; one read's worth at most, and none under
        TLS (where a record may need more reads than the pause allows).
        True when input was taken.
        """
        took_input = False
        deadline = self._clock() + seconds
        while (remaining := deadline - self._clock()) > 0:
            conn = self._conn
            if self._tls is not None or conn.closed or conn.pending_input >= READ_SIZE:
                self._sleep(remaining)
                break
            try:
                readable, _, _ = select.select([self._rfd], [], [], remaining)
                data = os.read(self._rfd, READ_SIZE) if readable else None
            except OSError:
                data = b""
            if data is None:
                break
            if self._session.tracing and data:
                trace_input(self._session, data)
            conn.receive_data(data)
            took_input = True
            if not data:
                break  # nobody is waiting for the replies any more
        return took_input

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        # A client that never reads its replies gets as long to drain them
        # as it would have to send a command.
        limit = self._conn.limits.command_timeout
        while view:
            try:
                _, writable, _ = select.select([], [self._wfd], [], limit)
                if not writable:
                    raise _Gone
                written = os.write(self._wfd, view)
            except OSError as exc:
                raise _Gone from exc
            view = view[written:]

    # -- input -----------------------------------------------------------

    def _raw_read(self, timer: Timer | None) -> bytes | None:
        """Octets from the descriptor; b"" at end of file; None on timeout."""
        if timer is not None and timer.generation != self._generation:
            self._generation = timer.generation
            self._deadline = self._clock() + timer.seconds
        remaining = None if timer is None else self._deadline - self._clock()
        if remaining is not None and remaining <= 0:
            return None
        try:
            readable, _, _ = select.select([self._rfd], [], [], remaining)
            if not readable:
                return None
            return os.read(self._rfd, READ_SIZE)
        except OSError:
            return b""

    def _read(self, timer: Timer | None) -> bytes | None:
        if self._tls is None:
            return self._raw_read(timer)
        while True:
            try:
                return self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError:
                return b""
            raw = self._raw_read(timer)
            if raw is None:
                return None
            if not raw:
                self._incoming.write_eof()
            else:
                self._incoming.write(raw)

    def _start_tls(self) -> None:
        assert self._tls_context is not None, "STARTTLS is offered only with a context"
        tls = self._tls_context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # The handshake gets the command timeout, like any other wait.
        timer = Timer(generation=self._generation - 1, seconds=self._conn.limits.command_timeout)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._write_all(self._outgoing.read())
                    raw = self._raw_read(timer)
                    if raw is None:
                        raise _Gone("timed out") from None
                    if not raw:
                        raise _Gone("the client closed the connection") from None
                    self._incoming.write(raw)
            self._write_all(self._outgoing.read())
        except (ssl.SSLError, _Gone) as exc:
            with contextlib.suppress(_Gone):
                self._write_all(self._outgoing.read())  # the alert, if any
            self._session.tls_failed(str(exc) or "the connection is gone")
            return
        self._tls = tls
        self._session.tls_established(describe(tls.version(), tls.cipher()))
