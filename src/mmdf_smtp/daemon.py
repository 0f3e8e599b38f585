"""The standalone connection server: listen, limit, and serve.

Like the seed's smtpd it never serves more than ``maxconnects`` sessions:
at the limit it stops accepting, and new callers wait in the kernel's
listen backlog until a session ends (no 421, as in the seed).  Each
session is served in-process by the asyncio shell, or, when the command
line names another program, by that program with the connection on its
stdin and stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from . import metrics
from .admission import Admission, Ticket
from .config import ConfigError, SmtpdConfig, split_listen
from .delivery.atcommit import commit_delivery
from .milter.client import close_idle_connections
from .policy import UnknownChannel
from .protocol import replies
from .service import IPAddress, Service, parse_address
from .session import address_literal
from .shells.aio import LOOKUPS, ProxyDoor, SessionProtocol
from .shells.committer import Committer

log = logging.getLogger("mmdf_smtp.smtpd")

# The seed listened with a backlog of maxconnects + 1; callers past it had
# their SYNs dropped and retried.  A deeper backlog lets them simply wait.
BACKLOG = 128
GRACE_SECONDS = 30.0
LOG_FLUSH_DELAY = 0.02  # seconds a log line may wait to share a write with others
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# How a supervisor tells a worker that a reload replaced it.  Not SIGHUP:
# `pkill -HUP smtpd` and `killall -HUP` reach the workers too, and a worker
# that took that for its retirement would leave its slot empty for a second.
RETIRE = signal.SIGUSR2
# Blocked from before the first socket listens until a handler takes them:
# SIGNALS, RETIRE, and SIGCHLD, which a supervisor waits for (a thread
# started meanwhile, with SIGCHLD not blocked, would take it and drop it).
# A worker inherits the mask at its fork: a RETIRE sent before its loop has
# a handler waits for it.
STARTUP_BLOCKED = {*SIGNALS, RETIRE, signal.SIGCHLD}
# A worker that dies sooner than QUICK_EXIT after its start is restarted only
# after a pause: THROTTLE_FIRST, doubled for each quick death in a row.
QUICK_EXIT = 5.0
THROTTLE_FIRST = 1.0
THROTTLE_MAX = 60.0


def _ignored(signum: int) -> None:
    # Said, so that whoever sent it learns where it should go.
    log.info(
        "%s ignored: it is the supervisor's (pid %d)", signal.Signals(signum).name, os.getppid()
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExternalServer:
    """A site's own smtpsrvr: run per connection, as the seed did.

    Its argv[0] is ``rsmtpsrvr`` when finicky, else ``smtpsrvr`` (the seed's
    4.2 flavour), unless ``argv0`` says otherwise: the 4.1 flavour gave the
    program's path as written on the command line.
    """

    path: str
    finicky: bool
    argv0: str | None = None


def check_proxy_support(service: Service, external: ExternalServer | None) -> None:
    """ConfigError when ``[smtpd] proxy_protocol`` is on where no header is read.

    The header is read by the in-process server only: a site's own
    smtpsrvr would take it for the client's first command, and find the
    balancer's address on its socket.
    """
    if service.config.smtpd.proxy_protocol and external is not None:
        raise ConfigError(
            f"{service.config.source}: smtpd.proxy_protocol: needs the in-process server "
            f"(smtpd ... smtpsrvr channels), not {external.path}"
        )


def bind(addresses: Sequence[str]) -> list[socket.socket]:
    """Listening sockets for ``host:port`` / ``[v6]:port`` addresses."""
    sockets = []
    for address in addresses:
        host, port = split_listen(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sockets.append(listening_socket(family, (host, port)))
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from exc
    return sockets


def listening_socket(family: int, address: tuple[Any, ...]) -> socket.socket:
    """A non-blocking socket listening on ``address`` (a ``bind`` address of ``family``)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def inherited() -> list[socket.socket]:
    """Listening sockets handed over by systemd (sd_listen_fds(3)), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the programs we run
    sockets = []
    for fd in range(3, 3 + count):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


class Daemon:
    """One process's event loop: accepts within its share of the limits.

    Accepting is driven by the listening sockets' readiness, with no task
    per listener or per session: while the worker has a free slot it takes
    callers one a callback, and with none it stops watching the listeners
    until a session ends, so that callers wait in the backlog.
    """

    def __init__(
        self,
        service: Service,
        listeners: list[socket.socket],
        *,
        config_path: str | None,
        external: ExternalServer | None = None,
        slots: int | None = None,
        admission: Admission | None = None,
        hostname: str | None = None,
        retired: Callable[[], bool] | None = None,
    ) -> None:
        """``retired``: for a worker of a :class:`Supervisor`, which reloads
        for it; true once a reload replaced this worker, which then accepts
        no one more, and RETIRE means "finish your sessions and exit".  Such a
        worker leaves SIGHUP to its supervisor."""
        self.service = service
        self._retired = retired
        self._listeners = listeners
        self._config_path = config_path
        self._hostname = hostname  # the command line's name for us, kept over reloads
        self._external = external
        maxconnects = service.config.smtpd.maxconnects
        self._free = slots or maxconnects
        self._accepting = False
        self._admission = admission or Admission(maxconnects)
        self._sessions: set[SessionProtocol] = set()
        self._children: set[int] = set()  # pids of external servers
        self._serving = 0
        self._idle = asyncio.Event()  # set while no session is served
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()  # accept no more
        self._terminating = asyncio.Event()  # SIGTERM: a grace period, then 421
        # Made here, in the process that serves: whether it may write the
        # Maildirs depends on who it runs as.
        self._committer = Committer(
            asyncio.get_running_loop(),
            service.queue,
            commit_delivery(service.config, service.queue),
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._terminate)
        loop.add_signal_handler(signal.SIGINT, self._terminate)
        if self._retired is None:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            loop.add_signal_handler(RETIRE, _ignored, RETIRE)
        else:
            loop.add_signal_handler(signal.SIGHUP, _ignored, signal.SIGHUP)
            loop.add_signal_handler(RETIRE, self._stopping.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_BLOCKED)
        self._start_accepting()
        try:
            await self._stopping.wait()
        finally:
            self._stop_accepting()
            for sock in self._listeners:
                sock.close()
        try:
            if not self._terminating.is_set() and self._serving:
                # Retired by a reload: sessions end in their own time (each has
                # its timeouts), unless a SIGTERM comes meanwhile.
                log.info("retiring: waiting for %d sessions", self._serving)
                idle = loop.create_task(self._idle.wait())
                terminating = loop.create_task(self._terminating.wait())
                await asyncio.wait((idle, terminating), return_when=asyncio.FIRST_COMPLETED)
                idle.cancel()
                terminating.cancel()
            await self._drain()
        finally:
            for sig in (*SIGNALS, RETIRE):
                loop.remove_signal_handler(sig)
        self._committer.close()
        # Milter connections kept for sessions that will not come now.
        close_idle_connections()

    def _terminate(self) -> None:
        self._terminating.set()
        self._stopping.set()

    def reload(self) -> None:
        """SIGHUP: new configuration and tables for new sessions."""
        current = self.service
        try:
            reloaded = Service.load(
                self._config_path,
                current.channels,
                finicky=current.finicky,
                hostname=self._hostname,
            )
            check_proxy_support(reloaded, self._external)
        except (ConfigError, UnknownChannel) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        self.service = reloaded
        self._committer.use(
            self.service.queue, commit_delivery(self.service.config, self.service.queue)
        )
        log.info("configuration reloaded from %s", self.service.config.source)

    async def _drain(self) -> None:
        """Let sessions finish for a grace period, then 421 the rest."""
        if self._serving:
            log.info("stopping: waiting for %d sessions", self._serving)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GRACE_SECONDS):
                    await self._idle.wait()
            if self._serving:
                for session in list(self._sessions):
                    session.shut_down()
                for pid in list(self._children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await self._idle.wait()

    # -- accepting ----------------------------------------------------------

    def _start_accepting(self) -> None:
        if self._accepting or self._stopping.is_set():
            return
        loop = asyncio.get_running_loop()
        self._accepting = True
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_accepting(self) -> None:
        if not self._accepting:
            return
        loop = asyncio.get_running_loop()
        self._accepting = False
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        """Take one caller waiting on ``listener``.

        One at a time: the listener stays readable while callers wait, so
        the loop comes back for the next after its other work, and the
        other workers, woken too, take their share.  A worker taking all
        waiting callers at once served nine of ten clients arriving
        together, on one core, while the other worker had one.
        """
        if self._retired is not None and self._retired():
            # Replaced by a reload, and maybe not yet told (SIGHUP): the caller
            # is left to the new workers, which have the new configuration.
            self._stopping.set()
            self._stop_accepting()
            return
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:
            log.error("accept failed: %s", exc)
            # E.g. EMFILE: do not spin; look again in a while.
            self._stop_accepting()
            asyncio.get_running_loop().call_later(0.1, self._start_accepting)
            return
        self._free -= 1
        if not self._free:
            self._stop_accepting()
        if self.service.config.smtpd.proxy_protocol:
            self._serve_proxied(sock, address)
        else:
            self._serve(sock, address[0])

    def _serve(self, sock: socket.socket, peer: str) -> None:
        ticket = self._admission.admit(peer, self.service.config.smtpd)
        if isinstance(ticket, replies.Reply):
            _refuse(sock, ticket)
            self._slot_freed()
            return
        self._serving += 1
        self._idle.clear()
        loop = asyncio.get_running_loop()
        task: asyncio.Task[Any]
        if self._external is not None:
            task = loop.create_task(self._run_external(sock, self._external))
            task.add_done_callback(lambda _: self._ended(ticket, None))
        else:
            protocol = SessionProtocol(
                self.service, self._committer, on_end=lambda: self._ended(ticket, protocol)
            )
            self._sessions.add(protocol)
            task = loop.create_task(loop.connect_accepted_socket(lambda: protocol, sock))
            task.add_done_callback(lambda done: self._connected(done, protocol, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _serve_proxied(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """A connection from a load balancer: its header names the client.

        Only the balancers of ``proxy_from`` may name clients; anyone else
        is closed at once ("The receiver SHOULD ensure proper access
        filtering so that only trusted proxies are allowed to use this
        protocol", proxy-protocol.txt 2).  The per-client limits wait for
        the header, and count the client it names.
        """
        smtpd = self.service.config.smtpd
        proxy = parse_address(address[0])
        if proxy is None or not any(proxy in network for network in smtpd.proxy_from):
            metrics.count("mmdf_refusals", ("proxy-untrusted",))
            log.info("connection from [%s]:%d closed end=proxy-untrusted", address[0], address[1])
            sock.close()
            self._slot_freed()
            return
        self._serving += 1
        self._idle.clear()
        admitted = _Admitted(self._admission, smtpd, proxy)
        protocol = SessionProtocol(
            self.service,
            self._committer,
            on_end=lambda: self._ended(admitted.ticket, protocol),
            proxy=ProxyDoor(smtpd.proxy_timeout, admitted.admit),
        )
        self._sessions.add(protocol)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: protocol, sock))
        task.add_done_callback(lambda done: self._connected(done, protocol, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connected(
        self, task: asyncio.Task[Any], protocol: SessionProtocol, sock: socket.socket
    ) -> None:
        problem = "cancelled" if task.cancelled() else task.exception()
        if problem is not None:
            log.error("cannot serve a connection: %s", problem)
            sock.close()
            protocol.abandon()

    def _ended(self, ticket: Ticket | None, protocol: SessionProtocol | None) -> None:
        self._admission.release(ticket)
        if protocol is not None:
            self._sessions.discard(protocol)
        self._serving -= 1
        if not self._serving:
            self._idle.set()
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._free += 1
        self._start_accepting()

    async def _run_external(self, sock: socket.socket, program: ExternalServer) -> None:
        """The seed's way: exec the server with the connection on fds 0 and 1."""
        loop = asyncio.get_running_loop()
        address = parse_address(sock.getpeername()[0])
        name = None
        if address is not None:
            name = await loop.run_in_executor(LOOKUPS, self.service.policy.remote_name, address)
        remote = name or address_literal(str(address))
        argv0 = program.argv0 or ("rsmtpsrvr" if program.finicky else "smtpsrvr")
        argv = [argv0, remote, self.service.hostname, ",".join(self.service.channels)]
        sock.setblocking(True)
        try:
            # posix_spawn keeps argv[0] as given (the seed's rsmtpsrvr
            # signal), which asyncio's subprocess support under uvloop does not.
            pid = os.posix_spawn(
                program.path,
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, sock.fileno(), 0),
                    (os.POSIX_SPAWN_DUP2, sock.fileno(), 1),
                ],
            )
        except OSError as exc:
            log.error("cannot run %s: %s", program.path, exc)
            _refuse(sock, replies.SERVICE_UNAVAILABLE)
            return
        sock.close()
        self._children.add(pid)
        try:
            await _exited(pid)
        finally:
            self._children.discard(pid)


class _Admitted:
    """The admission of a proxied client, made once its header is read."""

    def __init__(self, admission: Admission, limits: SmtpdConfig, proxy: IPAddress) -> None:
        self._admission = admission
        self._limits = limits
        self._proxy = proxy
        self.ticket: Ticket | None = None

    def admit(self, client: IPAddress | None) -> replies.Reply | None:
        ticket = self._admission.admit(str(client or self._proxy), self._limits)
        if isinstance(ticket, replies.Reply):
            return ticket
        self.ticket = ticket
        return None


def _refuse(sock: socket.socket, reply: replies.Reply) -> None:
    """A one-line refusal: it fits any socket buffer, so it is sent without waiting."""
    with contextlib.suppress(OSError):
        sock.send(reply.to_bytes())
    sock.close()


async def _exited(pid: int) -> int:
    """Wait for a child without a thread: its pidfd turns readable at exit."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    try:
        done = loop.create_future()
        loop.add_reader(pidfd, done.set_result, None)
        try:
            await done
        finally:
            loop.remove_reader(pidfd)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(status)


def sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def workers_for(maxconnects: int, configured: int = 0) -> int:
    """``configured`` worker processes (0: one per core), but never one with
    no session to serve."""
    return max(1, min(configured or os.cpu_count() or 1, maxconnects))


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``total`` sessions: the parts add up to it."""
    return total // workers + (1 if index < total % workers else 0)


class Supervisor:
    """The parent of the worker processes, as in Postfix's master.

    The listening sockets are bound before the workers are forked, so all
    of them accept on the same sockets, each within its share of
    ``maxconnects``; a busy worker stops accepting and the others go on.
    A worker that dies is replaced: at once if it had run a while, else
    after a pause that doubles each time (up to :data:`THROTTLE_MAX`), so
    that a worker that cannot start is not forked again and again, as fast
    as the machine can, with a traceback in the log each time (Postfix's
    master throttles such a service the same way).

    SIGTERM (and SIGINT) are passed on, and the supervisor ends with its
    workers.  SIGHUP calls ``reload``, here, where root's rights may still
    be (smtpd's supervisor stays root to read keys only root may): when it
    returns True, every worker is retired (told to finish its sessions and
    exit, by RETIRE) and a new one forked in its place, with what was
    reloaded; a worker leaves a SIGHUP of its own alone.  Signals are taken
    with sigtimedwait(2), never by a handler: one that comes while a worker
    is being forked waits its turn.
    """

    def __init__(
        self,
        workers: int,
        work: Callable[[int], None],
        reload: Callable[[], bool] | None = None,
    ) -> None:
        self._count = workers
        self._work = work
        self._reload = reload
        self._pids: dict[int, int] = {}  # pid -> worker index
        self._retiring: set[int] = set()  # pids of workers finishing after a reload
        self._started: dict[int, float] = {}  # worker index -> when its process was forked
        self._pauses: dict[int, float] = {}  # worker index -> its last pause before a restart
        self._due: dict[int, float] = {}  # worker index -> when it is to be started again
        self._stopping = False
        # Counts the reloads, in memory the workers share: a worker started
        # before the last one accepts no more callers (Daemon's ``retired``).
        self._generation = multiprocessing.RawValue(ctypes.c_uint64, 0)
        # The generation a worker was forked in, in the worker's own copy of
        # this object: read in the worker after a reload that came while it
        # started, the shared count would make an old worker look new.
        self.born = 0

    def generation(self) -> int:
        """The number of reloads so far; a worker compares it with :attr:`born` while it runs."""
        return int(self._generation.value)

    def _spawn(self, index: int) -> None:
        parent = os.getpid()
        self._started[index] = time.monotonic()
        self.born = self.generation()
        pid = os.fork()
        if pid == 0:
            # Held back until the worker's loop has its handlers (Daemon.run):
            # a SIGHUP or SIGTERM passed on meanwhile is delivered, not lost.
            signal.pthread_sigmask(signal.SIG_SETMASK, {*SIGNALS, RETIRE})
            for sig in (*SIGNALS, RETIRE):
                signal.signal(sig, signal.SIG_DFL)
            die_with(parent)
            status = 0
            try:
                self._work(index)
            except BaseException:
                log.exception("worker %d failed", index)
                status = 70
            finally:
                logging.shutdown()
                os._exit(status)
        self._pids[pid] = index
        log.info("worker %d started, pid %d", index, pid)

    def _signalled(self, signum: int) -> None:
        if signum == RETIRE:
            return  # a worker's signal, sent to every process by name
        if signum == signal.SIGHUP:
            if self._reload is not None and not self._reload():
                return  # the running configuration stays, and so do the workers
            self._replace_workers()
            return
        self._stopping = True
        self._due.clear()
        for pid in [*self._pids, *self._retiring]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _replace_workers(self) -> None:
        self._generation.value += 1
        for pid, index in list(self._pids.items()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, RETIRE)
            del self._pids[pid]
            self._retiring.add(pid)
            self._pauses.pop(index, None)
            self._spawn(index)
        for index in self._due:
            self._due[index] = time.monotonic()  # what kept it from starting may be fixed

    def run(self) -> None:
        waited = STARTUP_BLOCKED
        # Blocked signals stay pending until sigtimedwait takes them; a
        # blocked SIGCHLD is kept even while its action is to ignore it.
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        for index in range(self._count):
            self._spawn(index)
        while True:
            self._reap()
            if self._stopping:
                self._due.clear()
            now = time.monotonic()
            for index, due in list(self._due.items()):
                if due <= now:
                    del self._due[index]
                    self._spawn(index)
            if not (self._pids or self._retiring or self._due):
                break
            pause = max(0.0, min(self._due.values()) - now) if self._due else None
            info = (
                signal.sigtimedwait(waited, pause)
                if pause is not None
                else signal.sigwaitinfo(waited)
            )
            if info is not None and info.si_signo != signal.SIGCHLD:
                self._signalled(info.si_signo)
        log.info("stopped")

    def _reap(self) -> None:
        """Collect every worker that ended; restart those that should not have."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._retiring:
                self._retiring.discard(pid)
                continue
            index = self._pids.pop(pid, None)
            if index is not None and not self._stopping:
                self._restart(index, pid, os.waitstatus_to_exitcode(status))

    def _restart(self, index: int, pid: int, status: int) -> None:
        lived = time.monotonic() - self._started[index]
        if lived >= QUICK_EXIT:
            self._pauses.pop(index, None)
            log.error(
                "worker %d (pid %d) died with status %d; starting another", index, pid, status
            )
            self._spawn(index)
            return
        pause = min(THROTTLE_MAX, 2 * self._pauses.get(index, THROTTLE_FIRST / 2))
        self._pauses[index] = pause
        self._due[index] = time.monotonic() + pause
        log.error(
            "worker %d (pid %d) died with status %d after %.1f s; starting another in %g s",
            index,
            pid,
            status,
            lived,
            pause,
        )


def die_with(parent: int) -> None:
    """A worker must not outlive a supervisor killed with SIGKILL (Linux).

    Changing user clears this (prctl(2)): a worker that becomes the user
    asks again.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


class LoopBufferedStream:
    """A log stream whose lines from the event loop go out together, every few ms.

    Two lines a message (the message's, the session's), each its own write
    to a pipe that wakes its reader, cost the loop as much as a reply to
    the client.  Lines written on the loop are gathered and written at most
    :data:`LOG_FLUSH_DELAY` later, in one write; a process killed with
    SIGKILL loses those of the last moment.  Lines from other threads go
    straight out.
    """

    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lines: list[str] = []

    def write(self, text: str) -> int:
        if threading.get_ident() != self._loop_thread:
            self.stream.write(text)
            self.stream.flush()
        else:
            if not self._lines:
                self._loop.call_later(LOG_FLUSH_DELAY, self.flush_lines)
            self._lines.append(text)
        return len(text)

    def flush(self) -> None:
        """Called after every record; the loop's lines wait for flush_lines."""

    def flush_lines(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            self.stream.write("".join(lines))
            self.stream.flush()


@contextlib.contextmanager
def log_lines_batched(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Batch the package's stderr log lines on ``loop`` while in the block."""
    handlers = [
        handler
        for handler in logging.getLogger("mmdf_smtp").handlers
        if type(handler) is logging.StreamHandler
    ]
    buffered = []
    for handler in handlers:
        stream = LoopBufferedStream(handler.stream, loop)
        buffered.append(stream)
        handler.setStream(stream)
    try:
        yield
    finally:
        for handler, stream in zip(handlers, buffered, strict=True):
            stream.flush_lines()
            handler.setStream(stream.stream)


def run(daemon_factory: Callable[[], Daemon]) -> None:
    """Run one daemon on uvloop when it is installed (the fast path)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get("MMDF_NO_UVLOOP") != "1":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop

    async def main() -> None:
        with log_lines_batched(asyncio.get_running_loop()):
            await daemon_factory().run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
