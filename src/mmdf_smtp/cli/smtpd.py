"""smtpd: the SMTP connection server.

    smtpd [-d] [-f] [-n maxconnects] [-c config] [-l addr:port]... smtpsrvr channels
    smtpd [-f] [-c config] smtpsrvr channels      (stdin is a connected socket: inetd)

``smtpsrvr`` names the program that serves each connection.  When it is
this package's own smtpsrvr (by name or path), sessions are served
in-process on the event loop; any other program is executed per
connection with the connection on its stdin and stdout, argv
``[smtpsrvr|rsmtpsrvr, remotehost, localhost, channels]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys

from ..config import ConfigError
from ..daemon import Daemon, ExternalServer, bind, drop_privileges, inherited, run
from ..policy import UnknownChannel
from ..service import Service
from ..shells.blocking import BlockingShell
from .common import EX_CONFIG, EX_OK, EX_OSERR, EX_USAGE, ArgumentParser, setup_logging
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


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="smtpd", description="The SMTP connection server.")
    parser.add_argument("-d", "--debug", action="store_true", help="trace sessions on stderr")
    parser.add_argument("-f", "--finicky", action="store_true", help="refuse unknown hosts")
    parser.add_argument("-n", "--maxconnects", type=int, help="simultaneous sessions (default 4)")
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    parser.add_argument(
        "-l", "--listen", action="append", default=[], help="addr:port to listen on (repeatable)"
    )
    parser.add_argument("smtpsrvr", help="the server program, e.g. smtpsrvr")
    parser.add_argument("channels", help="comma-separated channel names")
    args = parser.parse_args(argv)
    if args.maxconnects is not None and args.maxconnects <= 0:
        parser.error("maxconnects must be a positive number")
    channels = [c for c in args.channels.split(",") if c]
    if not channels:
        parser.error("the channel list is empty")
    setup_logging("smtpd", debug=args.debug)
    external = None
    if not is_own_server(args.smtpsrvr):
        path = shutil.which(args.smtpsrvr)
        if path is None or not os.access(path, os.X_OK):
            parser.error(f"{args.smtpsrvr}: not an executable program")
        external = ExternalServer(path=path, finicky=args.finicky)
    try:
        service = Service.load(args.config, channels, finicky=args.finicky)
    except UnknownChannel as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        return EX_USAGE
    except ConfigError as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.maxconnects is not None:
        smtpd = dataclasses.replace(service.config.smtpd, maxconnects=args.maxconnects)
        service = dataclasses.replace(
            service, config=dataclasses.replace(service.config, smtpd=smtpd)
        )
    trace = (lambda line: log.debug("%s", line)) if args.debug else None

    if stdin_is_a_connection() and not args.listen:
        # inetd "nowait": one connection on stdin, served here.
        session = service.session(find_peer("-"))
        BlockingShell(session, tls_context=service.tls_context, trace=trace).run()
        return EX_OK

    try:
        listeners = inherited() if not args.listen else []
        listeners = listeners or bind(args.listen or service.config.smtpd.listen)
    except OSError as exc:
        print(f"smtpd: {exc.strerror}", file=sys.stderr)
        return EX_OSERR
    try:
        drop_privileges(service.config.user, service.config.spool)
    except ConfigError as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        return EX_CONFIG
    run(lambda: Daemon(service, listeners, config_path=args.config, external=external, trace=trace))
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
