"""What smtpd logs without -d: refusals, how sessions ended, failed handshakes.

The lines are the daemon's own, read from its stderr; the fail2ban filter
shipped in contrib/ is run over them with fail2ban-regex (Debian's
fail2ban; ``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from wire import Daemon, certificate, daemon, queued, smtpsrvr, stored, write_config

FILTER = Path(__file__).resolve().parent.parent / "contrib" / "fail2ban" / "mmdf-smtp.conf"

LIMITS = """
[limits]
message_size = 1000
command_timeout = 2
errors = 3
errors_before_delay = 3
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("logs")
    config = write_config(directory, LIMITS, tls=certificate(ca, directory), scripted=True)
    with daemon(config) as d:
        yield d


def session_lines(server: Daemon, script: bytes, source: str = "127.0.0.1") -> list[str]:
    """Run ``script`` as one client; the log lines of its session, up to its end line."""
    with server.connect(source) as sock:
        sock.recv(1000)  # the greeting
        sock.sendall(script)
        while sock.recv(65536):  # until the server closes (QUIT, 421)
            pass
    return lines_until_end(server)


def lines_until_end(server: Daemon) -> list[str]:
    lines = []
    while True:
        line = server.lines.get(timeout=60)
        assert line is not None, "smtpd ended"
        lines.append(line)
        if re.search(r": session \S+ .* end=", line):
            return lines


def refusal(lines: list[str]) -> str:
    [line] = [line for line in lines if " refused " in line]
    return line


def end_of(lines: list[str]) -> str:
    return re.findall(r" end=(\S+)", lines[-1])[0]


ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.net>\r\n"


def test_refusals_are_logged_one_line_each(server: Daemon, tmp_path: Path) -> None:
    cases = [
        (ENVELOPE + b"RCPT TO:<nobody@example.org>\r\nQUIT\r\n", "127.0.0.1"),
        (ENVELOPE + b"RCPT TO:<x@remote.example>\r\nQUIT\r\n", "127.0.0.2"),
        (b"EHLO client.example\r\nMAIL FROM:<a@example.net> SIZE=5000\r\nQUIT\r\n", "127.0.0.1"),
        (ENVELOPE + b"RCPT TO:<alice@example.org>\r\nDATA\r\n" + b"x" * 2000 + b"\r\n.\r\n"
         b"QUIT\r\n", "127.0.0.1"),
        (ENVELOPE + b"RCPT TO:<alice@example.org>\r\nDATA\r\nfirst\n.\r\nMAIL FROM:<e@x>\r\n"
         b"\r\n.\r\nQUIT\r\n", "127.0.0.1"),
        (b"EHLO client.example\r\nFOO\r\nBAR\r\nBAZ\r\n", "127.0.0.1"),
    ]  # fmt: skip
    logged = [session_lines(server, script, source) for script, source in cases]
    refused = [refusal(lines) for lines in logged]
    prefix = (
        r"smtpd\(\d+\): [0-9a-f]{8} refused client=unknown\[(127\.0\.0\.[12])\] "
        r"helo=client\.example "
    )
    expected = [
        r'reply="550 5\.1\.1 No such user here" reason=unknown-user '
        r"from=<a@example\.net> to=<nobody@example\.org>",
        r'reply="550 5\.7\.1 Relaying denied for remote\.example" reason=relay-denied '
        r"from=<a@example\.net> to=<x@remote\.example>",
        r'reply="552 5\.3\.4 Message size exceeds fixed maximum message size" reason=too-big '
        r"command=MAIL from=<a@example\.net>",
        # A refused message's line names its queue id, as every line about it.
        r'reply="552 5\.3\.4 Message size exceeds fixed maximum message size" reason=too-big '
        r"id=[0-9a-f]{26} from=<a@example\.net> to=<alice@example\.org>",
        r'reply="550 5\.6\.0 Message refused: bare CR or LF; lines must end with <C\.\.\." '
        r"reason=bare-line-end id=[0-9a-f]{26} from=<a@example\.net> to=<alice@example\.org>",
        r'reply="421 4\.7\.0 Too many errors, closing transmission channel" reason=errors '
        r"command=BAZ",
    ]
    for line, tail in zip(refused, expected, strict=True):
        assert re.fullmatch(prefix + tail + "\n", line), line
    assert [end_of(lines) for lines in logged] == ["quit"] * 5 + ["errors"]

    # fail2ban's own matcher, over the lines as logged, each session's whole log.
    log = tmp_path / "smtpd.log"
    log.write_text("".join(line for lines in logged for line in lines))
    assert fail2ban_matches(log) == ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.1",
                                     "127.0.0.1", "127.0.0.1"]  # fmt: skip


def fail2ban_matches(log: Path) -> list[str]:
    """The addresses fail2ban-regex finds with the shipped filter, one per line matched."""
    program = shutil.which("fail2ban-regex")
    if program is None:
        if os.environ.get("CI") == "true":
            pytest.fail("fail2ban-regex is not installed (Debian's fail2ban)")
        pytest.skip("fail2ban-regex is not installed (Debian's fail2ban)")
    result = subprocess.run(
        [program, "--out", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.split()


def test_a_temporary_refusal_is_not_banned(tmp_path: Path) -> None:
    log = tmp_path / "smtpd.log"
    log.write_text(
        'smtpd(9): 0a0b0c0d refused client=unknown[192.0.2.1] helo=x reply="451 4.7.1 Try '
        'again later" reason=dnsbl stage=connect\n'
        # A HELO cannot put another address where the filter looks.
        "smtpd(9): 0a0b0c0d refused client=mail.example[192.0.2.2] helo=client=x[192.0.2.3] "
        'reply="550 5.1.1 No such user here" reason=unknown-user from=<> to=<x@example.org>\n'
    )
    assert fail2ban_matches(log) == ["192.0.2.2"]


def test_how_a_session_ended_is_logged(server: Daemon) -> None:
    # Silent after EHLO: 421 after command_timeout.
    assert end_of(session_lines(server, b"EHLO client.example\r\n")) == "timeout"
    with server.connect() as sock:
        sock.recv(1000)
        sock.sendall(b"EHLO client.example\r\n")
        sock.recv(1000)
        sock.shutdown(socket.SHUT_WR)  # gone without QUIT
        while sock.recv(1000):
            pass
    assert end_of(lines_until_end(server)) == "lost"


def test_a_failed_handshake_names_the_session_and_client(server: Daemon) -> None:
    with server.connect() as sock:
        sock.recv(1000)
        sock.sendall(b"EHLO client.example\r\n")
        sock.recv(1000)
        sock.sendall(b"STARTTLS\r\n")
        assert sock.recv(1000).startswith(b"220 ")
        sock.sendall(b"\x16\x03\x01\x00\x05not a TLS client hello\r\n")
        while sock.recv(1000):
            pass
    lines = lines_until_end(server)
    [failed] = [line for line in lines if "TLS handshake failed" in line]
    session = re.findall(r": session (\S+) ", lines[-1])[0]
    assert failed.startswith("smtpd(") and f"): {session} TLS handshake failed " in failed
    assert " client=unknown[127.0.0.1] helo=client.example: " in failed
    assert end_of(lines) == "tls-failed"


def test_a_failed_handshake_over_pipes_names_the_session_and_client(
    tmp_path: Path, ca: trustme.CA
) -> None:
    config = write_config(tmp_path, tls=certificate(ca, tmp_path), scripted=True)
    result = smtpsrvr(config, b"EHLO client.example\r\nSTARTTLS\r\n")
    assert b"220 2.0.0 Ready to start TLS" in result.stdout
    log = result.stderr.decode()
    failed = re.search(r"\): (\S+) TLS handshake failed client=(\S+) helo=client\.example: ", log)
    assert failed is not None, log
    assert failed.group(2) == "localhost[127.0.0.1]" or failed.group(2) == "unknown[127.0.0.1]"
    assert f"session {failed.group(1)} " in log and "end=tls-failed" in log


def test_the_reply_the_log_and_the_queue_name_a_message_alike(server: Daemon) -> None:
    script = (
        ENVELOPE
        + b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: id\r\n\r\none id\r\n.\r\nQUIT\r\n"
    )
    with server.connect() as sock:
        sock.recv(1000)
        sock.sendall(script)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    lines = lines_until_end(server)
    reply_id = re.findall(rb"250 2\.0\.0 Submitted & queued \(([^)]+)\)\r\n", answer)[0].decode()
    [queued_line] = [line for line in lines if " queued id=" in line]
    assert re.findall(r" queued id=(\S+) ", queued_line) == [reply_id]
    assert [m["id"] for m in queued(server.config) if m["id"] == reply_id] == [reply_id]
    assert f"\twith ESMTP id {reply_id}\r\n".encode() in stored(server.config, reply_id)
