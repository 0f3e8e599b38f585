"""smtpd behind a load balancer: a real HAProxy sends the PROXY header.

HAProxy (Debian's ``haproxy``; ``.ci/run`` installs it) is started here on
loopback with one frontend per version (``send-proxy``, ``send-proxy-v2``)
in front of smtpd; its listening sockets are bound by the test and handed
to it (``bind fd@N``), so a client may connect before HAProxy has read its
configuration, without waiting or polling.  Clients bind their source
address: the one the header carries, and smtpd must use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dnsserver import Zone, dns_server
from mmdf_smtp.proxy import Command, Endpoint, Family, ProxyHeader, encode_v1, encode_v2
from test_wire import read_replies, recv_reply
from wire import PYTHON, Daemon, daemon, env, queued, stored, write_config

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# Under CI (.ci/run installs it) a missing HAProxy fails the tests instead.
pytestmark = pytest.mark.skipif(
    not Path(HAPROXY).exists() and os.environ.get("CI") != "true",
    reason="haproxy is not installed (Debian: haproxy)",
)

CHANNELS = "local,other,smtp"
PROXIED = """
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
proxy_timeout = 1
"""

GREETING = b"220 mx.test Server SMTP ready\r\n"
BODY = b"Subject: proxied\r\n\r\nThrough the balancer.\r\n"


@dataclass
class Balancer:
    ports: dict[str, int]  # frontend name -> port on 127.0.0.1

    def connect(self, frontend: str, source: str) -> socket.socket:
        return socket.create_connection(
            ("127.0.0.1", self.ports[frontend]), timeout=30, source_address=(source, 0)
        )


@contextmanager
def haproxy(directory: Path, server_port: int) -> Iterator[Balancer]:
    """HAProxy with a v1 and a v2 frontend, each to smtpd on ``server_port``."""
    frontends = {"v1": "send-proxy", "v2": "send-proxy-v2"}
    listeners = {}
    for name in frontends:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        listeners[name] = sock
    sections = [
        "global\n    maxconn 64\n",
        "defaults\n    mode tcp\n    timeout connect 10s\n"
        "    timeout client 60s\n    timeout server 60s\n",
    ]
    for name, option in frontends.items():
        sections.append(
            f"frontend {name}\n    bind fd@{listeners[name].fileno()}\n"
            f"    default_backend smtpd_{name}\n"
            f"backend smtpd_{name}\n    server smtpd 127.0.0.1:{server_port} {option}\n"
        )
    config = directory / "haproxy.cfg"
    config.write_text("\n".join(sections))
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)],
        pass_fds=[sock.fileno() for sock in listeners.values()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ports = {name: sock.getsockname()[1] for name, sock in listeners.items()}
    for sock in listeners.values():
        sock.close()  # HAProxy holds them now
    try:
        yield Balancer(ports)
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
        assert b"ALERT" not in errors, errors.decode(errors="replace")


@pytest.fixture(scope="module")
def smtpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("proxied")
    with daemon(proxied_config(directory, PROXIED), channels=CHANNELS) as d:
        yield d


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory, smtpd: Daemon) -> Iterator[Balancer]:
    with haproxy(tmp_path_factory.mktemp("haproxy"), smtpd.port) as b:
        yield b


def proxied_config(directory: Path, smtpd_keys: str) -> Path:
    """A configuration with ``smtpd_keys`` added to its [smtpd] table."""
    config = write_config(directory)
    text = config.read_text()
    config.write_text(text.replace("maxconnects = 8\n", "maxconnects = 8" + smtpd_keys, 1))
    return config


def send_message(
    sock: socket.socket, helo: bytes, recipient: bytes, sender_domain: bytes = b"example.net"
) -> list[bytes]:
    """One message, each command waiting for its reply; the replies after the greeting."""
    answers = []
    for command in (
        b"EHLO " + helo + b"\r\n",
        b"MAIL FROM:<sender@" + sender_domain + b">\r\n",
        b"RCPT TO:<" + recipient + b">\r\n",
        b"DATA\r\n",
        BODY + b".\r\n",
        b"QUIT\r\n",
    ):
        sock.sendall(command)
        answers += read_replies(sock, 1)
    assert sock.recv(100) == b""  # closed after 221
    return answers


def queued_with(config: Path, helo: str) -> dict[str, object]:
    [entry] = [entry for entry in queued(config) if entry["helo"] == helo]
    return entry


@pytest.mark.parametrize("frontend", ["v1", "v2"])
def test_the_client_address_from_haproxy_is_the_sessions(
    smtpd: Daemon, balancer: Balancer, frontend: str
) -> None:
    helo = f"client-{frontend}.example"
    with balancer.connect(frontend, "127.0.0.2") as sock:
        assert recv_reply(sock) == GREETING
        answers = send_message(sock, helo.encode(), b"alice@example.org")
    assert answers[0] == b"250 CHUNKING"  # the last line of EHLO's reply
    assert answers[1:4] == [
        b"250 2.1.0 Sender OK",
        b"250 2.1.5 Recipient OK",
        b"354 Start mail input; end with <CRLF>.<CRLF>",
    ]
    assert re.fullmatch(rb"250 2\.0\.0 Submitted & queued \([0-9a-f]{26}\)", answers[4])
    assert answers[5] == b"221 2.0.0 mx.test closing connection"
    entry = queued_with(smtpd.config, helo)
    # 127.0.0.2 is in channel "other"'s host table: that channel, by the header's address.
    assert (entry["remote_addr"], entry["remote_host"], entry["channel"]) == (
        "127.0.0.2",
        "[127.0.0.2]",
        "other",
    )
    message = stored(smtpd.config, str(entry["id"]))
    received, rest = message.split(b"\r\n\tby mx.test (mmdf-smtp)\r\n", 1)
    assert received == f"Received: from {helo} ([127.0.0.2])".encode()
    assert rest.split(b"\r\n", 2)[2] == BODY
    [line] = smtpd.log_lines(f"helo={helo} from=<sender@example.net>")
    assert f" client=unknown[127.0.0.2] helo={helo} " in line
    assert line.endswith(" channel=other\n")


def test_the_headers_client_is_held_to_its_channels_rules(
    smtpd: Daemon, balancer: Balancer
) -> None:
    """Channel "other" may not relay; "local" (127.0.0.1, HAProxy's own address) may."""
    with balancer.connect("v2", "127.0.0.2") as sock:
        assert recv_reply(sock) == GREETING
        sock.sendall(b"EHLO relay.example\r\n")
        read_replies(sock, 1)
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<x@remote.example>\r\n")
        assert read_replies(sock, 2)[1] == b"550 5.7.1 Relaying denied for remote.example"
        sock.sendall(b"QUIT\r\n")
        read_replies(sock, 1)
    with balancer.connect("v1", "127.0.0.1") as sock:
        assert recv_reply(sock) == GREETING
        sock.sendall(b"EHLO relay.example\r\n")
        read_replies(sock, 1)
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<x@remote.example>\r\n")
        assert read_replies(sock, 2)[1] == b"250 2.1.5 Recipient OK"
        sock.sendall(b"QUIT\r\n")
        read_replies(sock, 1)


def closed_without_a_word(sock: socket.socket) -> None:
    # Closed with input unread, the kernel sends RST rather than FIN.
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1000) == b""


def test_a_connection_without_the_header_is_closed(smtpd: Daemon) -> None:
    with smtpd.connect() as sock:
        sock.sendall(b"EHLO straight.example\r\n")
        closed_without_a_word(sock)
    [line] = smtpd.log_lines("closed end=proxy-invalid")
    assert re.search(
        r": connection from \[127\.0\.0\.1\]:\d+ closed end=proxy-invalid "
        r'reason="no PROXY header"\n$',
        line,
    ), line


def test_a_silent_connection_is_closed_after_proxy_timeout(smtpd: Daemon) -> None:
    with smtpd.connect() as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.2 ")  # and no more
        closed_without_a_word(sock)
    [line] = smtpd.log_lines("closed end=proxy-timeout")
    assert re.search(r": connection from \[127\.0\.0\.1\]:\d+ closed end=proxy-timeout\n$", line)


def test_a_broken_header_is_closed_at_once(smtpd: Daemon) -> None:
    with smtpd.connect() as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 01 25\r\nEHLO x\r\n")
        closed_without_a_word(sock)
    [line] = smtpd.log_lines("closed end=proxy-invalid")
    assert line.endswith(' reason="v1: malformed line"\n')


def header(source: str, version: int, port: int = 40000) -> bytes:
    family = Family.INET6 if ":" in source else Family.INET
    destination = "::1" if ":" in source else "127.0.0.1"
    relayed = ProxyHeader(
        version=version,
        command=Command.PROXY,
        family=family,
        source=Endpoint(ipaddress_of(source), port),
        destination=Endpoint(ipaddress_of(destination), 25),
    )
    return encode_v1(relayed) if version == 1 else encode_v2(relayed)


def ipaddress_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("opening", "address"),
    [
        (
            encode_v2(ProxyHeader(version=2, command=Command.LOCAL, family=Family.UNSPEC)),
            "127.0.0.1",
        ),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
        (b"PROXY TCP6 2001:db8::7 ::1 40000 25\r\n", "2001:db8::7"),
        (header("::ffff:127.0.0.3", 2), "127.0.0.3"),
    ],
)
def test_the_header_names_the_client_or_leaves_the_connections(
    smtpd: Daemon, opening: bytes, address: str
) -> None:
    """LOCAL and UNKNOWN (health checks) name nobody: the connection is served as the
    proxy's own, as Postfix does; an IPv4-mapped source is shown as IPv4."""
    with smtpd.connect() as sock:
        sock.sendall(opening)
        assert recv_reply(sock) == GREETING
        sock.sendall(b"QUIT\r\n")
        assert read_replies(sock, 1) == [b"221 2.0.0 mx.test closing connection"]
    [line] = smtpd.log_lines(" end=quit ")
    shown = f"[{address}]"
    assert f" client=unknown{shown} " in line, line


OUTSIDE = """
proxy_protocol = true
proxy_from = ["127.0.0.9/32"]
max_per_client = 1
greet_pause = 0.2
"""


@pytest.fixture(scope="module")
def fussy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("fussy")
    with daemon(proxied_config(directory, OUTSIDE), channels=CHANNELS) as d:
        yield d


def test_a_connection_from_outside_proxy_from_is_closed(fussy: Daemon, tmp_path: Path) -> None:
    # Straight, with a valid header, and through HAProxy, whose address is 127.0.0.1.
    with fussy.connect("127.0.0.1") as sock:
        sock.sendall(header("127.0.0.2", 1))
        closed_without_a_word(sock)
    [line] = fussy.log_lines("closed end=proxy-untrusted")
    assert re.search(r": connection from \[127\.0\.0\.1\]:\d+ closed end=proxy-untrusted\n$", line)
    with haproxy(tmp_path, fussy.port) as balancer, balancer.connect("v2", "127.0.0.2") as sock:
        closed_without_a_word(sock)
    fussy.log_lines("closed end=proxy-untrusted")
    # From proxy_from, the same header is taken.
    with fussy.connect("127.0.0.9") as sock:
        sock.sendall(header("127.0.0.2", 1))
        assert recv_reply(sock) == GREETING


def test_per_client_limits_count_the_headers_client(fussy: Daemon) -> None:
    with fussy.connect("127.0.0.9") as first:
        first.sendall(header("127.0.0.5", 2))
        assert recv_reply(first) == GREETING
        with fussy.connect("127.0.0.9") as second:
            second.sendall(header("127.0.0.5", 1, port=40001))
            assert recv_reply(second) == (
                b"421 4.7.0 Too many connections from your host, try again later\r\n"
            )
        with fussy.connect("127.0.0.9") as other:
            other.sendall(header("127.0.0.6", 2))
            assert recv_reply(other) == GREETING


def test_a_client_that_talks_first_behind_the_header_is_a_pregreeter(fussy: Daemon) -> None:
    """The octets after the header are the client's: greet_pause judges them."""
    with fussy.connect("127.0.0.9") as sock:
        sock.sendall(header("127.0.0.7", 2) + b"EHLO eager.example\r\n")
        assert recv_reply(sock) == b"521 5.5.1 Protocol error: talked before the greeting\r\n"
        closed_without_a_word(sock)
    [line] = fussy.log_lines("reason=pregreet")
    assert " client=unknown[127.0.0.7] " in line


def test_where_no_header_is_read_smtpd_will_not_start(tmp_path: Path) -> None:
    """An external server, or a connection from inetd, would take the header for a command."""
    config = proxied_config(tmp_path, PROXIED)
    smtpd = [PYTHON, "-m", "mmdf_smtp.cli.smtpd", "-c", str(config)]
    external = subprocess.run(
        [*smtpd, "-l", "127.0.0.1:0", "/bin/cat", CHANNELS],
        capture_output=True,
        env=env(),
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert (external.returncode, external.stderr.decode()) == (
        78,
        f"smtpd: {config}: smtpd.proxy_protocol: needs the in-process server "
        "(smtpd ... smtpsrvr channels), not /bin/cat\n",
    )
    ours, theirs = socket.socketpair()
    with ours, theirs:
        inetd = subprocess.run(
            [*smtpd, "smtpsrvr", CHANNELS],
            capture_output=True,
            env=env(),
            stdin=theirs,
            timeout=30,
            check=False,
        )
    assert (inetd.returncode, inetd.stderr.decode()) == (
        78,
        f"smtpd: {config}: smtpd.proxy_protocol: "
        "read by the listening daemon only, not on a connection from inetd\n",
    )


CHECKED = """
[dns]
nameservers = ["{dns}"]
timeout = 5

[auth]
spf = true
dkim = false
dmarc = false

[dnsbl]
zones = ["bl.example"]
threshold = 1

[channels.named]
table = "nameserver"
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """smtpd behind a balancer, with blocklists, SPF and a channel of forward-confirmed names.

    The clients the headers name are documentation addresses no socket
    here could have: only the header can have brought them.
    """
    zone = Zone()
    zone.add("7.2.0.192.in-addr.arpa", "PTR", "client.example.")
    zone.add("client.example", "A", "192.0.2.7")
    zone.add("spf.example", "TXT", '"v=spf1 ip4:192.0.2.7 -all"')
    zone.add("66.2.0.192.bl.example", "A", "127.0.0.2")
    directory = tmp_path_factory.mktemp("checked")
    with dns_server(zone) as nameserver:
        config = write_config(directory, CHECKED.format(dns=nameserver))
        config.write_text(
            config.read_text().replace("maxconnects = 8\n", "maxconnects = 8" + PROXIED, 1)
        )
        with daemon(config, channels="local,named,smtp") as d:
            yield d


def test_blocklists_ask_about_the_headers_client(checked: Daemon) -> None:
    with checked.connect() as sock:
        sock.sendall(header("192.0.2.66", 2))
        assert recv_reply(sock) == (
            b"554 5.7.1 Service unavailable; client [192.0.2.66] blocked using bl.example\r\n"
        )


def test_reverse_look_up_and_spf_are_of_the_headers_client(checked: Daemon) -> None:
    with checked.connect() as sock:
        sock.sendall(header("192.0.2.7", 1))
        assert recv_reply(sock) == GREETING
        answers = send_message(sock, b"client.example", b"alice@example.org", b"spf.example")
    queue_id = answers[4].decode().rsplit("(", 1)[1].rstrip(")")
    [entry] = [entry for entry in queued(checked.config) if entry["id"] == queue_id]
    assert (entry["remote_addr"], entry["remote_host"], entry["channel"]) == (
        "192.0.2.7",
        "client.example",
        "named",
    )
    message = stored(checked.config, queue_id)
    assert message.startswith(b"Received: from client.example (client.example [192.0.2.7])\r\n")
    assert b"\r\n\tspf=pass smtp.mailfrom=sender@spf.example;" in message
