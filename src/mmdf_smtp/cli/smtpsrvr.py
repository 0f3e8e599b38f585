"""smtpsrvr, rsmtpsrvr: speak SMTP on stdin/stdout.

    smtpsrvr  [-c config] [-d] remotehost localhost channels
    rsmtpsrvr [-c config] [-d] remotehost localhost channels   (finicky)

As in the seed, the program is finicky when its name starts with "r".
``remotehost`` is a host name, an address literal (``[192.0.2.7]``,
``[IPv6:2001:db8::7]``) or ``-`` for "find out".  When stdin is a socket the
peer's address is read from it; under tcpserver ``$TCPREMOTEIP`` gives it;
over pipes an address literal in ``remotehost`` is the only source.
``localhost`` is the name this server gives itself (``-``: the configured
hostname).
"""

from __future__ import annotations

import os
import socket
import sys

from ..checks.gate import verify_in_threads
from ..service import Peer, parse_address
from ..shells.blocking import BlockingShell
from .common import EX_OK, EX_SOFTWARE, ArgumentParser, setup_logging
from .serving import become_user, load_service


def find_peer(remotehost: str, fd: int = 0) -> Peer:
    """Who is on stdin: the socket, tcpserver's environment, or the argument."""
    given = parse_address(remotehost)
    name = None if given is not None or remotehost in ("", "-") else remotehost.rstrip(".")
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        sock = None
    if sock is not None:
        with sock:
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    theirs, ours = sock.getpeername(), sock.getsockname()
                    return Peer(
                        parse_address(theirs[0]),
                        parse_address(ours[0]),
                        name,
                        port=theirs[1],
                        local_port=ours[1],
                    )
            except OSError:
                pass
    env_ip = os.environ.get("TCPREMOTEIP")
    if env_ip:
        return Peer(
            parse_address(env_ip),
            parse_address(os.environ.get("TCPLOCALIP", "")),
            name,
            port=_port(os.environ.get("TCPREMOTEPORT", "")),
            local_port=_port(os.environ.get("TCPLOCALPORT", "")),
        )
    return Peer(given, None, name)


def _port(text: str) -> int:
    return int(text) if text.isdigit() and int(text) < 65536 else 0


def main(argv: list[str] | None = None) -> int:
    program = os.path.basename(sys.argv[0]) or "smtpsrvr"
    parser = ArgumentParser(prog=program, description="Speak SMTP on stdin/stdout.")
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    parser.add_argument("-d", "--debug", action="store_true", help="trace the session on stderr")
    parser.add_argument("remotehost", help="client name, [address literal] or -")
    parser.add_argument("localhost", help="this server's name, or - for the configured one")
    parser.add_argument("channels", help="comma-separated channel names")
    args = parser.parse_args(argv)
    channels = [c for c in args.channels.split(",") if c]
    if not channels:
        parser.error("the channel list is empty")
    service = load_service(
        program,
        args.config,
        channels,
        finicky=program.startswith("r"),
        hostname=None if args.localhost in ("", "-") else args.localhost,
    )
    setup_logging(
        program, debug=args.debug, target=service.config.log, log_format=service.config.log_format
    )
    peer = find_peer(args.remotehost)
    become_user(program, service)
    # One session a process: a DKIM verification stalls no other.
    verify_in_threads()
    session = service.session(peer)
    served = BlockingShell(session, tls_context=service.tls_context).run()
    return EX_OK if served else EX_SOFTWARE


if __name__ == "__main__":
    raise SystemExit(main())
