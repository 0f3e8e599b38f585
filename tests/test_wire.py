"""The daemon over real sockets, with real clients: smtplib, aiosmtplib, swaks, raw bytes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from mmdf_smtp.queue.spool import Spool
from wire import (
    Daemon,
    body_of,
    certificate,
    daemon,
    memory_of_tree,
    queued,
    stored,
    write_config,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("wire")
    config = write_config(directory, tls=certificate(ca, directory))
    with daemon(config) as d:
        yield d


def find(server: Daemon, marker: bytes) -> dict[str, object]:
    """The queued message holding ``marker``, as checkque --json shows it.

    The module's daemon gathers many messages: they are searched in-process,
    and only the one found goes through checkque.
    """
    spool = Spool(server.config.parent / "spool")
    for message in spool.messages():
        with spool.open_message(message.id) as data:
            if marker in data.read():
                [shown] = [m for m in queued(server.config) if m["id"] == message.id]
                return shown
    raise AssertionError(f"{marker!r} not queued")


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """The next ``count`` replies, each as its final line."""
    data = b""
    while True:
        finals = [line for line in data.split(b"\r\n")[:-1] if len(line) > 3 and line[3:4] == b" "]
        if len(finals) >= count:
            return finals
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk


def recv_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        if data.endswith(b"\r\n") and len(last) > 3 and last[3:4] == b" ":
            return data


def test_smtplib_sends_a_message(server: Daemon) -> None:
    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["To"] = "alice@example.org"
    message["Subject"] = "smtplib"
    message.set_content("smtplib body\n.leading dot\n")
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        assert client.has_extn("pipelining") and client.has_extn("chunking")
        assert client.has_extn("starttls")
        assert client.esmtp_features["size"] == "36700160"
        refused = client.send_message(message)
        assert refused == {}
    queued_message = find(server, b"smtplib body")
    assert queued_message["recipients"] == ["alice@example.org"]
    assert queued_message["helo"] == "client.example"
    data = stored(server.config, str(queued_message["id"]))
    assert body_of(data) == message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def test_smtplib_send_message_with_its_own_smtputf8_and_body(server: Daemon) -> None:
    # send_message adds SMTPUTF8 and BODY=8BITMIME to an international
    # message's MAIL command, after those the caller gave.
    message = EmailMessage()
    message["From"] = "sénder@example.net"
    message["To"] = "alice@example.org"
    message["Subject"] = "smtputf8 twice"
    message.set_content("given twice\n")
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.ehlo("client.example")
        refused = client.send_message(message, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    assert find(server, b"given twice")["sender"] == "sénder@example.net"


def test_smtplib_refusals_are_exact(server: Daemon) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail("a@example.net") == (250, b"2.1.0 Sender OK")
        code, text = client.rcpt("nobody@example.org")
        assert (code, text) == (550, b"5.1.1 No such user here")
        assert client.docmd("VRFY", "alice") == (
            252,
            b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        )
        assert client.docmd("EXPN", "staff") == (502, b"5.5.1 EXPN not available")


def test_starttls_with_smtplib(server: Daemon, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.starttls(context=context)[0] == 220
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        client.sendmail("a@example.net", ["bob@example.org"], b"Subject: tls\r\n\r\nover tls\r\n")
    message = find(server, b"over tls")
    assert str(message["tls"]).startswith("TLSv1.3 with cipher")
    assert b"\r\n\twith ESMTPS id " in stored(server.config, str(message["id"]))


def test_starttls_injection_on_a_socket(server: Daemon, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        recv_reply(sock)
        sock.sendall(b"STARTTLS\r\nRSET\r\n")
        assert recv_reply(sock) == b"220 2.0.0 Ready to start TLS\r\n"
        with context.wrap_socket(sock, server_hostname="mx.test") as tls:
            tls.sendall(b"NOOP\r\n")
            assert recv_reply(tls) == b"250 2.0.0 OK\r\n"


def test_aiosmtplib_pipelines(server: Daemon) -> None:
    async def send() -> None:
        client = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, timeout=30, start_tls=False
        )
        await client.connect()
        await client.ehlo(hostname="aio.example")
        assert client.supports_extension("pipelining")
        errors, response = await client.sendmail(
            "aio@example.net",
            ["alice@example.org", "bob@example.org"],
            b"Subject: aio\r\n\r\naiosmtplib body\r\n",
        )
        assert errors == {}
        assert response.startswith("2.0.0 Submitted & queued (")
        await client.quit()

    asyncio.run(send())
    message = find(server, b"aiosmtplib body")
    assert message["recipients"] == ["alice@example.org", "bob@example.org"]
    data = stored(server.config, str(message["id"]))
    assert body_of(data) == b"Subject: aio\r\n\r\naiosmtplib body\r\n"
    assert b"\tfor <" not in data  # two recipients: no "for" clause


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by .ci/run")
@pytest.mark.parametrize("extra", [[], ["--pipeline"], ["-tls"]])
def test_swaks(server: Daemon, extra: list[str], ca: trustme.CA, tmp_path: Path) -> None:
    marker = f"swaks-{'-'.join(extra) or 'plain'}"
    args = [
        "swaks",
        "--server",
        f"{server.host}:{server.port}",
        "--to",
        "postmaster@localhost",
        "--from",
        "swaks@example.net",
        "--helo",
        "swaks.example",
        "--body",
        marker,
        *extra,
    ]
    if "-tls" in extra:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        args += ["--tls-verify", "--tls-ca-path", str(ca_file)]
    result = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    prompt = b"<~ " if "-tls" in extra else b"<- "
    assert prompt + b" 250 2.0.0 Submitted & queued (" in result.stdout
    message = find(server, marker.encode())
    assert message["recipients"] == ["postmaster@localhost"]
    assert (message["tls"] is not None) == ("-tls" in extra)


def test_raw_smuggling_attempt_is_refused(server: Daemon) -> None:
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        assert read_replies(sock, 1) == [b"250 STARTTLS"]
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        assert read_replies(sock, 3)[-1] == b"354 Start mail input; end with <CRLF>.<CRLF>"
        sock.sendall(
            b"Subject: smuggle\r\n\r\nfirst\n.\r\n"
            b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            b"smuggled-body\r\n.\r\n"
        )
        assert recv_reply(sock) == (
            b"550 5.6.0 Message refused: bare CR or LF; lines must end with <CRLF>\r\n"
        )
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock).startswith(b"221")
    with pytest.raises(AssertionError, match="not queued"):
        find(server, b"smuggled-body")


def test_a_client_that_half_closes_after_its_commands_gets_every_reply(
    server: Daemon,
) -> None:
    """The message and QUIT in one write, then shutdown(SHUT_WR): the 250 comes after the EOF."""
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        read_replies(sock, 1)
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        assert len(read_replies(sock, 3)) == 3
        sock.sendall(b"Subject: half-closed\r\n\r\nsent before the EOF\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        finals = [line for line in data.split(b"\r\n") if len(line) > 3 and line[3:4] == b" "]
    assert len(finals) == 2
    assert finals[-2].startswith(b"250 2.0.0 Submitted & queued")
    assert finals[-1].startswith(b"221 2.0.0 ")
    message = find(server, b"sent before the EOF")
    assert body_of(stored(server.config, str(message["id"]))) == (
        b"Subject: half-closed\r\n\r\nsent before the EOF\r\n"
    )


def test_bdat_on_a_socket(server: Daemon) -> None:
    body = b"Subject: bdat\r\n\r\nchunked body\r\n"
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        assert read_replies(sock, 1) == [b"250 STARTTLS"]
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
        assert read_replies(sock, 2) == [
            b"250 2.1.0 Sender OK",
            b"250 2.1.5 Recipient OK",
        ]
        last = b"BDAT %d LAST\r\n" % (len(body) - 10)
        sock.sendall(b"BDAT 10\r\n" + body[:10] + last + body[10:])
        first, second = read_replies(sock, 2)
        assert first == b"250 2.0.0 10 octets received"
        assert second.startswith(b"250 2.0.0 Submitted & queued")
    message = find(server, b"chunked body")
    assert body_of(stored(server.config, str(message["id"]))) == body


def test_a_30_mb_message_streams_to_disk(server: Daemon) -> None:
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (30 * 1024 * 1024 // len(line))
    # The workers serve the sessions: their peaks count, with the supervisor's.
    before = memory_of_tree(server.process.pid, "VmHWM")
    with smtplib.SMTP(server.host, server.port, timeout=60) as client:
        client.sendmail("a@example.net", ["bob@example.org"], body)
    after = memory_of_tree(server.process.pid, "VmHWM")
    message = find(server, b"Subject: big")
    assert message["size"] > len(body)
    assert body_of(stored(server.config, str(message["id"]))) == body
    # The message is not held in memory: the daemon's peak grows far less than 30 MB.
    assert after - before < 16 * 1024 * 1024


def test_kill_9_after_250_keeps_the_message(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with daemon(config) as d, smtplib.SMTP(d.host, d.port, timeout=30) as client:
        client.sendmail("a@example.net", ["alice@example.org"], b"Subject: k\r\n\r\nsurvivor\r\n")
        os.kill(d.process.pid, signal.SIGKILL)
        d.process.wait()
    [message] = queued(config)
    assert body_of(stored(config, str(message["id"]))) == b"Subject: k\r\n\r\nsurvivor\r\n"


def test_maxconnects_holds_new_callers_in_the_backlog(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with daemon(config, "-n", "2") as d:
        first, second, third = d.connect(), d.connect(), d.connect()
        try:
            assert recv_reply(first).startswith(b"220 ")
            assert recv_reply(second).startswith(b"220 ")
            third.settimeout(1.0)
            with pytest.raises(TimeoutError):
                third.recv(100)  # connected in the kernel, not yet served
            first.sendall(b"QUIT\r\n")
            assert recv_reply(first).startswith(b"221 ")
            third.settimeout(30)
            assert recv_reply(third).startswith(b"220 ")
        finally:
            for sock in (first, second, third):
                sock.close()


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with daemon(config) as d:
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(timeout=30) == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_smtp_client(server: Daemon, tmp_path: Path) -> None:
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"Subject: curl\r\n\r\nsent by curl\r\n.dot line\r\n")
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--verbose",
            f"smtp://{server.host}:{server.port}/curl.example",
            "--mail-from",
            "curl@example.net",
            "--mail-rcpt",
            "alice@example.org",
            "--upload-file",
            str(mail),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"< 250 2.0.0 Submitted & queued (" in result.stderr
    message = find(server, b"sent by curl")
    assert message["helo"] == "curl.example"
    assert body_of(stored(server.config, str(message["id"]))) == mail.read_bytes()
