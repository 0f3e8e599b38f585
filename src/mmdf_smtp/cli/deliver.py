"""deliver: run the queue.

    deliver [-c config] [-d] [--once] [--flush]
    deliver -t [-c config]

As a service (the default) it makes a pass at start, then one whenever a
message is queued (the spool pokes ``<spool>/deliver.sock``) and when a
deferred recipient is next due; SIGTERM or SIGINT ends it after the
message under way, SIGHUP reloads the configuration and aliases.
``--once`` makes one pass over what is due and exits; ``--flush`` tries
deferred recipients now (as ``postqueue -f``; ``checkque --flush ID``
asks the same for one message, with a datagram naming it).  One deliver runs per
spool: when a service holds it, ``--once`` and ``--flush`` ask that
service for a pass instead.  ``-t`` loads what a start loads and exits
(see :func:`check`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from .. import metrics
from ..config import EMBEDDED, Config, ConfigError, load
from ..delivery import maildir
from ..delivery.nexthop import Security, security_of
from ..delivery.runner import DeliveryBackend, Runner, open_queue
from ..privileges import account, drop_privileges
from ..queue import DelivererRunning, Wakeups
from ..queue.spool import Spool
from .common import (
    EX_CONFIG,
    EX_OK,
    EX_OSERR,
    EX_TEMPFAIL,
    ArgumentParser,
    load_config,
    setup_logging,
)

log = logging.getLogger("mmdf_smtp.deliver")


class Service:
    """The long-running deliver: claims on wake-ups, on retry times, and reloads on SIGHUP."""

    def __init__(
        self,
        config_path: str | None,
        config: Config,
        spool: DeliveryBackend,
        wakeups: Wakeups,
        security: Security,
    ) -> None:
        self._config_path = config_path
        self._spool = spool
        self._wakeups = wakeups
        self._stop = False
        self._reload = False
        self.runner = self._runner(config, security)

    def _runner(self, config: Config, security: Security | None = None) -> Runner:
        """A runner; without ``security`` it reads the next hop's password
        file and CAs again (as the user deliver runs as, on reload)."""
        return Runner(
            config, self._spool, stopping=lambda: self._stop or self._reload, security=security
        )

    def run(self, *, flush: bool) -> None:
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._stopping)
        signal.signal(signal.SIGINT, self._stopping)
        signal.signal(signal.SIGHUP, self._reloading)
        where = self._spool.trigger if isinstance(self._spool, Spool) else "the queue"
        log.info(
            "waiting for messages on %s, %d deliveries at once", where, self.runner.concurrency
        )
        try:
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                self.runner.run(flush=flush, wakeups=self._wakeups, interrupt=wake_read)
                flush = False
        finally:
            self.runner.close()
            signal.set_wakeup_fd(-1)
            wake_read.close()
            wake_write.close()
        log.info("stopped")

    def reload(self) -> None:
        try:
            runner = self._runner(load(self._config_path))
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        self.runner.close()
        self.runner = runner
        log.info("configuration reloaded from %s", self.runner.config.source)

    def _stopping(self, _signum: int, _frame: object) -> None:
        self._stop = True

    def _reloading(self, _signum: int, _frame: object) -> None:
        self._reload = True


def open_for_delivery(config: Config) -> tuple[DeliveryBackend, Security]:
    """The queue and the next hop's TLS and AUTH, before privileges are
    dropped: the backend's modules (a database driver and what it imports)
    may lie where only root may read, and so may the password file.
    Neither is touched yet (no folder made, no connection).  Raises ConfigError."""
    return open_queue(config), security_of(config)


def check(config_path: str | None) -> int:
    """``-t``: load what a start loads, short of what changes the machine.

    The configuration, the queue backend (its module and settings; no
    folder is made and no database connected), the next hop's password
    file and trusted CAs, and a runner as a start and a reload make it
    (the aliases file, the access tables of the maildrop's pickup); as
    root, the ``user`` deliver becomes.  Whether that user can reach the
    spool, only the start finds out: it gives the spool to the user.
    """
    config = load_config("deliver", config_path)
    try:
        spool, security = open_for_delivery(config)
        Runner(config, spool, security=security).close()
        if os.geteuid() == 0:
            try:
                account(config.user)
            except ConfigError as exc:
                # As the start says it (drop_privileges).
                raise ConfigError(f"{config.source}: {exc}") from None
    except ConfigError as exc:
        print(f"deliver: {exc}", file=sys.stderr)
        return EX_CONFIG
    source = "embedded default" if config.source == EMBEDDED else config.source
    print(f"deliver: configuration OK ({source})")
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="deliver", description="Run the queue.")
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    parser.add_argument("-d", "--debug", action="store_true", help="log details on stderr")
    parser.add_argument("--once", action="store_true", help="one pass over what is due, then exit")
    parser.add_argument("--flush", action="store_true", help="try deferred recipients now")
    parser.add_argument(
        "-t", "--check", action="store_true", help="check the configuration, then exit"
    )
    args = parser.parse_args(argv)
    if args.check and (args.once or args.flush):
        parser.error("-t checks the configuration alone: no --once nor --flush")
    if args.check:
        return check(args.config)
    config = load_config("deliver", args.config)
    setup_logging("deliver", debug=args.debug, target=config.log, log_format=config.log_format)
    if config.metrics.enabled:
        metrics.load_exposition()
    try:
        spool, security = open_for_delivery(config)
    except ConfigError as exc:
        print(f"deliver: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        if os.geteuid() == 0 and config.user:
            maildir.give_base(config.local.maildir, config.user)
        drop_privileges(config.user, config.spool)
    except ConfigError as exc:
        print(f"deliver: {config.source}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"deliver: cannot become {config.user}: {exc}", file=sys.stderr)
        return EX_OSERR
    try:
        spool.prepare()
        wakeups = spool.start_delivering()
    except DelivererRunning:
        if not args.once and not args.flush:
            print(f"deliver: another deliver is running on {config.spool}", file=sys.stderr)
            return EX_TEMPFAIL
        # Only the spool has one deliverer at a time, and its doorbell.
        assert isinstance(spool, Spool)
        if not spool.poke(flush=args.flush):
            print("deliver: another deliver holds the spool and does not listen", file=sys.stderr)
            return EX_TEMPFAIL
        print("deliver: asked the running deliver for a pass", file=sys.stderr)
        return EX_OK
    except OSError as exc:
        print(f"deliver: cannot use the spool {config.spool}: {exc.strerror}", file=sys.stderr)
        return EX_OSERR
    server = None
    try:
        if config.metrics.enabled:
            # The lock is held: this is the one deliver counting in the spool's file.
            segment = metrics.deliver_segment(config.spool)
            metrics.record_in(segment)
            if config.metrics.deliver_listen is not None:
                server = metrics.serve_deliver(
                    config.metrics.deliver_listen,
                    segment,
                    config.spool,
                    queue=metrics.gauges_of(config),
                )
        # A crashed smtpd's messages whose commit was cut short: deliverable now.
        spool.recover()
        if isinstance(spool, Spool):
            removed = spool.forget_orphans()
            if removed:
                log.info("removed %d delivery states of messages no longer queued", len(removed))
        if args.once:
            runner = Runner(config, spool, security=security)
            try:
                runner.run(flush=args.flush)
            finally:
                runner.close()
        else:
            Service(args.config, config, spool, wakeups, security).run(flush=args.flush)
    except ConfigError as exc:
        print(f"deliver: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"deliver: {exc}", file=sys.stderr)
        return EX_OSERR
    finally:
        if server is not None:
            server.close()
        wakeups.close()
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
