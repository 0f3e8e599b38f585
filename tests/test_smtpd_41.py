"""smtpd's 4.1/5.2 flavour: ``smtpd smtpsrvr channels port maxconnects network``.

Five positional arguments and no options; the configuration comes from
$MMDF_CONFIG.  It listens on ``port`` at every address of ``network`` and
gives ``network`` as its own name (smtpsrvr's ``localhost``).
"""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsserver import Zone, dns_server
from mmdf_smtp.cli.smtpd import UsageError, parse_maxconnects, parse_port
from mmdf_smtp.session import address_literal
from test_smtpd import wrapper  # noqa: F401  (a fixture: a site's own smtpsrvr, in C)
from test_wire import read_replies, recv_reply
from wire import PYTHON, Daemon, body_of, env, queued, session_uid, stored, write_config

SMTPD = [PYTHON, "-m", "mmdf_smtp.cli.smtpd"]
EX_USAGE = 64
EX_OSERR = 71


def addresses_of(network: str) -> set[str]:
    """What getaddrinfo gives for ``network``: what smtpd must listen on."""
    found = socket.getaddrinfo(network, 25, type=socket.SOCK_STREAM)
    return {str(address[0]) for _, _, _, _, address in found}


def on_this_machine(address: str) -> bool:
    """Whether ``address`` can be listened on here (a machine without IPv6 may
    still list ``::1 localhost`` in /etc/hosts)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def free_port(network: str) -> int:
    """A port free at the first address of ``network`` now (smtpd binds it a moment later)."""
    family, _, _, _, address = socket.getaddrinfo(network, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family) as probe:
        probe.bind(address[:2])
        return int(probe.getsockname()[1])


def run_41(
    config: Path, *arguments: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*SMTPD, *arguments],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**env(), "MMDF_CONFIG": str(config), **(extra_env or {})},
    )


@contextmanager
def daemon_41(
    config: Path,
    *,
    program: str = "smtpsrvr",
    channels: str = "local,smtp",
    maxconnects: str = "2",
    network: str = "localhost",
) -> Iterator[Daemon]:
    """smtpd in the five-argument form on a free port; stopped with SIGTERM, which exits 0."""
    # Port 0 is refused in this form: a free port is chosen here, and chosen
    # again should another process take it before smtpd binds it.
    for _ in range(5):
        port = str(free_port(network))
        process = run_41(config, program, channels, port, maxconnects, network)
        try:
            started = Daemon(process, config)
            break
        except AssertionError:
            process.kill()
            process.wait()
            assert process.stderr is not None
            process.stderr.close()
            if process.returncode != EX_OSERR:
                raise
    else:
        raise AssertionError("no free port found for smtpd")
    try:
        yield started
        started.process.terminate()
        assert started.process.wait(timeout=40) == 0
    finally:
        started.stop()


def listened(d: Daemon) -> list[tuple[str, int]]:
    """The (host, port) pairs of the daemon's "listening on" line."""
    pairs = []
    for shown in d.listening.split(", "):
        host, _, port = shown.rpartition(":")
        pairs.append((host.strip("[]"), int(port)))
    return pairs


def connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=30)


# HELO offers no PIPELINING: each command waits for the reply before it.
SESSION = (
    b"HELO client.example\r\n",
    b"MAIL FROM:<a@example.net>\r\n",
    b"RCPT TO:<bob@example.org>\r\n",
    b"DATA\r\n",
)


def deliver_one(sock: socket.socket, network: str, body: bytes) -> str:
    """One message over ``sock``, every reply checked; its queue id."""
    assert recv_reply(sock) == f"220 {network} Server SMTP ready\r\n".encode()
    replies = []
    for command in SESSION:
        sock.sendall(command)
        replies.append(recv_reply(sock))
    assert replies == [
        f"250 {network} Hello client.example\r\n".encode(),
        b"250 2.1.0 Sender OK\r\n",
        b"250 2.1.5 Recipient OK\r\n",
        b"354 Start mail input; end with <CRLF>.<CRLF>\r\n",
    ]
    sock.sendall(body + b".\r\nQUIT\r\n")
    submitted, goodbye = read_replies(sock, 2)
    assert submitted.startswith(b"250 2.0.0 Submitted & queued (")
    assert goodbye == f"221 2.0.0 {network} closing connection".encode()
    return submitted.decode().rsplit("(", 1)[1].rstrip(")")


@pytest.mark.parametrize("network", ["localhost", "127.0.0.1", "::1"])
def test_mail_is_served_and_queued_at_every_address_of_network(
    tmp_path: Path, network: str
) -> None:
    missing = [address for address in addresses_of(network) if not on_this_machine(address)]
    if missing:
        pytest.skip(f"{network} resolves to {', '.join(missing)}, which this machine lacks")
    config = write_config(tmp_path)
    ids = []
    with daemon_41(config, network=network) as d:
        # Every address the name has, IPv4 and IPv6, and no other.
        assert {host for host, _ in listened(d)} == addresses_of(network)
        for host, port in listened(d):
            body = f"Subject: to {host}\r\n\r\nserved at {host}\r\n".encode()
            with connect(host, port) as sock:
                ids.append(deliver_one(sock, network, body))
    messages = {m["id"]: m for m in queued(config)}
    assert sorted(messages) == sorted(ids)
    for (host, _), queue_id in zip(listened(d), ids, strict=True):
        message = messages[queue_id]
        assert (message["channel"], message["remote_addr"]) == ("local", host)
        assert (message["sender"], message["helo"]) == ("a@example.net", "client.example")
        data = stored(config, queue_id)
        # The network is the server's name: in the trace as in the replies.
        trace = data.split(b"\r\n")[:2]
        assert trace == [
            f"Received: from client.example ({address_literal(host)})".encode(),
            f"\tby {network} (mmdf-smtp)".encode(),
        ]
        assert body_of(data) == f"Subject: to {host}\r\n\r\nserved at {host}\r\n".encode()


def accept_queue(port: int) -> int:
    """Connections on the IPv4 listener of ``port`` that the kernel holds, not yet accepted.

    For a listening socket /proc/net/tcp's rx_queue is the accept queue's length.
    """
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and local.endswith(f":{port:04X}"):
            return int(queues.split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_a_third_caller_waits_while_maxconnects_2_are_served(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with daemon_41(config, maxconnects="2", network="127.0.0.1") as d:
        first, second = connect(d.host, d.port), connect(d.host, d.port)
        third = None
        try:
            for sock in (first, second):
                assert recv_reply(sock) == b"220 127.0.0.1 Server SMTP ready\r\n"
            third = connect(d.host, d.port)
            # Connected in the kernel, and left in the listen backlog.
            wait_for(lambda: accept_queue(d.port) == 1)
            for sock in (first, second):  # both sessions go on, and smtpd has looked again
                sock.sendall(b"NOOP\r\n")
                assert recv_reply(sock) == b"250 2.0.0 OK\r\n"
            assert accept_queue(d.port) == 1
            third.setblocking(False)
            with pytest.raises(BlockingIOError):
                third.recv(1)  # no greeting
            third.setblocking(True)
            third.settimeout(30)
            first.sendall(b"QUIT\r\n")
            assert recv_reply(first) == b"221 2.0.0 127.0.0.1 closing connection\r\n"
            assert recv_reply(third) == b"220 127.0.0.1 Server SMTP ready\r\n"
            assert accept_queue(d.port) == 0
            third.sendall(b"QUIT\r\n")
            assert recv_reply(third) == b"221 2.0.0 127.0.0.1 closing connection\r\n"
        finally:
            for sock in (first, second, third):
                if sock is not None:
                    sock.close()


SCRIPT = """#!/bin/sh
# A site's own smtpsrvr: its arguments and uid to a file, then SMTP on stdin/stdout.
printf '%s\\n' "$@" > LOGFILE
id -u >> LOGFILE
printf '220 script ready\\r\\n'
IFS= read -r line
printf '221 script heard %s\\n' "$line"
"""


def loopback_zone() -> Zone:
    zone = Zone()
    zone.add("1.0.0.127.in-addr.arpa", "PTR", "loopback.test.")
    zone.add("loopback.test", "A", "127.0.0.1")
    return zone


def test_an_external_program_gets_remotehost_network_channels(tmp_path: Path) -> None:
    log = tmp_path / "argv.txt"
    log.touch()
    log.chmod(0o666)  # written by the program, which runs as the session user
    program = tmp_path / "mysrvr"
    program.write_text(SCRIPT.replace("LOGFILE", str(log)))
    program.chmod(0o755)
    with dns_server(loopback_zone()) as nameserver:
        config = write_config(tmp_path, f'\n[dns]\nnameservers = ["{nameserver}"]\ntimeout = 2\n')
        started = daemon_41(config, program=str(program), network="localhost")
        with started as d, connect("127.0.0.1", d.port) as sock:
            assert recv_reply(sock) == b"220 script ready\r\n"
            sock.sendall(b"QUIT\r\n")
            # The line the program read from stdin came back on its stdout.
            assert recv_reply(sock) == b"221 script heard QUIT\r\n"
    assert log.read_text().splitlines() == [
        "loopback.test",
        "localhost",
        "local,smtp",
        str(session_uid()),
    ]


def test_an_external_program_gets_its_path_as_argv0(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """As the original's execl(Server, Server, them, us, Channel)."""
    program, log = request.getfixturevalue("wrapper")
    with dns_server(loopback_zone()) as nameserver:
        config = write_config(tmp_path, f'\n[dns]\nnameservers = ["{nameserver}"]\ntimeout = 2\n')
        started = daemon_41(config, program=str(program), channels="smtp", network="127.0.0.1")
        with started as d, connect(d.host, d.port) as sock:
            assert recv_reply(sock) == b"220 wrapper ready\r\n"
            sock.sendall(b"QUIT\r\n")
            assert recv_reply(sock) == b"221 wrapper bye\r\n"
    assert log.read_text().splitlines() == [
        str(program),
        "loopback.test",
        "127.0.0.1",
        "smtp",
        "peer=127.0.0.1",
        f"uid={session_uid()}",
    ]


def test_sighup_reloads_and_the_network_stays_the_name(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with daemon_41(config, network="localhost") as d:
        text = config.read_text().replace('hostname = "mx.test"', 'hostname = "mx2.test"')
        config.write_text(text.replace("maxconnects = 8", "maxconnects = 8\nmax_per_client = 1"))
        d.process.send_signal(signal.SIGHUP)
        d.log_lines("configuration reloaded")
        d.log_lines(" started, pid ", d.workers)
        with connect(d.host, d.port) as first:
            assert recv_reply(first) == b"220 localhost Server SMTP ready\r\n"
            with connect(d.host, d.port) as second:  # the reloaded max_per_client
                assert recv_reply(second) == (
                    b"421 4.7.0 Too many connections from your host, try again later\r\n"
                )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["local", "0", "2", "127.0.0.1"], b"smtpd: port '0': not a number from 1 to 65535"),
        (["local", "70000", "2", "127.0.0.1"], b"smtpd: port '70000': not a number from 1"),
        (
            ["local", "nosuchservice", "2", "127.0.0.1"],
            b"smtpd: port 'nosuchservice': not a number nor a known TCP service",
        ),
        (["local", "2525", "0", "127.0.0.1"], b"smtpd: maxconnects '0': not a positive"),
        (["local", "2525", "-1", "127.0.0.1"], b"smtpd: maxconnects '-1': not a positive"),
        (["local", "2525", "x", "127.0.0.1"], b"smtpd: maxconnects 'x': not a positive"),
        (
            ["local", "2525", "2", "nosuchhost.invalid"],
            b"smtpd: network 'nosuchhost.invalid': cannot resolve",
        ),
        (["local", "2525", "2", "a..b"], b"smtpd: network 'a..b': not a host name"),
        (
            ["local", "2525", "2", "192.0.2.1"],
            b"smtpd: network '192.0.2.1': 192.0.2.1 is not an address of this machine",
        ),
        ([",", "2525", "2", "127.0.0.1"], b"smtpd: the channel list is empty"),
        (["local,nosuch", "2525", "2", "127.0.0.1"], b"unknown channel 'nosuch'"),
    ],
)
def test_bad_arguments_exit_64_naming_the_argument(
    tmp_path: Path, arguments: list[str], message: bytes
) -> None:
    config = write_config(tmp_path)
    # A name that does not resolve is asked of the system's resolver: not for long.
    process = run_41(
        config, "smtpsrvr", *arguments, extra_env={"RES_OPTIONS": "timeout:1 attempts:1"}
    )
    _, err = process.communicate(timeout=60)
    assert process.returncode == EX_USAGE, err
    assert message in err
    assert b"listening on" not in err


def test_an_address_not_on_this_machine_fails_to_bind() -> None:
    """The premise of the 192.0.2.1 case above: this machine does not have it."""
    with socket.socket() as probe, pytest.raises(OSError) as failure:
        probe.bind(("192.0.2.1", 0))
    assert failure.value.errno == errno.EADDRNOTAVAIL


@pytest.mark.parametrize(
    "options",
    [["-n", "2"], ["-d"], ["-f"], ["-c", "/dev/null"], ["-l", "127.0.0.1:2525"]],
)
def test_the_five_argument_form_takes_no_options(tmp_path: Path, options: list[str]) -> None:
    config = write_config(tmp_path)
    process = run_41(config, *options, "smtpsrvr", "local", "2525", "2", "127.0.0.1")
    _, err = process.communicate(timeout=60)
    assert process.returncode == EX_USAGE
    assert (
        b"smtpd: the form smtpd smtpsrvr channels port maxconnects network takes no options" in err
    )


def test_help_gives_the_form() -> None:
    result = subprocess.run(
        [*SMTPD, "--help"], capture_output=True, env=env(), timeout=30, check=False
    )
    assert result.returncode == 0
    assert b"smtpd smtpsrvr channels port maxconnects network" in result.stdout


def test_a_port_may_be_a_service_name() -> None:
    assert parse_port("smtp") == socket.getservbyname("smtp", "tcp") == 25
    assert parse_port("65535") == 65535
    assert parse_port("1") == 1


@given(st.text(max_size=12))
def test_port_is_1_to_65535_or_the_argument_is_named(text: str) -> None:
    try:
        port = parse_port(text)
    except UsageError as exc:
        assert str(exc).startswith(f"port {text!r}: ")
    else:
        assert 1 <= port <= 65535
        if text.isascii() and text.isdigit():
            assert port == int(text)


@given(st.one_of(st.integers(min_value=-(10**6), max_value=10**6).map(str), st.text(max_size=8)))
def test_maxconnects_is_a_positive_whole_number_or_the_argument_is_named(text: str) -> None:
    try:
        maxconnects = parse_maxconnects(text)
    except UsageError as exc:
        assert str(exc) == f"maxconnects {text!r}: not a positive whole number"
        assert not (text.isascii() and text.isdigit() and int(text) > 0)
    else:
        assert maxconnects == int(text) > 0
