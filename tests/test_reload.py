"""smtpd's signals: SIGHUP and SIGTERM from the first moment it listens, and reloads.

Run as root (as CI runs), smtpd binds, then serves sessions as ``user``
while its supervisor stays root to re-read what only root may read: a
reload picks up a new user, new tables and a certificate whose key is
root's alone (mode 0600, as certbot leaves it).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from wire import PYTHON, Daemon, certificate, daemon, env, process_tree, write_config

# Each round starts smtpd afresh (a second or so).  Before signals were
# blocked ahead of binding, the first round already failed, every time.
RACE_ROUNDS = {signal.SIGHUP: 10, signal.SIGTERM: 5}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_smtpd(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "mmdf_smtp.cli.smtpd", "-c", str(config), "smtpsrvr", "local,smtp"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
    )


def connect_as_soon_as_listening(process: subprocess.Popen[bytes], port: int) -> socket.socket:
    """Connect the moment the port listens: a tight loop, no pause."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"smtpd ended before listening: {process.returncode}"
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionRefusedError:
            continue
    raise AssertionError("smtpd did not listen within 30 s")


def greeting(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1000)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_the_moment_smtpd_listens_does_not_kill_it(
    tmp_path: Path, signum: signal.Signals
) -> None:
    port = free_port()
    config = write_config(tmp_path)
    text = config.read_text().replace('listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{port}"]')
    config.write_text(text)
    for _ in range(RACE_ROUNDS[signum]):
        process = start_smtpd(config)
        try:
            with connect_as_soon_as_listening(process, port) as first:
                process.send_signal(signum)
                if signum == signal.SIGHUP:
                    # Alive, and serving: the caller that was waiting, and a new one.
                    assert greeting(first).startswith(b"220 ")
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as second:
                        assert greeting(second).startswith(b"220 ")
                    assert process.poll() is None
                    process.send_signal(signal.SIGTERM)
            # A SIGTERM is a clean stop, not death by the signal.
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def root_only_certificate(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    """A certificate whose key is root's alone (0600 root:root, as certbot makes it)."""
    directory.mkdir()
    cert, key = certificate(ca, directory)
    os.chown(key, 0, 0)
    key.chmod(0o600)
    return cert, key


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def leaf_fingerprint(cert: Path) -> str:
    """The fingerprint of the first certificate in ``cert`` (after its key)."""
    text = cert.read_text()
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    return fingerprint(ssl.PEM_cert_to_DER_cert(text[begin:end]))


def serving_process(d: Daemon, client: socket.socket) -> int:
    """The pid of the process holding the server's end of ``client``'s connection."""
    server_port, client_port = client.getpeername()[1], client.getsockname()[1]
    wanted = f"0100007F:{server_port:04X} 0100007F:{client_port:04X}"
    inodes = [
        line.split()[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if " ".join(line.split()[1:3]) == wanted
    ]
    assert len(inodes) == 1, inodes
    link = f"socket:[{inodes[0]}]"
    for pid in process_tree(d.process.pid):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == link:
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError("no process of smtpd holds the session")


def ids_of(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uids of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("Uid:")]
    return [int(field) for field in line.split()[1:]]


def tls_session(d: Daemon, ca: trustme.CA, recipient: str) -> tuple[str, int, list[int]]:
    """STARTTLS, then RCPT: the certificate's fingerprint, the RCPT code, the session's uids."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(d.host, d.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.starttls(context=context)[0] == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        client.ehlo("client.example")
        client.mail("a@example.net")
        code, _ = client.rcpt(recipient)
        uids = ids_of(serving_process(d, client.sock))
    return fingerprint(der), code, uids


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a key only root may read")
def test_sighup_reloads_user_tables_and_a_root_only_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    first_cert, first_key = root_only_certificate(ca, tmp_path / "first")
    config = write_config(tmp_path, tls=(first_cert, first_key))
    nobody, daemon_user = pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("daemon").pw_uid
    with daemon(config) as d:
        before, code, uids = tls_session(d, ca, "carol@example.org")
        assert before == leaf_fingerprint(first_cert)
        assert code == 550  # carol is nobody here yet
        assert uids == [nobody] * 4

        second_cert, second_key = root_only_certificate(ca, tmp_path / "second")
        text = config.read_text()
        text = text.replace('user = "nobody"', 'user = "daemon"')
        text = text.replace('users = ["alice", "bob"]', 'users = ["alice", "bob", "carol"]')
        text = text.replace(str(first_cert), str(second_cert)).replace(
            str(first_key), str(second_key)
        )
        config.write_text(text)
        d.process.send_signal(signal.SIGHUP)
        d.log_lines("configuration reloaded")
        d.log_lines(" started, pid ", d.workers)

        after, code, uids = tls_session(d, ca, "carol@example.org")
        assert after == leaf_fingerprint(second_cert)
        assert after != before
        assert code == 250
        assert uids == [daemon_user] * 4
        # The spool went to the new user with the reload.
        assert (tmp_path / "spool").stat().st_uid == daemon_user
