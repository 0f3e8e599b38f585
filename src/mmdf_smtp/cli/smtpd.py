"""smtpd: the SMTP connection server, in the seed's flavours.

    smtpd [-d] [-f] [-n maxconnects] [-c config] [-l addr:port]... smtpsrvr channels
    smtpd [-f] [-c config] smtpsrvr channels      (stdin is a connected socket: inetd)
    smtpd [-c config] sourcehost.sourceport       (sun: channel smtp, peer in hex)
    smtpd smtpsrvr channels port maxconnects network   (4.1 and 5.2: no options)
    smtpd -t ...                                  (any form: check, then exit)

Standalone, it listens (or takes systemd's sockets, LISTEN_FDS) and serves
each connection.  ``smtpsrvr`` names the program that serves a session:
when it is this package's own smtpsrvr (by name or path) sessions are
served in-process on the event loop; any other program is executed per
connection with the connection on its stdin and stdout, argv
``[smtpsrvr|rsmtpsrvr, remotehost, localhost, channels]``.

The 4.1 flavour is told apart by its five arguments and no options.  It
listens on ``port`` at every address of ``network`` (a name or address of
this machine) and calls itself ``network``: that is the ``localhost`` the
program gets, argv ``[smtpsrvr, remotehost, network, channels]`` with the
program's path as written for argv[0], as the original's execl did.

``-t`` loads what the same command line starts with (see :func:`check`)
and exits, as ``sshd -t`` and ``postfix check`` do.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import sys
from typing import Any

from .. import metrics
from ..admission import Admission
from ..checks.config import AuthConfig
from ..checks.dmarc import public_suffixes
from ..checks.gate import start_verifiers, stop_verifiers
from ..config import EMBEDDED, Config, ConfigError, split_listen
from ..daemon import (
    STARTUP_BLOCKED,
    Daemon,
    ExternalServer,
    Supervisor,
    bind,
    check_proxy_support,
    die_with,
    inherited,
    listening_socket,
    run,
    share,
    sockname,
    workers_for,
)
from ..delivery import maildir
from ..policy import UnknownChannel
from ..privileges import account, acting_as, become, prepare_account
from ..service import Service
from ..session import address_literal
from ..shells.blocking import BlockingShell
from .common import (
    EX_CONFIG,
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    ArgumentParser,
    setup_logging,
)
from .serving import become_user, load_service, prepare_user
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


class UsageError(Exception):
    """A bad command-line argument; the text names it."""


def parse_port(text: str) -> int:
    """``port``: 1 to 65535, or a TCP service name from services(5)."""
    if text.isascii() and text.isdigit():
        port = int(text)
        if 1 <= port <= 65535:
            return port
        raise UsageError(f"port {text!r}: not a number from 1 to 65535")
    try:
        return socket.getservbyname(text, "tcp")
    except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the name
        raise UsageError(f"port {text!r}: not a number nor a known TCP service") from None


def parse_listen(text: str) -> str:
    """``-l``'s ``addr:port`` or ``[v6]:port``, checked now rather than at binding."""
    try:
        split_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_maxconnects(text: str) -> int:
    if text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"maxconnects {text!r}: not a positive whole number")


SocketAddress = tuple[int, tuple[Any, ...]]  # (family, bind address)


def network_addresses(network: str, port: int) -> list[SocketAddress]:
    """Every address, IPv4 and IPv6, that ``network`` names, with ``port``."""
    if not network:
        raise UsageError("network '': empty")
    try:
        found = socket.getaddrinfo(network, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"network {network!r}: cannot resolve: {exc.strerror}") from None
    except UnicodeError:  # Python's IDNA codec: an empty or overlong label
        raise UsageError(f"network {network!r}: not a host name") from None
    addresses: list[SocketAddress] = []
    for family, _, _, _, address in found:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, address) not in addresses:
            addresses.append((family, address))
    if not addresses:
        raise UsageError(f"network {network!r}: no IPv4 or IPv6 address")
    return addresses


def listen_on_network(network: str, addresses: list[SocketAddress]) -> list[socket.socket]:
    """Listen on every address of ``network``; UsageError for one not on this machine.

    Binding is the test of "on this machine": the kernel knows, and it is
    asked at the moment that counts.  An address family the kernel lacks
    (IPv6 turned off) is passed over, so long as some address is left.
    """
    listeners: list[socket.socket] = []
    try:
        for family, address in addresses:
            host, port = address[:2]
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            try:
                listeners.append(listening_socket(family, address))
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise UsageError(
                        f"network {network!r}: {host} is not an address of this machine"
                    ) from None
                raise OSError(
                    exc.errno, f"network {network!r}: cannot listen on {shown}: {exc.strerror}"
                ) from None
        if not listeners:
            raise UsageError(f"network {network!r}: this machine has none of its addresses")
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


FLAVOUR_41 = "smtpsrvr channels port maxconnects network"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="smtpd",
        description="The SMTP connection server.",
        usage="%(prog)s [-d] [-f] [-n maxconnects] [-c config] [-l addr:port]... "
        "smtpsrvr channels\n"
        "       %(prog)s [-c config] sourcehost.sourceport\n"
        f"       %(prog)s {FLAVOUR_41}\n"
        "       %(prog)s -t [the options and arguments of a form above]",
        epilog="-t loads what the same arguments start with, says whether it is "
        "right, and exits (0 when it is, 78 when not) without listening. "
        "The last form (the seed's 4.1 and 5.2 flavour) takes no options but -t: "
        "it reads the configuration from $MMDF_CONFIG, /etc/mmdf/mmdf.toml or "
        "the embedded default, "
        "listens on port (a number or service name) at every address of "
        "network (a name or address of this machine), serves at most "
        "maxconnects sessions at once, and gives smtpsrvr network as its "
        "localhost.",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="trace sessions on stderr")
    parser.add_argument("-f", "--finicky", action="store_true", help="refuse unknown hosts")
    parser.add_argument("-n", "--maxconnects", type=int, help="simultaneous sessions (default 4)")
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    parser.add_argument(
        "-l",
        "--listen",
        action="append",
        default=[],
        type=parse_listen,
        help="addr:port to listen on (repeatable)",
    )
    parser.add_argument(
        "-t", "--check", action="store_true", help="check the configuration, then exit"
    )
    parser.add_argument("arguments", nargs="+", metavar="smtpsrvr channels")
    args = parser.parse_args(argv)
    try:
        if len(args.arguments) == 5:
            flags = args.debug or args.finicky or args.listen
            if flags or args.maxconnects is not None or args.config is not None:
                raise UsageError(f"the form smtpd {FLAVOUR_41} takes no options but -t")
            return main_41(*args.arguments, check_only=args.check)
        if args.maxconnects is not None and args.maxconnects <= 0:
            raise UsageError("maxconnects must be a positive number")
        sun = len(args.arguments) == 1 and SUN_ARGUMENT.fullmatch(args.arguments[0])
        if sun:
            program, channels = "smtpsrvr", ["smtp"]
        elif len(args.arguments) == 2:
            program = args.arguments[0]
            channels = parse_channels(args.arguments[1])
        else:
            raise UsageError(
                f"expected: smtpsrvr channels, or sourcehost.sourceport, or {FLAVOUR_41}"
            )
        external = external_server(program, finicky=args.finicky)
    except UsageError as exc:
        parser.error(str(exc))
    service = load_service("smtpd", args.config, channels, finicky=args.finicky)
    if args.check:
        return check(service, external, inetd=bool(sun))
    setup_logging(
        "smtpd", debug=args.debug, target=service.config.log, log_format=service.config.log_format
    )
    if args.maxconnects is not None:
        service = with_maxconnects(service, args.maxconnects)

    if sun or (stdin_is_a_connection() and not args.listen):
        # Called by inetd with one connection on stdin: serve it, or run
        # the site's program on it, as the seed's 4.3 and sun flavours did.
        refusal = inetd_refusal(service)
        if refusal is not None:
            print(f"smtpd: {refusal}", file=sys.stderr)
            return EX_CONFIG
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

    # From the moment a socket listens, someone may signal us for it (a
    # SIGHUP from a script that waits for the port): signals wait until a
    # handler is in place (Supervisor.run, Daemon.run), rather than kill us.
    signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
    try:
        listeners = inherited() if not args.listen else []
        listeners = listeners or bind(args.listen or service.config.smtpd.listen)
    except OSError as exc:
        print(f"smtpd: {exc.strerror}", file=sys.stderr)
        return EX_OSERR
    serve(service, listeners, config_path=args.config, external=external)
    return EX_OK


def inetd_refusal(service: Service) -> str | None:
    """Why the configuration cannot serve a connection from inetd; None when it can."""
    if service.config.smtpd.proxy_protocol:
        return (
            f"{service.config.source}: smtpd.proxy_protocol: "
            "read by the listening daemon only, not on a connection from inetd"
        )
    return None


def check(service: Service, external: ExternalServer | None, *, inetd: bool) -> int:
    """``-t``: what a start refuses, short of what changes the machine.

    ``service`` is loaded as a start and a reload load it (configuration,
    channels, tables, aliases, certificate and key, the checks' settings);
    then come the start's own refusals that need no socket, no fork, no
    spool and no change of user: PROXY with a site's smtpsrvr, PROXY under
    inetd (the sun form is always under inetd), and, as root, a ``user``
    the sessions cannot become.  Whether the spool can be reached by that
    user, or the addresses bound, only the start finds out.
    """
    try:
        refusal = start_refusal(service, external, inetd=inetd)
    finally:
        if service.checks is not None:
            service.checks.close()
    if refusal is not None:
        print(f"smtpd: {refusal}", file=sys.stderr)
        return EX_CONFIG
    source = service.config.source
    print(f"smtpd: configuration OK ({'embedded default' if source == EMBEDDED else source})")
    return EX_OK


def start_refusal(service: Service, external: ExternalServer | None, *, inetd: bool) -> str | None:
    """What a start with ``service`` would refuse before binding, as it says it; else None."""
    try:
        check_proxy_support(service, external)
    except ConfigError as exc:
        return str(exc)
    refusal = inetd_refusal(service) if inetd else None
    if refusal is None and os.geteuid() == 0:
        try:
            account(service.config.user)
        except ConfigError as exc:
            return f"{service.config.source}: {exc}"  # as prepare_user says it
    return refusal


def parse_channels(text: str) -> list[str]:
    channels = [c for c in text.split(",") if c]
    if not channels:
        raise UsageError("the channel list is empty")
    return channels


def external_server(
    program: str, *, finicky: bool, argv0: str | None = None
) -> ExternalServer | None:
    """The program to run per connection; None when it is our own smtpsrvr."""
    if is_own_server(program):
        return None
    path = shutil.which(program)
    if path is None or not os.access(path, os.X_OK):
        raise UsageError(f"{program}: not an executable program")
    return ExternalServer(path=path, finicky=finicky, argv0=argv0)


def with_maxconnects(service: Service, maxconnects: int) -> Service:
    smtpd = dataclasses.replace(service.config.smtpd, maxconnects=maxconnects)
    return dataclasses.replace(service, config=dataclasses.replace(service.config, smtpd=smtpd))


def main_41(
    program: str,
    channel_list: str,
    port: str,
    maxconnects: str,
    network: str,
    *,
    check_only: bool = False,
) -> int:
    """``smtpd smtpsrvr channels port maxconnects network``: the 4.1 and 5.2 flavour.

    The arguments are checked before the configuration is read (from
    ``$MMDF_CONFIG`` or the default places: this form has no ``-c``),
    except whether ``network`` is on this machine, which binding tells.
    """
    channels = parse_channels(channel_list)
    port_number = parse_port(port)
    sessions = parse_maxconnects(maxconnects)
    addresses = network_addresses(network, port_number)
    # The original exec'd the program by the path it was given, as argv[0] too.
    external = external_server(program, finicky=False, argv0=program)
    service = load_service("smtpd", None, channels, finicky=False, hostname=network)
    if check_only:
        return check(service, external, inetd=False)
    setup_logging(
        "smtpd", debug=False, target=service.config.log, log_format=service.config.log_format
    )
    service = with_maxconnects(service, sessions)
    signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)  # as in main: before listening
    try:
        listeners = listen_on_network(network, addresses)
    except OSError as exc:
        print(f"smtpd: {exc.strerror}", file=sys.stderr)
        return EX_OSERR
    serve(service, listeners, config_path=None, external=external, hostname=network)
    return EX_OK


def auth_of(service: Service) -> AuthConfig | None:
    """The ``[auth]`` checks the service makes; None when it makes none."""
    return service.checks.auth if service.checks is not None else None


def serve(
    service: Service,
    listeners: list[socket.socket],
    *,
    config_path: str | None,
    external: ExternalServer | None,
    hostname: str | None = None,
) -> None:
    """Serve on ``listeners`` until SIGTERM: one worker per core, within maxconnects.

    Started as root, the supervisor stays root (Postfix's master does too)
    and forks the workers, which become ``user`` before they serve anyone:
    on SIGHUP it reads configuration, tables and certificates again (a key
    may be root's alone) and replaces the workers with new ones.  Started as
    anyone else, one worker serves in-process and reloads for itself.
    Signals are already blocked (see main): each waits for its handler.
    """
    try:
        check_proxy_support(service, external)
    except ConfigError as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    if service.config.metrics.listen is not None:
        metrics.load_exposition()
    account = prepare_user("smtpd", service)
    if account is not None:
        give_maildir_base(service.config)
    with acting_as(account):  # what recovery touches stays the user's
        removed = service.queue.recover()
    if removed:
        log.info("removed %d unfinished messages left by a crash", len(removed))
    maxconnects = service.config.smtpd.maxconnects
    workers = workers_for(maxconnects, service.config.smtpd.workers)
    admission = Admission(maxconnects)
    names = ", ".join(sockname(sock) for sock in listeners)
    log.info("listening on %s, maxconnects %d, %d workers", names, maxconnects, workers)

    current = service
    supervised = workers > 1 or account is not None
    supervisor_pid = os.getpid()

    def reload() -> bool:
        # For the workers that replace the running ones; those finish their
        # sessions with what they had.
        nonlocal current, account
        try:
            reloaded = Service.load(
                config_path, service.channels, finicky=service.finicky, hostname=hostname
            )
            check_proxy_support(reloaded, external)
            if account is not None:
                reloaded_account = prepare_account(reloaded.config.user, reloaded.config.spool)
                give_maildir_base(reloaded.config)
            else:
                reloaded_account = None
        except (ConfigError, UnknownChannel, OSError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        except Exception:
            log.exception("reload failed, keeping the running configuration")
            return False
        current, account = reloaded, reloaded_account
        log.info("configuration reloaded from %s", reloaded.config.source)
        return True

    # [metrics] listen: each worker counts in its segment of shared memory,
    # and the supervisor (never a worker) serves their sums.
    listen = service.config.metrics.listen
    shared = metrics.SharedSegments(workers) if listen is not None else None

    def work(index: int) -> None:
        if account is not None:
            become(account)  # in the worker, forked by the root supervisor
            die_with(supervisor_pid)
        retired = None
        if supervisor is not None:
            generation, born = supervisor.generation, supervisor.born

            def retired() -> bool:
                return generation() != born

        if shared is not None:
            metrics.record_in(shared.segment(index))
        slots = share(maxconnects, workers, index)
        auth = auth_of(current)
        if auth is not None and auth.dkim:
            # Here the worker has one thread and no privileges: see checks.
            start_verifiers()
        if auth is not None and auth.dmarc:
            public_suffixes()  # read before the loop, not on it at the first message
        try:
            run(
                lambda: Daemon(
                    current,
                    listeners,
                    config_path=config_path,
                    external=external,
                    slots=slots,
                    admission=admission,
                    hostname=hostname,
                    retired=retired,
                )
            )
        finally:
            stop_verifiers()

    supervisor = Supervisor(workers, work, reload) if supervised or shared is not None else None
    if supervisor is None:
        work(0)
        return
    server = None
    if listen is not None and shared is not None:
        try:
            server = metrics.serve_smtpd(
                listen, shared, service.config.spool, queue=metrics.gauges_of(service.config)
            )
        except OSError as exc:
            print(f"smtpd: cannot serve metrics on {listen}: {exc.strerror}", file=sys.stderr)
            raise SystemExit(EX_OSERR) from None
    try:
        supervisor.run()
    finally:
        if server is not None:
            server.close()


def give_maildir_base(config: Config) -> None:
    """As root: the folder of the Maildirs made for ``user`` when the commit
    processes deliver local mail (as deliver makes it; see atcommit)."""
    if config.local.deliver_at_commit and config.queue.backend == "spool" and config.user:
        try:
            maildir.give_base(config.local.maildir, config.user)
        except OSError as exc:
            log.warning("cannot make the folder of the Maildirs: %s", exc)


if __name__ == "__main__":
    raise SystemExit(main())
