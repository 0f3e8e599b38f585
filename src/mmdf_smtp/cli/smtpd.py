"""smtpd: the SMTP connection server, in the seed's flavours.

    smtpd [-d] [-f] [-n maxconnects] [-c config] [-l addr:port]... smtpsrvr channels
    smtpd [-f] [-c config] smtpsrvr channels      (stdin is a connected socket: inetd)
    smtpd [-c config] sourcehost.sourceport       (sun: channel smtp, peer in hex)

Standalone, it listens (or takes systemd's sockets, LISTEN_FDS) and serves
each connection.  ``smtpsrvr`` names the program that serves a session:
when it is this package's own smtpsrvr (by name or path) sessions are
served in-process on the event loop; any other program is executed per
connection with the connection on its stdin and stdout, argv
``[smtpsrvr|rsmtpsrvr, remotehost, localhost, channels]``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import sys

from ..admission import Admission
from ..config import ConfigError
from ..daemon import (
    SIGNALS,
    Daemon,
    ExternalServer,
    Supervisor,
    bind,
    inherited,
    run,
    share,
    sockname,
    workers_for,
)
from ..policy import UnknownChannel
from ..service import Service
from ..session import address_literal
from ..shells.blocking import BlockingShell
from .common import (
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    ArgumentParser,
    become_user,
    load_service,
    setup_logging,
)
from .smtpsrvr import find_peer

log = logging.getLogger("mmdf_smtp.smtpd")

OWN_NAMES = ("smtpsrvr", "rsmtpsrvr")


def is_own_server(path: str) -> bool:
    """True when ``path`` names this package's smtpsrvr."""
    if path in OWN_NAMES:
        return True
    resolved = shutil.which(path) or path
    own = shutil.which("smtpsrvr")
    if own and os.path.realpath(resolved) == os.path.realpath(own):
        return True
    scripts = os.path.dirname(os.path.realpath(sys.argv[0]))
    return os.path.realpath(resolved) == os.path.join(scripts, "smtpsrvr")


def stdin_is_a_connection() -> bool:
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return False
    with sock:
        try:
            sock.getpeername()
        except OSError:
            return False
    return True


SUN_ARGUMENT = re.compile(r"([0-9A-Fa-f]{8})\.([0-9]+)")


def sun_peer(argument: str) -> str:
    """The sun flavour's ``sourcehost.sourceport``: the host is IPv4 in hex."""
    match = SUN_ARGUMENT.fullmatch(argument)
    assert match is not None
    return f"[{ipaddress.IPv4Address(int(match.group(1), 16))}]"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="smtpd",
        description="The SMTP connection server.",
        usage="%(prog)s [-d] [-f] [-n maxconnects] [-c config] [-l addr:port]... "
        "smtpsrvr channels\n       %(prog)s [-c config] sourcehost.sourceport",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="trace sessions on stderr")
    parser.add_argument("-f", "--finicky", action="store_true", help="refuse unknown hosts")
    parser.add_argument("-n", "--maxconnects", type=int, help="simultaneous sessions (default 4)")
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    parser.add_argument(
        "-l", "--listen", action="append", default=[], help="addr:port to listen on (repeatable)"
    )
    parser.add_argument("arguments", nargs="+", metavar="smtpsrvr channels")
    args = parser.parse_args(argv)
    if args.maxconnects is not None and args.maxconnects <= 0:
        parser.error("maxconnects must be a positive number")
    sun = len(args.arguments) == 1 and SUN_ARGUMENT.fullmatch(args.arguments[0])
    if sun:
        program, channels = "smtpsrvr", ["smtp"]
    elif len(args.arguments) == 2:
        program = args.arguments[0]
        channels = [c for c in args.arguments[1].split(",") if c]
        if not channels:
            parser.error("the channel list is empty")
    else:
        parser.error("expected: smtpsrvr channels, or sourcehost.sourceport")
    external = None
    if not is_own_server(program):
        path = shutil.which(program)
        if path is None or not os.access(path, os.X_OK):
            parser.error(f"{program}: not an executable program")
        external = ExternalServer(path=path, finicky=args.finicky)
    service = load_service("smtpd", args.config, channels, finicky=args.finicky)
    setup_logging("smtpd", debug=args.debug, target=service.config.log)
    if args.maxconnects is not None:
        smtpd = dataclasses.replace(service.config.smtpd, maxconnects=args.maxconnects)
        service = dataclasses.replace(
            service, config=dataclasses.replace(service.config, smtpd=smtpd)
        )

    if sun or (stdin_is_a_connection() and not args.listen):
        # Called by inetd with one connection on stdin: serve it, or run
        # the site's program on it, as the seed's 4.3 and sun flavours did.
        peer = find_peer(sun_peer(args.arguments[0]) if sun else "-")
        become_user("smtpd", service)
        if external is not None:
            remote = peer.name or (
                service.policy.remote_name(peer.address) if peer.address else None
            )
            literal = address_literal(str(peer.address)) if peer.address else "-"
            argv0 = "rsmtpsrvr" if external.finicky else "smtpsrvr"
            channel_list = ",".join(channels)
            os.execv(external.path, [argv0, remote or literal, service.hostname, channel_list])
        served = BlockingShell(service.session(peer), tls_context=service.tls_context).run()
        return EX_OK if served else EX_SOFTWARE

    try:
        listeners = inherited() if not args.listen else []
        listeners = listeners or bind(args.listen or service.config.smtpd.listen)
    except OSError as exc:
        print(f"smtpd: {exc.strerror}", file=sys.stderr)
        return EX_OSERR
    become_user("smtpd", service)
    removed = service.queue.recover()
    if removed:
        log.info("removed %d unfinished messages left by a crash", len(removed))
    maxconnects = service.config.smtpd.maxconnects
    workers = workers_for(maxconnects)
    admission = Admission(maxconnects)
    # Signals wait until a handler is in place (Supervisor.run, Daemon.run):
    # a SIGHUP or SIGTERM sent as soon as we say we listen must not kill us.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    names = ", ".join(sockname(sock) for sock in listeners)
    log.info("listening on %s, maxconnects %d, %d workers", names, maxconnects, workers)

    current = service

    def reload() -> None:
        # For the workers that will replace others; the running ones reload
        # for themselves, and log what is wrong with a bad configuration.
        # This runs in the supervisor's signal handler, where anything
        # raised would end the supervisor, and every worker with it.
        nonlocal current
        try:
            current = Service.load(args.config, channels, finicky=args.finicky)
        except (ConfigError, UnknownChannel):
            pass
        except Exception:
            log.exception("reload failed, keeping the running configuration")

    def work(index: int) -> None:
        slots = share(maxconnects, workers, index)
        run(
            lambda: Daemon(
                current,
                listeners,
                config_path=args.config,
                external=external,
                slots=slots,
                admission=admission,
            )
        )

    if workers == 1:
        work(0)
    else:
        Supervisor(workers, work, reload).run()
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
