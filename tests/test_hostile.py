"""Attacks of the field against the daemon, over real sockets.

SMTP smuggling in every end-of-data variant, NUL and 8-bit octets in
commands, over-long lines in every state, recipient and header floods,
slow clients and clients that never read their replies; and faults: a full
disk, a session that raises.  Each test asserts
the exact replies and what the queue holds afterwards: nothing refused is
stored, and what is answered 250 is stored once, byte for byte.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trustme

from dnsserver import Zone, dns_server
from driver import SMUGGLED_ENDS
from mmdf_smtp.daemon import Daemon as Server
from mmdf_smtp.daemon import bind
from mmdf_smtp.protocol import Event, MailFrom, MessageComplete
from mmdf_smtp.queue import MessageWriter, QueueError
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.service import Peer, Service
from mmdf_smtp.session import Session
from mmdf_smtp.shells.blocking import BlockingShell
from test_wire import read_replies, recv_reply
from wire import Daemon, body_of, certificate, daemon, queued, stored, write_config

CLOSING = b"221 2.0.0 mx.test closing connection"
QUEUED = b"250 2.0.0 Submitted & queued ("
BARE_LINE_END = b"550 5.6.0 Message refused: bare CR or LF; lines must end with <CRLF>"
LINE_TOO_LONG = b"500 5.5.2 Line too long"
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("hostile")
    config = write_config(directory, tls=certificate(ca, directory), scripted=True)
    with daemon(config) as d:
        yield d


def holding(server: Daemon, marker: bytes) -> list[str]:
    """Ids of the queued messages that hold ``marker``."""
    spool = Spool(server.config.parent / "spool")
    found = []
    for message in spool.messages():
        with spool.open_message(message.id) as data:
            if marker in data.read():
                found.append(message.id)
    return found


def finals(data: bytes) -> list[bytes]:
    """Each reply's last line."""
    return [line for line in data.split(b"\r\n") if len(line) > 3 and line[3:4] == b" "]


def until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def open_data(server: Daemon) -> socket.socket:
    """A connection with a transaction open: DATA answered 354."""
    sock = server.connect()
    recv_reply(sock)
    sock.sendall(ENVELOPE + b"DATA\r\n")
    assert read_replies(sock, 4)[-1] == b"354 Start mail input; end with <CRLF>.<CRLF>"
    return sock


def worker_rss(server: Daemon) -> int:
    """Resident memory of the processes that serve sessions, in bytes."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for serving in children or [str(pid)]:
        for line in Path(f"/proc/{serving}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# -- SMTP smuggling ----------------------------------------------------------


@pytest.mark.parametrize("variant", SMUGGLED_ENDS, ids=repr)
def test_smuggled_end_of_data_is_refused_and_nothing_stored(server: Daemon, variant: bytes) -> None:
    marker = f"smuggle-{SMUGGLED_ENDS.index(variant)}".encode()
    with open_data(server) as sock:
        sock.sendall(
            b"Subject: " + marker + b"\r\n\r\nfirst" + variant + b"MAIL FROM:<evil@example.net>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\n" + marker + b"-inner\r\n.\r\nQUIT\r\n"
        )
        assert until_closed(sock) == BARE_LINE_END + b"\r\n" + CLOSING + b"\r\n"
    assert holding(server, marker) == []


# No bare line end in these: the "end" is content, and the message is one.
LOOKALIKES = [
    (b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"\r\n. \r\n", b"\r\n \r\n"),
]
# An end for a next hop that strips NULs: refused, unless [limits] allow_nul
# (tests/test_door.py has them stored byte-exact then).
NUL_LOOKALIKES = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


@pytest.mark.parametrize("variant", NUL_LOOKALIKES, ids=repr)
def test_end_of_data_with_a_nul_is_refused_and_nothing_stored(
    server: Daemon, variant: bytes
) -> None:
    marker = f"nul-lookalike-{NUL_LOOKALIKES.index(variant)}".encode()
    with open_data(server) as sock:
        sock.sendall(
            b"Subject: " + marker + b"\r\n\r\nfirst" + variant + b"MAIL FROM:<evil@example.net>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\ninner\r\n.\r\nQUIT\r\n"
        )
        assert finals(until_closed(sock)) == [
            b"550 5.6.0 Message refused: NUL octets are not allowed",
            CLOSING,
        ]
    assert holding(server, marker) == []


@pytest.mark.parametrize(("variant", "content"), LOOKALIKES, ids=repr)
def test_end_of_data_lookalikes_make_one_message_byte_exact(
    server: Daemon, variant: bytes, content: bytes
) -> None:
    marker = f"lookalike-{[v for v, _ in LOOKALIKES].index(variant)}".encode()
    pipelined = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\ninner\r\n"
    with open_data(server) as sock:
        sock.sendall(
            b"Subject: " + marker + b"\r\n\r\nfirst" + variant + pipelined + b".\r\nQUIT\r\n"
        )
        replies = finals(until_closed(sock))
    assert replies[0].startswith(QUEUED) and replies[1:] == [CLOSING]
    [queue_id] = holding(server, marker)
    expected = b"Subject: " + marker + b"\r\n\r\nfirst" + content + pipelined
    assert body_of(stored(server.config, queue_id)) == expected
    [entry] = [m for m in queued(server.config) if m["id"] == queue_id]
    assert entry["recipients"] == ["alice@example.org"]


def test_bdat_chunk_with_a_bare_line_end_is_refused(server: Daemon) -> None:
    chunk = b"Subject: bdat-smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.net>\r\n"
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
        assert finals(until_closed(sock))[-2:] == [BARE_LINE_END, CLOSING]
    assert holding(server, b"bdat-smuggle") == []


def test_bdat_chunk_holding_crlf_dot_crlf_is_content(server: Daemon) -> None:
    chunk = b"Subject: bdat-dot\r\n\r\nfirst\r\n.\r\nMAIL FROM:<evil@example.net>\r\n"
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
        replies = finals(until_closed(sock))
    assert replies[-2].startswith(QUEUED) and replies[-1] == CLOSING
    [queue_id] = holding(server, b"bdat-dot")
    assert body_of(stored(server.config, queue_id)) == chunk


def test_rcpt_between_bdat_chunks_is_refused_not_lost(server: Daemon) -> None:
    first, last = b"Subject: bdat-rcpt\r\n", b"\r\nbody\r\n"
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(
            ENVELOPE + b"BDAT %d\r\n" % len(first) + first + b"RCPT TO:<bob@example.org>\r\n"
            b"BDAT %d LAST\r\n" % len(last) + last + b"QUIT\r\n"
        )
        replies = finals(until_closed(sock))
    assert replies[3:5] == [
        b"250 2.0.0 20 octets received",
        b"503 5.5.1 RCPT cannot follow BDAT in one transaction",
    ]
    assert replies[5].startswith(QUEUED)
    [queue_id] = holding(server, b"bdat-rcpt")
    [entry] = [m for m in queued(server.config) if m["id"] == queue_id]
    assert entry["recipients"] == ["alice@example.org"]


# -- octets in commands ------------------------------------------------------


def test_nul_and_8bit_octets_in_commands(server: Daemon) -> None:
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(
            b"EHLO c\x00\r\n"
            b"\x00\x00\x00\r\n"
            b"EHLO \xff\xfe\r\n"
            b"EHLO c\r\n"
            b"NOOP\x80\r\n"
            b"MAIL FROM:<\xc3\xa4@example.org>\r\n"
            b"MA\xc4\xb1L FROM:<a@example.net>\r\n"  # a dotless i: "MAIL" only to str.upper()
            b"\xef\xbc\xadAIL FROM:<a@example.net>\r\n"  # a fullwidth M
            b"MAIL FROM:<\xc3\xa4@example.org> SMTPUTF8\r\n"
            b"QUIT\r\n"
        )
        assert finals(until_closed(sock)) == [
            b"500 5.5.2 NUL character in command",
            b"500 5.5.2 NUL character in command",
            b"501 5.5.2 Command is not valid UTF-8",
            b"250 STARTTLS",
            b"501 5.5.2 Command is not valid UTF-8",
            b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
            b"500 5.5.1 Command unrecognized",
            b"500 5.5.1 Command unrecognized",
            b"250 2.1.0 Sender OK",
            CLOSING,
        ]


# -- over-long lines ---------------------------------------------------------

LONG = b"X" * 5000 + b"\r\n"


def test_overlong_line_before_the_greeting(server: Daemon) -> None:
    with server.connect() as sock:
        sock.sendall(LONG + b"EHLO c\r\nQUIT\r\n")
        assert finals(until_closed(sock)) == [
            b"220 mx.test Server SMTP ready",
            LINE_TOO_LONG,
            b"250 STARTTLS",
            CLOSING,
        ]


@pytest.mark.parametrize(
    ("before", "line", "after", "expected"),
    [
        pytest.param(b"EHLO c\r\n", LONG, b"NOOP\r\n", [LINE_TOO_LONG, b"250 2.0.0 OK"], id="ehlo"),
        pytest.param(
            b"EHLO c\r\n",
            b"MAIL FROM:<" + b"a" * 600 + b"@example.net>\r\n",
            b"MAIL FROM:<a@example.net>\r\n",
            [LINE_TOO_LONG, b"250 2.1.0 Sender OK"],
            id="mail",
        ),
        pytest.param(
            b"EHLO c\r\nMAIL FROM:<a@example.net>\r\n",
            b"RCPT TO:<" + b"a" * 1100 + b"@example.org>\r\n",  # 512 + 500 (RFC 3461 4)
            b"RCPT TO:<bob@example.org>\r\n",
            [LINE_TOO_LONG, b"250 2.1.5 Recipient OK"],
            id="rcpt",
        ),
        pytest.param(
            b"EHLO c\r\n", b"NOOP " + b"x" * 1_000_000, b"\r\nNOOP\r\n",
            [LINE_TOO_LONG, b"250 2.0.0 OK"],
            id="endless",
        ),
    ],
)  # fmt: skip
def test_overlong_command_lines(
    server: Daemon, before: bytes, line: bytes, after: bytes, expected: list[bytes]
) -> None:
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(before)
        read_replies(sock, before.count(b"\r\n"))
        sock.sendall(line + after + b"QUIT\r\n")
        assert finals(until_closed(sock)) == [*expected, CLOSING]


def test_overlong_line_in_data_refuses_the_message(server: Daemon) -> None:
    with open_data(server) as sock:
        sock.sendall(b"Subject: long-data\r\n\r\n" + LONG + b".\r\nQUIT\r\n")
        assert finals(until_closed(sock)) == [
            b"550 5.6.0 Message refused: a line is longer than 1000 octets with its <CRLF>",
            CLOSING,
        ]
    assert holding(server, b"long-data") == []


def test_overlong_line_in_bdat_refuses_the_message(server: Daemon) -> None:
    chunk = b"Subject: long-bdat\r\n\r\n" + LONG
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
        assert finals(until_closed(sock))[-2:] == [
            b"550 5.6.0 Message refused: a line is longer than 1000 octets with its <CRLF>",
            CLOSING,
        ]
    assert holding(server, b"long-bdat") == []


def test_overlong_line_after_starttls(server: Daemon, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\nSTARTTLS\r\n")
        assert read_replies(sock, 2)[-1] == b"220 2.0.0 Ready to start TLS"
        with context.wrap_socket(sock, server_hostname="mx.test") as tls:
            tls.sendall(LONG + b"EHLO c\r\nQUIT\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert finals(data) == [LINE_TOO_LONG, b"250 CHUNKING", CLOSING]  # no STARTTLS now


# -- floods --------------------------------------------------------------------


def test_recipients_past_the_limit_pipelined(server: Daemon) -> None:
    recipients = [f"r{i}@example.net".encode() for i in range(150)]
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(
            b"EHLO c\r\nMAIL FROM:<a@example.net>\r\n"
            + b"".join(b"RCPT TO:<" + r + b">\r\n" for r in recipients)
            + b"DATA\r\n"
        )
        replies = read_replies(sock, 2 + 150 + 1)
        assert replies[2:] == [b"250 2.1.5 Recipient OK"] * 100 + [
            b"452 4.5.3 Too many recipients"
        ] * 50 + [b"354 Start mail input; end with <CRLF>.<CRLF>"]
        sock.sendall(b"Subject: many-rcpt\r\n\r\nx\r\n.\r\nQUIT\r\n")
        replies = finals(until_closed(sock))
    assert replies[0].startswith(QUEUED) and replies[1:] == [CLOSING]
    [queue_id] = holding(server, b"many-rcpt")
    [entry] = [m for m in queued(server.config) if m["id"] == queue_id]
    assert entry["recipients"] == [r.decode() for r in recipients[:100]]


def test_pipelined_errors_past_the_limit_close_with_421(server: Daemon) -> None:
    with server.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\n" + b"XYZZY\r\n" * 50 + b"NOOP\r\n")
        assert finals(until_closed(sock)) == [
            b"250 STARTTLS",
            *[b"500 5.5.1 Command unrecognized"] * 10,
            b"421 4.7.0 Too many errors, closing transmission channel",
        ]


def test_header_flood_is_stored_with_bounded_memory(server: Daemon) -> None:
    headers = b"".join(b"X-Flood-%06d: v\r\n" % i for i in range(100_000))
    message = b"Subject: header-flood\r\n" + headers + b"\r\nbody\r\n"
    before = worker_rss(server)
    with open_data(server) as sock:
        sock.sendall(message + b".\r\nQUIT\r\n")
        replies = finals(until_closed(sock))
    growth = worker_rss(server) - before
    assert replies[0].startswith(QUEUED) and replies[1:] == [CLOSING]
    [queue_id] = holding(server, b"header-flood")
    assert body_of(stored(server.config, queue_id)) == message
    # 2 MB of headers: none of it is held in memory.
    assert growth < 8 * 1024 * 1024, growth
    print(f"header flood: {len(message)} octets stored, worker RSS grew {growth} octets")


# -- slow and silent clients -------------------------------------------------


def test_slow_client_is_served_and_others_meanwhile(server: Daemon) -> None:
    transaction = ENVELOPE + b"DATA\r\nSubject: slow-client\r\n\r\ntrickled\r\n.\r\nQUIT\r\n"
    halfway, others_done = threading.Event(), threading.Event()
    result: list[bytes] = []

    def trickle() -> None:
        with server.connect() as sock:
            for i, octet in enumerate(transaction):
                if i == len(transaction) // 2:
                    halfway.set()
                    others_done.wait(timeout=60)
                sock.sendall(bytes([octet]))
                time.sleep(0.005)
            result.append(until_closed(sock))

    slow = threading.Thread(target=trickle)
    started = time.monotonic()
    slow.start()
    try:
        assert halfway.wait(timeout=60)
        # The slow client is in the middle of its DATA: others are served now.
        for n in range(3):
            with server.connect() as sock:
                sock.sendall(ENVELOPE + b"DATA\r\nSubject: fast-%d\r\n\r\nx\r\n.\r\nQUIT\r\n" % n)
                assert finals(until_closed(sock))[-2].startswith(QUEUED)
    finally:
        others_done.set()
        slow.join(timeout=60)
    assert time.monotonic() - started < 30
    assert finals(result[0])[-2].startswith(QUEUED)
    assert len(holding(server, b"slow-client")) == 1
    for n in range(3):
        assert len(holding(server, b"fast-%d" % n)) == 1


def test_client_that_never_reads_its_replies(server: Daemon) -> None:
    before = worker_rss(server)
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    silent.connect((server.host, server.port))
    silent.setblocking(False)
    batch = b"NOOP\r\n" * 10_000
    sent = 0
    try:
        assert silent.send(b"EHLO c\r\n") == 8
        # Pipeline NOOPs until the daemon stops taking them (or 64 MB went in).
        while sent < 64 * 1024 * 1024:
            _, writable, _ = select.select([], [silent], [], 2.0)
            if not writable:
                break
            sent += silent.send(batch)
        assert sent < 64 * 1024 * 1024, "the daemon read everything without sending replies"
        # Reading stopped (above); what is held is one batch of input and of
        # replies, plus what processing it left in the allocator.  Measured:
        # 10-35 MB on two uvloop workers, whatever the client sends.
        growth = worker_rss(server) - before
        assert growth < 64 * 1024 * 1024, growth
        # Meanwhile, others are served.
        with server.connect() as sock:
            sock.sendall(ENVELOPE + b"DATA\r\nSubject: beside-silent\r\n\r\nx\r\n.\r\nQUIT\r\n")
            assert finals(until_closed(sock))[-2].startswith(QUEUED)
    finally:
        silent.close()
    print(f"never-reading client: {sent} octets taken, worker RSS grew {growth} octets")


# -- faults ------------------------------------------------------------------


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB filesystem (tmpfs) where the configuration puts the spool."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=True)


def send(d: Daemon, body: bytes) -> list[bytes]:
    with d.connect() as sock:
        sock.sendall(ENVELOPE + b"DATA\r\n")
        assert read_replies(sock, 5)[-1] == b"354 Start mail input; end with <CRLF>.<CRLF>"
        sock.sendall(body + b".\r\nQUIT\r\n")
        return finals(until_closed(sock))


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_is_a_temporary_refusal_until_space_returns(
    tmp_path: Path, small_spool: Path
) -> None:
    config = write_config(tmp_path, scripted=True)
    full = [b"452 4.3.1 Insufficient system storage", CLOSING]
    with daemon(config) as d:
        # Bigger than the filesystem: the write fails midway.
        big = b"Subject: too-big-for-disk\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3000
        assert send(d, big) == full
        assert os.listdir(small_spool / "tmp") == []
        # A full filesystem: the commit fails.
        filler = fill(small_spool)
        assert send(d, b"Subject: disk-full\r\n\r\nsmall\r\n") == full
        assert os.listdir(small_spool / "tmp") == []
        assert queued(config) == []
        # Space returns: the same daemon accepts again.
        filler.unlink()
        replies = send(d, b"Subject: space-again\r\n\r\nsmall\r\n")
        assert replies[0].startswith(QUEUED) and replies[1:] == [CLOSING]
        assert d.process.poll() is None
    [message] = queued(config)
    assert body_of(stored(config, message["id"])) == b"Subject: space-again\r\n\r\nsmall\r\n"
    assert os.listdir(small_spool / "tmp") == []


def test_a_session_that_raises_loses_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception in one session: that client gets 421, the others go on."""
    config = write_config(tmp_path, scripted=True)
    service = Service.load(str(config), ["local", "smtp"], finicky=False)
    listeners = bind(["127.0.0.1:0"])
    port = listeners[0].getsockname()[1]
    handle = Session.handle

    def failing(self: Session, event: Event) -> None:
        if isinstance(event, MailFrom) and event.sender.local == "boom":
            raise RuntimeError("injected failure")
        handle(self, event)

    monkeypatch.setattr(Session, "handle", failing)

    async def client(script: bytes, count: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(script)
        data = await reader.read()  # to the server's close
        writer.close()
        return finals(data)[:count]

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        running = asyncio.create_task(Server(service, listeners, config_path=str(config)).run())
        # A message in flight while another session fails.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ENVELOPE + b"DATA\r\nSubject: in-flight\r\n\r\n")
        while b"354 " not in await reader.readline():
            pass
        failed = await client(b"EHLO c\r\nMAIL FROM:<boom@example.net>\r\nNOOP\r\n", 3)
        writer.write(b"first half done\r\n.\r\nQUIT\r\n")
        in_flight = finals(await reader.read())
        writer.close()
        after = await client(ENVELOPE + b"DATA\r\nSubject: after\r\n\r\nx\r\n.\r\nQUIT\r\n", 7)
        os.kill(os.getpid(), signal.SIGTERM)
        await running
        return failed, in_flight, after

    with caplog.at_level(logging.INFO, logger="mmdf_smtp"):
        failed, in_flight, after = asyncio.run(main())
    assert failed == [
        b"220 mx.test Server SMTP ready",
        b"250 CHUNKING",
        b"421 4.3.0 Local error in processing, closing transmission channel",
    ]
    assert in_flight[-2].startswith(QUEUED) and in_flight[-1] == CLOSING
    assert after[-2].startswith(QUEUED) and after[-1] == CLOSING
    [failure] = [r for r in caplog.records if "session failed" in r.getMessage()]
    assert failure.exc_info is not None and "injected failure" in str(failure.exc_info[1])
    subjects = sorted(body_of(stored(config, m["id"])).split(b"\r\n")[0] for m in queued(config))
    assert subjects == [b"Subject: after", b"Subject: in-flight"]
    assert os.listdir(tmp_path / "spool" / "tmp") == []


def test_a_commit_that_raises_in_the_daemon_says_421_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The committer thread's unexpected error: 421 for that message, the next one queued."""
    config = write_config(tmp_path, scripted=True)
    service = Service.load(str(config), ["local"], finicky=False)
    listeners = bind(["127.0.0.1:0"])
    port = listeners[0].getsockname()[1]
    commit_all = Spool.commit_all
    calls: list[int] = []

    def failing(self: Spool, writers: Sequence[MessageWriter]) -> list[QueueError | None]:
        calls.append(len(writers))
        if len(calls) == 1:  # the first client's message
            raise RuntimeError("injected failure")
        return commit_all(self, writers)

    monkeypatch.setattr(Spool, "commit_all", failing)

    async def client(body: bytes) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ENVELOPE + b"DATA\r\n" + body + b".\r\nQUIT\r\n")
        data = await reader.read()
        writer.close()
        return finals(data)

    async def main() -> tuple[list[bytes], list[bytes]]:
        running = asyncio.create_task(Server(service, listeners, config_path=str(config)).run())
        failed = await client(b"Subject: boom\r\n\r\nx\r\n")
        after = await client(b"Subject: after\r\n\r\nx\r\n")
        os.kill(os.getpid(), signal.SIGTERM)
        await running
        return failed, after

    with caplog.at_level(logging.INFO, logger="mmdf_smtp"):
        failed, after = asyncio.run(main())
    assert failed[-2:] == [
        b"354 Start mail input; end with <CRLF>.<CRLF>",
        b"421 4.3.0 Local error in processing, closing transmission channel",
    ]
    assert after[-2].startswith(QUEUED) and after[-1] == CLOSING
    [failure] = [r for r in caplog.records if "session failed" in r.getMessage()]
    assert failure.exc_info is not None and "injected failure" in str(failure.exc_info[1])
    subjects = [body_of(stored(config, m["id"])).split(b"\r\n")[0] for m in queued(config)]
    assert subjects == [b"Subject: after"]
    assert os.listdir(tmp_path / "spool" / "tmp") == []


def test_smtpsrvr_session_that_raises_says_421_and_not_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The blocking shell: the exception goes to the log, 421 to the client."""
    config = write_config(tmp_path, scripted=True)
    service = Service.load(str(config), ["local"], finicky=False)
    handle = Session.handle

    def failing(self: Session, event: Event) -> None:
        if isinstance(event, MessageComplete):
            raise RuntimeError("injected failure")
        handle(self, event)

    monkeypatch.setattr(Session, "handle", failing)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(ENVELOPE + b"DATA\r\nSubject: fails\r\n\r\nx\r\n.\r\nNOOP\r\n")
        shell = BlockingShell(service.session(Peer(None)), rfd=theirs.fileno(), wfd=theirs.fileno())
        with caplog.at_level(logging.INFO, logger="mmdf_smtp"):
            assert shell.run() is False
        theirs.shutdown(socket.SHUT_WR)
        data = until_closed(ours)
    assert finals(data)[-2:] == [
        b"354 Start mail input; end with <CRLF>.<CRLF>",
        b"421 4.3.0 Local error in processing, closing transmission channel",
    ]
    assert b"injected" not in data
    assert any("session failed" in r.getMessage() for r in caplog.records)
    assert queued(config) == []
    assert os.listdir(tmp_path / "spool" / "tmp") == []


def test_silent_dns_is_a_bounded_temporary_refusal(tmp_path: Path) -> None:
    """The client's look-up gets no answer: 421 within the DNS timeout, others served."""
    zone = Zone(silent={"2.0.0.127.in-addr.arpa"})
    with dns_server(zone) as nameserver:
        extra = f"""
[channels.dns]
table = "nameserver"

[dns]
nameservers = ["{nameserver}"]
timeout = 2
"""
        config = write_config(tmp_path, extra, scripted=True)
        with daemon(config, channels="local,dns") as d:
            started = time.monotonic()
            with d.connect("127.0.0.2") as slow:
                # While that look-up waits, a client the tables know is served.
                with d.connect("127.0.0.1") as known:
                    known.sendall(
                        ENVELOPE + b"DATA\r\nSubject: beside-dns\r\n\r\nx\r\n.\r\nQUIT\r\n"
                    )
                    assert finals(until_closed(known))[-2].startswith(QUEUED)
                slow.sendall(ENVELOPE + b"DATA\r\nSubject: unresolved\r\n\r\nx\r\n.\r\nQUIT\r\n")
                assert finals(until_closed(slow)) == [
                    b"421 4.4.3 mx.test: Cannot resolve your address [127.0.0.2], try again later"
                ]
            assert time.monotonic() - started < 15
    assert ("2.0.0.127.in-addr.arpa", "PTR") in zone.queries
    assert [body_of(stored(config, m["id"])) for m in queued(config)] == [
        b"Subject: beside-dns\r\n\r\nx\r\n"
    ]


def test_clients_with_silent_dns_do_not_hold_up_the_others(tmp_path: Path) -> None:
    """Twenty look-ups waiting on a silent nameserver: a known client is greeted at once."""
    zone = Zone(silent={f"{i}.0.0.127.in-addr.arpa" for i in range(2, 22)})
    with dns_server(zone) as nameserver:
        extra = f'\n[channels.dns]\ntable = "nameserver"\n[dns]\nnameservers = ["{nameserver}"]\n'
        config = write_config(tmp_path, extra + "timeout = 5\n", scripted=True)
        with daemon(config, "-n", "60", channels="local,dns") as d:
            waiting = [d.connect(f"127.0.0.{i}") for i in range(2, 22)]
            try:
                # Every look-up under way (its query at the nameserver) before
                # the known client comes, and none over before it is served.
                deadline = time.monotonic() + 2
                while len(zone.queries) < len(waiting) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert len(zone.queries) >= len(waiting)
                started = time.monotonic()
                with d.connect("127.0.0.1") as known:
                    known.sendall(ENVELOPE + b"DATA\r\nSubject: not-held\r\n\r\nx\r\n.\r\nQUIT\r\n")
                    assert finals(until_closed(known))[-2].startswith(QUEUED)
                assert time.monotonic() - started < 2.5  # well within the 5 s look-ups
            finally:
                for sock in waiting:
                    sock.close()
