"""The session's one place to ask the built-in checks: :class:`Checks`.

The session asks :class:`Checks` once per stage and gets typed verdicts
back; reply data comes as :class:`Refusal` (code, enhanced code, text;
``Refusal.reply()`` makes the protocol's ``Reply``)::

    checks = Checks(auth=AuthConfig.from_table(toml["auth"], hostname=...),
                    dnsbl=DnsblConfig.from_table(toml["dnsbl"]),
                    resolver=Resolver(config.dns.nameservers))

    verdict = await checks.at_connect(client_ip)      # DnsblVerdict
    if verdict.refusal: send verdict.refusal.reply() (554 5.7.1), close

    spf = await checks.at_mail(client_ip, helo, sender)   # SpfVerdicts, per MAIL
    if spf.refusal: send it instead of 250 (550 5.7.23, or 451 4.4.3)

    end = await checks.at_end_of_message(message, spf)    # EndOfMessage
    if end.refusal: send it (550 5.7.1) and queue nothing
    else: strip the arriving fields claiming our id (results.remove_claiming_fields),
          prepend end.field (and end.quarantine, a header field, when set)

    checks.close()   # at shutdown: stops the worker threads

Policy, per ``[auth]`` (CONTRACT.md):

- ``reject_spf_fail`` (default false): SPF ``fail`` of MAIL FROM gets
  550 5.7.23 (RFC 7372 3.2) at MAIL; a DNS failure then gets 451 4.4.3
  (RFC 7208 8.6).  Off, SPF only feeds the results field and DMARC.
- ``reject_dmarc`` (default true): a DMARC failure whose disposition is
  ``reject`` (``p``/``sp`` reject, in the ``pct`` sample) gets 550 5.7.1
  at end of data.  Off, such a message is marked as quarantined instead.
- A ``quarantine`` disposition never refuses: :attr:`EndOfMessage.quarantine`
  is a header field (``X-MMDF-Quarantine``) for the queued copy.
- A DNS failure is ``temperror`` in the results field, and refuses only
  where noted above; DMARC never refuses on a ``temperror``.

Every look-up goes through the one :class:`~.dns.Resolver`, on the loop.
pyspf resolves synchronously, so it runs in this object's own worker
threads (``workers`` of them) with a look-up function that submits each
query to the loop's resolver (:mod:`.spf`).  DKIM and ARC keys are fetched
on the loop first, then dkimpy verifies in worker processes (its
CPU-bound calls hold the GIL, :mod:`.dkim`): the event loop never blocks.
A verification holds at most ``dkim_max_size`` octets of a message, so
the memory of all of them is bounded whatever the message sizes.

The verification processes are the process's, shared by every Checks
(a reload makes a new one; the processes stay).  Who starts them:

- a daemon, with :func:`start_verifiers` before its loop starts: forked
  there, from a process that has one thread and has dropped privileges,
  so they run as the unprivileged user with everything imported (a fork
  server would have to exec the interpreter as that user, who may not be
  allowed to); :func:`stop_verifiers` when it ends, else they would outlive
  it (a process of the pool waits on a queue whose both ends it holds);
- a program serving one session (smtpsrvr), with
  :func:`verify_in_threads`: nothing else is on its loop to be stalled;
- else, at the first message, a pool of ``verifications`` processes from
  a "forkserver" (a loop with threads must not fork).

A pool that cannot start or breaks gives ``temperror``, never a lost session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import multiprocessing
import os
import random
import signal
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial

from .. import metrics
from .config import AuthConfig, DnsblConfig
from .dkim import (
    DkimReport,
    MessageSource,
    fetch_keys,
    key_names,
    parse_header,
    read_header,
    too_large_report,
)
from .dkim import verify_message as _verify_message
from .dmarc import evaluate_dmarc
from .dns import Resolver
from .dnsbl import Dnsbl
from .results import authentication_results
from .spf import DEFAULT_QUERYTIME, check_spf
from .verdicts import (
    ArcVerdict,
    DkimVerdict,
    DmarcVerdict,
    DnsblVerdict,
    Refusal,
    SpfVerdicts,
)

__all__ = [
    "Checks",
    "EndOfMessage",
    "start_verifiers",
    "stop_verifiers",
    "verify_in_threads",
]

log = logging.getLogger("mmdf_smtp.checks")

QUARANTINE_FIELD = "X-MMDF-Quarantine"
DEFAULT_WORKERS = 16
DEFAULT_VERIFICATIONS = 2


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers started from a clean server process, not forked from a threaded daemon."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mmdf_smtp.checks.dkim"])
    return context


def _start_pool(workers: int) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context())
    pool.submit(int).result()  # the fork server and one worker are up
    return pool


class _Verifiers:
    """The process's verification processes; ``threads``: verify in threads instead."""

    pool: ProcessPoolExecutor | None = None
    threads = False


def _die_with(parent: int) -> None:
    """A verifier ends with the process that forked it, even one killed (Linux)."""
    # Forked from a daemon worker that holds its signals back until its
    # loop has handlers: a verifier takes SIGTERM as it comes, and leaves
    # a Ctrl-C to the daemon, which ends it in order.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def start_verifiers(count: int = DEFAULT_VERIFICATIONS) -> None:
    """Fork ``count`` verification processes now, for every Checks of this process.

    Call it while the process has one thread (before the event loop and
    before any Checks has run), after dropping privileges.
    """
    if _Verifiers.pool is not None:
        return
    pool = ProcessPoolExecutor(
        max_workers=count,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_die_with,
        initargs=(os.getpid(),),
    )
    pool.submit(int).result()  # with "fork", all of them are started at the first call
    _Verifiers.pool = pool
    log.info("%d DKIM verification processes started", count)


def stop_verifiers() -> None:
    """End this process's verification processes, waiting for them."""
    pool, _Verifiers.pool = _Verifiers.pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def verify_in_threads() -> None:
    """Verify in this process's threads: for a process that serves one session."""
    _Verifiers.threads = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfMessage:
    """What the checks say at end of data."""

    field: bytes  # the Authentication-Results field to prepend, with its line end
    refusal: Refusal | None = None  # send this instead of queueing
    quarantine: bytes | None = None  # a header field to prepend: the message is quarantined
    dkim: tuple[DkimVerdict, ...] = ()
    arc: ArcVerdict | None = None
    dmarc: DmarcVerdict | None = None


class Checks:
    """The one place the session asks: per connection, per MAIL, per message."""

    def __init__(
        self,
        *,
        auth: AuthConfig | None,
        dnsbl: DnsblConfig | None,
        resolver: Resolver,
        seed: int | None = None,
        workers: int = DEFAULT_WORKERS,
        verifications: int = DEFAULT_VERIFICATIONS,
        spf_querytime: float = DEFAULT_QUERYTIME,
    ) -> None:
        self.auth = auth
        self.resolver = resolver
        self.dnsbl = Dnsbl(dnsbl, resolver) if dnsbl is not None and dnsbl.sites else None
        # Seeded: deterministic pct sampling (tests); else seeded from the OS.
        self._rng = random.Random(seed)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="checks")
        self._verifications = verifications
        # Made at the first verification, so that a daemon that drops
        # privileges has done so before.
        self._processes: ProcessPoolExecutor | None = None
        self._starting: asyncio.Future[ProcessPoolExecutor] | None = None
        self._threads_only = False  # no pool could be started
        self._spf_querytime = spf_querytime

    def close(self) -> None:
        """Stop the worker threads and processes (verifications under way are abandoned)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None

    async def at_connect(self, address: str) -> DnsblVerdict:
        """The DNS blocklists' verdict on the client (an empty one without ``[dnsbl]``)."""
        if self.dnsbl is None:
            return DnsblVerdict()
        started = time.monotonic()
        verdict = await self.dnsbl.check(address)
        metrics.since("mmdf_check_seconds", ("dnsbl",), started)
        return verdict

    async def at_mail(self, ip: str, helo: str, sender: str) -> SpfVerdicts:
        """SPF of MAIL FROM (``sender``, "" for <>) and of the HELO name."""
        auth = self.auth
        if auth is None or not auth.spf:
            return SpfVerdicts()
        ip_text = str(ipaddress.ip_address(ip.strip("[]").removeprefix("IPv6:")))
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        run = partial(
            check_spf,
            self.resolver.blocking(loop),
            ip=ip_text,
            sender=sender,
            helo=helo,
            receiver=auth.authserv_id,
            querytime=self._spf_querytime,
        )
        helo_check = loop.run_in_executor(self._executor, partial(run, identity="helo"))
        if sender:
            mailfrom = await loop.run_in_executor(self._executor, partial(run, identity="mailfrom"))
            helo_verdict = await helo_check
        else:
            # RFC 7208 2.4: for the null path, MAIL FROM is checked as
            # postmaster@<HELO>: the HELO check, under the other identity.
            helo_verdict = await helo_check
            mailfrom = replace(helo_verdict, identity="mailfrom", sender=f"postmaster@{helo}")
        refusal = None
        if auth.reject_spf_fail:
            if mailfrom.result == "fail":
                refusal = Refusal(550, "5.7.23", f"SPF validation failed for {mailfrom.domain}")
            elif mailfrom.result == "temperror":
                refusal = Refusal(
                    451, "4.4.3", f"Temporary DNS error checking SPF for {mailfrom.domain}"
                )
        metrics.since("mmdf_check_seconds", ("spf",), started)
        return SpfVerdicts(mailfrom=mailfrom, helo=helo_verdict, refusal=refusal)

    async def at_end_of_message(self, message: MessageSource, spf: SpfVerdicts) -> EndOfMessage:
        """DKIM, ARC and DMARC of the message as received; ``message``: bytes or its file's path."""
        auth = self.auth
        if auth is None:
            return EndOfMessage(field=b"")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        report = await self._verify(loop, message, auth)
        dmarc = None
        if auth.dmarc:
            dmarc = await evaluate_dmarc(
                self.resolver, report.headers, spf.mailfrom, report.signatures, self._rng
            )
        metrics.since("mmdf_check_seconds", ("dkim_dmarc",), started)
        field = authentication_results(
            auth.authserv_id,
            spf=spf if auth.spf else None,
            dkim=report.signatures if auth.dkim else None,
            arc=report.arc if auth.dkim else None,
            dmarc=dmarc,
        )
        refusal = quarantine = None
        if dmarc is not None and dmarc.result == "fail":
            if dmarc.disposition == "reject" and auth.reject_dmarc:
                refusal = Refusal(
                    550, "5.7.1", f"Email rejected per DMARC policy for {dmarc.from_domain}"
                )
            elif dmarc.disposition in ("reject", "quarantine"):
                quarantine = (
                    f"{QUARANTINE_FIELD}: DMARC policy {dmarc.policy} of {dmarc.from_domain}\r\n"
                ).encode()
        return EndOfMessage(
            field=field,
            refusal=refusal,
            quarantine=quarantine,
            dkim=report.signatures,
            arc=report.arc,
            dmarc=dmarc,
        )

    async def _verify(
        self, loop: asyncio.AbstractEventLoop, message: MessageSource, auth: AuthConfig
    ) -> DkimReport:
        if not auth.dkim:
            header = await loop.run_in_executor(self._executor, read_header, message)
            return DkimReport(headers=parse_header(header))
        header = await loop.run_in_executor(self._executor, read_header, message)
        headers = parse_header(header)
        if isinstance(message, bytes) and len(message) > auth.dkim_max_size:
            return too_large_report(headers, auth.dkim_max_size)
        keys = await fetch_keys(self.resolver, key_names(headers))
        source = message if isinstance(message, bytes) else os.fspath(message)
        verify = partial(_verify_message, keys, source, max_size=auth.dkim_max_size)
        pool: Executor | None = None
        try:
            pool = await self._pool(loop)
            return await loop.run_in_executor(pool, verify)
        except Exception as exc:  # dkimpy's defect, a killed worker: not the session's end
            log.exception("DKIM verification failed")
            if isinstance(exc, BrokenProcessPool):
                if pool is _Verifiers.pool:
                    _Verifiers.pool = None  # the next message gets a pool of its own
                if pool is self._processes:
                    self._processes = None
            signatures = tuple(
                DkimVerdict(result="temperror", reason="verification failed")
                for name, _ in headers
                if name.lower() == b"dkim-signature"
            )
            return DkimReport(signatures=signatures, headers=headers)

    async def _pool(self, loop: asyncio.AbstractEventLoop) -> Executor:
        """Where to verify: the process's verifiers, our threads, or our own pool."""
        if _Verifiers.pool is not None:
            return _Verifiers.pool
        if _Verifiers.threads or self._threads_only:
            return self._executor
        if self._processes is None:
            if self._starting is None:
                # Starting the fork server and a worker takes a good part of
                # a second: in a thread, not on the loop.
                self._starting = loop.run_in_executor(
                    self._executor, _start_pool, self._verifications
                )
            try:
                self._processes = await asyncio.shield(self._starting)
            except Exception:
                # Workers are new interpreters, run as the daemon's user: one
                # that may not execute it (a Python under /root, mode 0700)
                # gets no pool.  Verifying in a thread is slower, not wrong.
                if not self._threads_only:
                    log.warning("DKIM verification in threads: no worker process", exc_info=True)
                self._threads_only = True
            finally:
                self._starting = None
        return self._processes or self._executor
