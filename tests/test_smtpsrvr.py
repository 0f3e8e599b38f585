"""smtpsrvr and rsmtpsrvr over pipes: exact replies, exact stored octets."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trustme

from mmdf_smtp.queue.spool import Spool
from wire import (
    PYTHON,
    body_of,
    certificate,
    env,
    queued,
    reply_lines,
    smtpsrvr,
    spawn_smtpsrvr,
    stored,
    tcp_pair,
    write_config,
)

TRANSACTION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<sender@example.net>\r\n"
    b"RCPT TO:<alice@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"body\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, scripted=True)


def test_a_message_over_pipes_is_queued_byte_exact(config: Path) -> None:
    result = smtpsrvr(config, TRANSACTION)
    assert result.returncode == 0, result.stderr
    lines = reply_lines(result.stdout)
    assert lines[0] == "220 mx.test Server SMTP ready"
    assert lines[1:4] == ["250 CHUNKING", "250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]
    assert lines[4] == "354 Start mail input; end with <CRLF>.<CRLF>"
    assert lines[5].startswith("250 2.0.0 Submitted & queued (")
    assert lines[6] == "221 2.0.0 mx.test closing connection"
    [message] = queued(config)
    assert lines[5] == f"250 2.0.0 Submitted & queued ({message['id']})"
    assert message["sender"] == "sender@example.net"
    assert message["recipients"] == ["alice@example.org"]
    [queued_message] = Spool(config.parent / "spool").messages()
    assert queued_message.envelope.crlf  # the core refused any bare line end
    assert message["channel"] == "local"
    assert message["remote_addr"] == "127.0.0.1"
    assert message["helo"] == "client.example"
    data = stored(config, message["id"])
    assert body_of(data) == b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n"
    assert message["size"] == len(data)
    received = data.split(b"\r\n\t")
    assert (
        received[0] == b"Received: from client.example (localhost [127.0.0.1])"
        or received[0] == b"Received: from client.example ([127.0.0.1])"
    )
    assert received[1] == b"by mx.test (mmdf-smtp)"
    assert received[2] == f"with ESMTP id {message['id']}".encode()
    assert received[3].startswith(b"for <alice@example.org>; ")


def test_null_sender_and_bare_postmaster(config: Path) -> None:
    data = b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\nbounce\r\n.\r\nQUIT\r\n"
    result = smtpsrvr(config, data, remote="[127.0.0.2]", channels="local,other")
    assert reply_lines(result.stdout)[-2].startswith("250 2.0.0 Submitted")
    [message] = queued(config)
    assert message["sender"] == ""
    assert message["recipients"] == ["postmaster"]
    assert message["channel"] == "other"
    assert b"\r\n\twith SMTP id " in stored(config, message["id"])


def test_unknown_host_takes_the_last_channel_and_cannot_relay(config: Path) -> None:
    data = (
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
        b"RCPT TO:<someone@elsewhere.example>\r\n"
        b"RCPT TO:<bob@example.org>\r\n"
        b"RCPT TO:<nobody@example.org>\r\n"
        b"QUIT\r\n"
    )
    result = smtpsrvr(config, data, remote="[127.0.0.9]", channels="local,other")
    lines = reply_lines(result.stdout)
    assert lines[-4][:9] == "550 5.7.1"
    assert "elsewhere.example" in lines[-4]
    assert lines[-3] == "250 2.1.5 Recipient OK"
    assert lines[-2][:9] == "550 5.1.1"


def test_finicky_refuses_an_unknown_host(config: Path) -> None:
    data = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n"
    result = smtpsrvr(config, data, remote="[127.0.0.9]", channels="local", program="rsmtpsrvr")
    lines = reply_lines(result.stdout)
    assert lines[0] == "554 5.7.1 mx.test: Your name, '[127.0.0.9]', is unknown to us."
    assert lines[1:] == [
        "503 5.5.1 Service refused; send QUIT",
        "503 5.5.1 Service refused; send QUIT",
        "221 2.0.0 mx.test closing connection",
    ]
    assert queued(config) == []


def test_finicky_knows_a_listed_host(config: Path) -> None:
    result = smtpsrvr(
        config, b"QUIT\r\n", remote="[127.0.0.2]", channels="local,other", program="rsmtpsrvr"
    )
    assert reply_lines(result.stdout)[0] == "220 mx.test Server SMTP ready"


def test_unknown_channel_is_a_usage_error(config: Path) -> None:
    result = smtpsrvr(config, b"", channels="local,nosuch")
    assert result.returncode == 64
    assert b"nosuch" in result.stderr
    assert result.stdout == b""


def test_bad_configuration_exits_78_naming_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('hostname = "x"\n\n[limits]\nrecipients = "many"\n')
    result = smtpsrvr(config, b"")
    assert result.returncode == 78
    assert f"{config}:4: limits.recipients: must be a whole number".encode() in result.stderr


def test_bad_arguments_exit_64(config: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.smtpsrvr", "-c", str(config), "onlyone"],
        capture_output=True,
        env=env(),
        check=False,
    )
    assert result.returncode == 64
    assert b"usage:" in result.stderr


def test_client_vanishing_mid_data_queues_nothing(config: Path) -> None:
    data = TRANSACTION.split(b"body")[0]
    result = smtpsrvr(config, data)
    assert result.returncode == 0
    assert reply_lines(result.stdout)[-1].startswith("354")
    assert queued(config) == []
    assert not any((config.parent / "spool").rglob("*.msg"))


def test_command_timeout_says_421(tmp_path: Path) -> None:
    config = write_config(tmp_path, "\n[limits]\ncommand_timeout = 1\n", scripted=True)
    process = spawn_smtpsrvr(config)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"EHLO x\r\nNOOP")  # never finished, stdin kept open
    process.stdin.flush()
    timer = threading.Timer(30, process.kill)
    timer.start()
    out = process.stdout.read()  # until the server closes its side
    timer.cancel()
    process.stdin.close()
    process.wait()
    assert reply_lines(out)[-1] == (
        "421 4.4.2 Timeout waiting for input, closing transmission channel"
    )
    assert process.returncode == 0


def test_debug_trace_shows_commands_and_replies(config: Path) -> None:
    result = smtpsrvr(config, b"NOOP\r\nQUIT\r\n", options=("-d",))
    lines = result.stderr.decode().splitlines()
    prefix, session = lines[0].split(" ")[:2]
    assert re.fullmatch(r"smtpsrvr\(\d+\):", prefix) and re.fullmatch("[0-9a-f]{8}", session)
    assert lines[:5] == [
        f"{prefix} {session} >>> 220 mx.test Server SMTP ready",
        f"{prefix} {session} <<< NOOP",
        f"{prefix} {session} <<< QUIT",
        f"{prefix} {session} >>> 250 2.0.0 OK",
        f"{prefix} {session} >>> 221 2.0.0 mx.test closing connection",
    ]
    assert re.fullmatch(
        rf"{re.escape(prefix)} session {session} client=unknown\[127\.0\.0\.1\] helo= "
        r"channel=local tls=no messages=0 end=quit duration=\d+\.\d{3}s",
        lines[5],
    )


class PipeTLSClient:
    """A TLS client over smtpsrvr's pipes, through memory BIOs."""

    def __init__(self, process: subprocess.Popen[bytes], context: ssl.SSLContext) -> None:
        self.process = process
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="mx.test")

    def _pump_out(self) -> None:
        assert self.process.stdin is not None
        data = self.outgoing.read()
        if data:
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def _read_raw(self) -> None:
        assert self.process.stdout is not None
        data = self.process.stdout.read1(65536)
        if not data:
            self.incoming.write_eof()
        self.incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._pump_out()
                return
            except ssl.SSLWantReadError:
                self._pump_out()
                self._read_raw()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._pump_out()

    def read_reply(self) -> str:
        buf = b""
        while True:
            try:
                buf += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._read_raw()
                continue
            lines = buf.decode().split("\r\n")
            if any(len(line) > 3 and line[3] == " " for line in lines):
                return buf.decode()


def test_starttls_over_pipes_and_injection_is_dropped(tmp_path: Path) -> None:
    ca = trustme.CA()
    config = write_config(tmp_path, tls=certificate(ca, tmp_path), scripted=True)
    process = spawn_smtpsrvr(config)
    assert process.stdin is not None and process.stdout is not None
    timer = threading.Timer(60, process.kill)
    timer.start()
    try:
        process.stdin.write(b"EHLO c\r\n")
        process.stdin.flush()
        seen = b""
        while b"250 " not in seen:
            seen += process.stdout.read1(4096)
        assert b"250-STARTTLS" in seen or b"250 STARTTLS" in seen
        # The injected RSET arrives in plaintext with STARTTLS.
        process.stdin.write(b"STARTTLS\r\nRSET\r\n")
        process.stdin.flush()
        seen = b""
        while not seen.endswith(b"\r\n"):
            seen += process.stdout.read1(4096)
        assert seen == b"220 2.0.0 Ready to start TLS\r\n"
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        client = PipeTLSClient(process, client_context)
        client.handshake()
        client.send(b"NOOP\r\n")
        # Had RSET survived, its "250 2.0.0 Reset state" would come first.
        assert client.read_reply() == "250 2.0.0 OK\r\n"
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        reply = client.read_reply()
        while "354" not in reply:
            reply += client.read_reply()
        assert "STARTTLS" not in reply
        client.send(b"secret\r\n.\r\n")
        assert client.read_reply().startswith("250 2.0.0 Submitted & queued")
        client.send(b"QUIT\r\n")
        assert client.read_reply().startswith("221")
    finally:
        timer.cancel()
        process.kill()
        process.communicate()
    [message] = queued(config)
    assert message["tls"].startswith("TLSv1.3 with cipher ")
    data = stored(config, message["id"])
    assert b"\r\n\twith ESMTPS id " in data
    assert body_of(data) == b"secret\r\n"


LIMITS = """
[limits]
message_size = 1000
recipients = 2
errors = 3
data_timeout = 1
"""


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (
            b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=1001\r\n",
            ["552 5.3.4 Message size exceeds fixed maximum message size"],
        ),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
            + b"z" * 998
            + b"\r\n"
            + b"z" * 100
            + b"\r\n.\r\n",
            [
                "250 2.1.0 Sender OK",
                "250 2.1.5 Recipient OK",
                "354 Start mail input; end with <CRLF>.<CRLF>",
                "552 5.3.4 Message size exceeds fixed maximum message size",
            ],
        ),
        (
            b"EHLO c\r\nMAIL FROM:<>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 3,
            [
                "250 2.1.0 Sender OK",
                "250 2.1.5 Recipient OK",
                "250 2.1.5 Recipient OK",
                "452 4.5.3 Too many recipients",
            ],
        ),
        (
            b"EHLO c\r\nFOO\r\nBAR\r\nBAZ\r\nNOOP\r\n",
            [
                "500 5.5.1 Command unrecognized",
                "500 5.5.1 Command unrecognized",
                "500 5.5.1 Command unrecognized",
                "421 4.7.0 Too many errors, closing transmission channel",
            ],
        ),
        (
            b"EHLO c\r\nNOOP " + b"x" * 600 + b"\r\nNOOP\r\n",
            ["500 5.5.2 Line too long", "250 2.0.0 OK"],
        ),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
            b"partial",  # and then nothing: the data timeout
            [
                "250 2.1.0 Sender OK",
                "250 2.1.5 Recipient OK",
                "354 Start mail input; end with <CRLF>.<CRLF>",
                "421 4.4.2 Timeout waiting for input, closing transmission channel",
            ],
        ),
    ],
)
def test_limits_over_pipes(tmp_path: Path, client: bytes, expected: list[str]) -> None:
    config = write_config(tmp_path, LIMITS, scripted=True)
    process = spawn_smtpsrvr(config)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(client)
    process.stdin.flush()
    timer = threading.Timer(30, process.kill)
    timer.start()
    out = b""
    while len(reply_lines(out)) < 2 + len(expected):
        chunk = process.stdout.read1(65536)
        if not chunk:
            break
        out += chunk
    timer.cancel()
    process.stdin.close()
    process.stdout.close()
    process.wait()
    assert reply_lines(out)[2:] == expected
    assert queued(config) == []


def test_too_many_received_headers_over_pipes(config: Path) -> None:
    hops = b"Received: from a by b; Tue, 24 Nov 2026 03:30:00 +0000\r\n" * 101
    data = TRANSACTION.replace(b"Subject: test\r\n", hops)
    lines = reply_lines(smtpsrvr(config, data).stdout)
    assert lines[-2] == "554 5.4.6 Too many Received headers: mail loop suspected"
    assert queued(config) == []


def test_smtputf8_message(config: Path) -> None:
    data = (
        "EHLO c\r\nMAIL FROM:<jöran@exämple.net> SMTPUTF8\r\nRCPT TO:<alice@example.org>\r\n"
        "DATA\r\nSubject: grüße\r\n\r\nhej\r\n.\r\nQUIT\r\n"
    ).encode()
    lines = reply_lines(smtpsrvr(config, data).stdout)
    assert lines[-2].startswith("250 2.0.0 Submitted & queued")
    [message] = queued(config)
    assert message["sender"] == "jöran@exämple.net"
    assert message["smtputf8"] is True
    stored_message = stored(config, message["id"])
    assert b"\r\n\twith UTF8SMTP id " in stored_message
    assert body_of(stored_message) == "Subject: grüße\r\n\r\nhej\r\n".encode()


def test_tcpserver_environment_gives_the_peer(config: Path) -> None:
    code = (
        "import os, sys; os.environ['TCPREMOTEIP'] = '127.0.0.2'; "
        "from mmdf_smtp.cli.smtpsrvr import main; sys.argv[0] = 'rsmtpsrvr'; "
        "raise SystemExit(main())"
    )
    result = subprocess.run(
        [PYTHON, "-c", code, "-c", str(config), "-", "-", "local,other"],
        input=b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        capture_output=True,
        env=env(),
        check=False,
    )
    assert reply_lines(result.stdout)[-2].startswith("250 2.0.0 Submitted")
    [message] = queued(config)
    assert (message["channel"], message["remote_addr"]) == ("other", "127.0.0.2")


@pytest.mark.parametrize(
    ("source", "greeting"),
    [
        ("127.0.0.2", "220 mx.test Server SMTP ready"),
        ("127.0.0.3", "554 5.7.1 mx.test: Your name, '[127.0.0.3]', is unknown to us."),
    ],
)
def test_smtpsrvr_reads_the_peer_from_a_socket(config: Path, source: str, greeting: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client, conn = tcp_pair(listener, source)
    code = (
        "import sys; from mmdf_smtp.cli.smtpsrvr import main; sys.argv[0] = 'rsmtpsrvr'; "
        "raise SystemExit(main())"
    )
    with client, conn:
        # remotehost names a client we do not know: the socket's address wins.
        process = subprocess.Popen(
            [PYTHON, "-c", code, "-c", str(config), "[127.0.0.1]", "-", "other"],
            stdin=conn,
            stdout=conn,
            env=env(),
        )
        conn.close()
        client.settimeout(30)
        data = b""
        while not data.endswith(b"\r\n"):
            data += client.recv(4096)
        client.sendall(b"QUIT\r\n")
        assert process.wait(timeout=30) == 0
    assert data.decode() == greeting + "\r\n"


def test_logging_to_syslog(tmp_path: Path) -> None:
    address = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(address))
        syslog.settimeout(30)
        config = write_config(tmp_path, scripted=True)
        config.write_text(f'log = "syslog:{address}"\n' + config.read_text())
        result = smtpsrvr(config, TRANSACTION)
        assert result.stderr == b""
        queued_line = syslog.recv(4096).decode()
        session_line = syslog.recv(4096).decode()
    [message] = queued(config)
    # <22>: facility mail (2) * 8 + severity info (6), as syslog(3) sends it.
    assert re.fullmatch(
        rf"<22>smtpsrvr\[\d+\]: [0-9a-f]{{8}} queued id={message['id']} client=unknown"
        r"\[127\.0\.0\.1\] helo=client\.example from=<sender@example\.net> "
        # size=: the stored message's, trace header included, as checkque gives it.
        rf"to=<alice@example\.org> size={message['size']} channel=local\x00",
        queued_line,
    )
    assert re.fullmatch(r"<22>smtpsrvr\[\d+\]: session .* end=quit duration=\S+\x00", session_line)


def test_bad_log_target_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    config.write_text('log = "file"\n' + config.read_text())
    result = smtpsrvr(config, b"")
    assert result.returncode == 78
    assert b'log: must be "stderr", "syslog" or "syslog:/path/to/socket"' in result.stderr
