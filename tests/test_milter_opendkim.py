"""The milter client against a real milter: Debian's OpenDKIM, signing, on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmdf_smtp.milter import codec
from mmdf_smtp.milter.chain import apply_header_changes
from mmdf_smtp.milter.client import Milter, close_idle_connections, idle_connections
from mmdf_smtp.milter.config import MilterConfig
from mmdf_smtp.milter.protocol import Action

pytestmark = pytest.mark.skipif(
    shutil.which("opendkim") is None or shutil.which("opendkim-genkey") is None,
    reason="opendkim and opendkim-tools are not installed (.ci/run installs them)",
)

HEADERS = [
    ("From", " Alice <alice@example.org>"),
    ("To", " bob@example.net"),
    ("Subject", " signed by a milter"),
    ("Date", " Mon, 1 Jan 2024 00:00:00 +0000"),
    ("Message-ID", " <1@example.org>"),
]
# More than one chunk, so that the body hash proves the chunks arrived whole
# and in order.
BODY = b"".join(b"line %06d of the body\r\n" % n for n in range(5000))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def opendkim(tmp_path: Path) -> Iterator[str]:
    subprocess.run(
        ["opendkim-genkey", "-b", "1024", "-d", "example.org", "-s", "test", "-D", str(tmp_path)],
        check=True,
    )
    port = free_port()
    conf = tmp_path / "opendkim.conf"
    conf.write_text(
        f"Mode s\n"
        f"Domain example.org\n"
        f"Selector test\n"
        f"KeyFile {tmp_path / 'test.private'}\n"
        f"Socket inet:{port}@127.0.0.1\n"
        f"Canonicalization simple/simple\n"
        f"Syslog no\n"
        # The key is under /tmp, which anyone may write to.
        f"RequireSafeKeys false\n"
        f"UMask 022\n"
        f"PidFile {tmp_path / 'opendkim.pid'}\n"
    )
    process = subprocess.Popen(
        ["opendkim", "-f", "-x", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None:
                    output = process.stdout.read() if process.stdout else b""
                    pytest.fail(f"opendkim exited: {output!r}")
                if time.monotonic() > deadline:
                    pytest.fail("opendkim did not listen within 20 s")
                time.sleep(0.05)  # polling for a process's listener; no event to wait on
        yield f"inet:{port}@127.0.0.1"
    finally:
        # SIGTERM makes OpenDKIM linger for seconds; nothing of its state matters.
        process.kill()
        process.wait(timeout=10)


def simple_body_hash(body: bytes) -> str:
    # RFC 6376 3.4.3: the simple body canonicalization drops trailing empty lines.
    while body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def test_opendkim_signs_through_the_client(opendkim: str) -> None:
    async def main() -> None:
        milter = Milter(MilterConfig.from_table({"socket": opendkim, "command_timeout": 10}))
        macros = {"j": "mx.example.org", "i": "4C3F2A", "{daemon_name}": "smtpd"}
        # 127.0.0.1 is in OpenDKIM's default InternalHosts: its mail is signed.
        steps = [
            await milter.connect(
                hostname="localhost", address="127.0.0.1", port=4000, macros=macros
            ),
            await milter.helo("localhost", macros),
            await milter.mail("<alice@example.org>", (), macros),
            await milter.rcpt("<bob@example.net>", (), macros),
            await milter.data(macros),
        ]
        steps += [await milter.header(name, value, macros) for name, value in HEADERS]
        steps.append(await milter.end_of_headers(macros))
        for start in range(0, len(BODY), 8192):
            steps.append(await milter.body(BODY[start : start + 8192], macros))
        final = await milter.end_of_message(macros)
        await milter.quit()
        assert all(step.action is Action.CONTINUE for step in steps)
        assert not milter.failed
        assert final.action in (Action.CONTINUE, Action.ACCEPT)
        [signature] = final.modifications
        assert isinstance(signature, codec.InsertHeader | codec.AddHeader)
        assert signature.name == "DKIM-Signature"
        headers = apply_header_changes(HEADERS, final.modifications)
        assert headers[0][0] == "DKIM-Signature" or headers[-1][0] == "DKIM-Signature"
        value = signature.value.replace("\r\n", "").replace("\t", "").replace(" ", "")
        tags = dict(t.split("=", 1) for t in value.split(";") if t)
        assert tags["d"] == "example.org"
        assert tags["s"] == "test"
        assert tags["c"] == "simple/simple"
        assert tags["bh"] == simple_body_hash(BODY)
        assert "from" in tags["h"].lower().split(":")

    asyncio.run(main())


def test_a_kept_connection_serves_the_next_session_after_opendkim_accepted(
    opendkim: str,
) -> None:
    """OpenDKIM answers ACCEPT at end of message; UNKNOWN, QUIT_NC keep its connection.

    Each session on the one connection gets its own CONNECT: a client in
    OpenDKIM's InternalHosts (127.0.0.1, its default) is signed, one outside
    it (192.0.2.9) is not, whatever came before on the connection.  (OpenDKIM
    answers that one ACCEPT before the end of the pipelined content, so the
    connection is then closed and the last session opens a new one.)
    """

    async def one_session(address: str) -> tuple[list[codec.Modification], object]:
        milter = Milter(
            MilterConfig.from_table({"socket": opendkim, "command_timeout": 10, "reuse": True})
        )
        macros = {"j": "mx.example.org", "i": "4C3F2A", "{client_addr}": address}
        verdicts = [
            await milter.connect(
                hostname="client.example", address=address, port=4000, macros=macros
            ),
            await milter.helo("client.example", macros),
            await milter.mail("<alice@example.org>", (), macros),
            await milter.rcpt("<bob@example.net>", (), macros),
        ]
        connection = milter.connection_name
        final = await milter.message(HEADERS, [b"a short body\r\n"], macros)
        await milter.quit()
        assert all(v.action is Action.CONTINUE for v in verdicts)
        assert final.action in (Action.CONTINUE, Action.ACCEPT)
        assert not milter.failed
        return list(final.modifications), connection

    async def main() -> None:
        try:
            outcomes = [
                await one_session(address)
                for address in ("127.0.0.1", "127.0.0.1", "192.0.2.9", "127.0.0.1")
            ]
            assert idle_connections(opendkim) == 1
        finally:
            close_idle_connections()
        signed = [
            any(getattr(m, "name", "") == "DKIM-Signature" for m in modifications)
            for modifications, _ in outcomes
        ]
        assert signed == [True, True, False, True]
        # One connection for the first three: QUIT_NC was taken each time.
        connections = [connection for _, connection in outcomes]
        assert connections[0] is not None
        assert connections[:3] == [connections[0]] * 3

    asyncio.run(main())
