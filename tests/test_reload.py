"""smtpd's signals: SIGHUP and SIGTERM from the first moment it listens, and reloads.

Run as root (as CI runs), smtpd binds, then serves sessions as ``user``
while its supervisor stays root to re-read what only root may read: a
reload picks up a new user, new tables and a certificate whose key is
root's alone (mode 0600, as certbot leaves it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from wire import PYTHON, env, write_config

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
