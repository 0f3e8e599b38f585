"""Helpers for tests over the wire: configurations, the daemon, smtpsrvr on pipes."""

from __future__ import annotations

import json
import os
import pwd
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import trustme

PYTHON = sys.executable
SRC = Path(__file__).resolve().parent.parent / "src"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("MMDF_CONFIG", None)
    return e


SESSION_USER = "nobody"


def process_tree(pid: int) -> list[int]:
    """A process and its children (smtpd's supervisor and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def memory_of_tree(pid: int, field: str) -> int:
    """The sum of a /proc status field (``VmRSS``, ``VmHWM``) over a process tree, in bytes."""
    total = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1]) * 1024
    return total


def session_uid() -> int:
    """The uid sessions run as: SESSION_USER's when the tests run as root."""
    return pwd.getpwnam(SESSION_USER).pw_uid if os.geteuid() == 0 else os.geteuid()


def reachable_by_anyone(directory: Path) -> None:
    """Let ``SESSION_USER`` reach ``directory``: pytest makes its folders 0700.

    Run as root, the servers under test serve sessions as SESSION_USER, who
    must reach the spool, the configuration (SIGHUP) and programs put here.
    """
    if os.geteuid() != 0:
        return
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if mode & 0o011 != 0o011:
            path.chmod(mode | 0o011)


def write_config(
    directory: Path,
    extra: str = "",
    *,
    tls: tuple[Path, Path] | None = None,
    scripted: bool = False,
) -> Path:
    """A configuration whose spool lies in ``directory``.

    ``scripted``: for tests that send a session as a script, commands and
    all in one write, as no client may wait for replies that way; the
    pipelining rule is switched off for them (its own tests keep it on, and
    so do the tests of real clients).
    """
    reachable_by_anyone(directory)
    text = f"""
hostname = "mx.test"
spool = "{directory / "spool"}"
local_domains = ["example.org", "localhost"]
user = "{SESSION_USER}"

[smtpd]
listen = ["127.0.0.1:0"]
maxconnects = 8
{"forbid_unauth_pipelining = false" if scripted else ""}

[channels.local]
hosts = ["127.0.0.1/32", "::1"]
relay = true

[channels.other]
hosts = ["127.0.0.2"]

[channels.smtp]
hosts = []

[local]
users = ["alice", "bob"]
"""
    if tls is not None:
        text += f'\n[tls]\ncertificate = "{tls[0]}"\nkey = "{tls[1]}"\n'
    path = directory / "mmdf.toml"
    path.write_text(text + extra)
    return path


def checkque(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.checkque", "-c", str(config), *args],
        capture_output=True,
        env=env(),
        timeout=60,
        check=False,
    )


def queued(config: Path, state: str = "queued") -> list[dict[str, Any]]:
    """checkque --json's lines in ``state``: the queued messages, or those set aside ("corrupt")."""
    result = checkque(config, "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line]
    return [line for line in lines if line["state"] == state]


def stored(config: Path, queue_id: str) -> bytes:
    result = checkque(config, "--cat", queue_id)
    assert result.returncode == 0, result.stderr
    return result.stdout


def body_of(message: bytes) -> bytes:
    """The stored message without the Received header we prepend."""
    assert message.startswith(b"Received: from "), message[:80]
    lines = message.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


class Daemon:
    """A running smtpd.  Its log is read all the time, by a thread, into
    :attr:`lines`: a daemon that logs more than a pipe holds must not stall
    on a test that is not reading."""

    def __init__(self, process: subprocess.Popen[bytes], config: Path) -> None:
        assert process.stderr is not None
        self.process = process
        self.config = config
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_log, args=(process.stderr,), daemon=True)
        self._reader.start()
        self.listening = ""  # every address, as logged: "127.0.0.1:25, [::1]:25"
        self.host, self.port, self.workers = self._wait_until_listening()

    def _read_log(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.put(line.decode(errors="replace"))
        self.lines.put(None)

    def _wait_until_listening(self) -> tuple[str, int, int]:
        seen = []
        deadline = time.monotonic() + 30
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if match := _LISTENING.search(line):
                self.listening = line.split("listening on ", 1)[1].split(", maxconnects")[0]
                return match.group(1).strip("[]"), int(match.group(2)), int(match.group(3))
        raise AssertionError("smtpd did not start:\n" + "".join(seen))

    def log_lines(self, text: str, count: int = 1, timeout: float = 60) -> list[str]:
        """Wait until ``count`` more lines of the log hold ``text``."""
        found: list[str] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"smtpd ended before logging {text!r}"
            if text in line:
                found.append(line)
        return found

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        address = (self.host, self.port)
        return socket.create_connection(address, timeout=30, source_address=(source, 0))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=30)
        # Closing the stream under a reader still blocked on it would wait
        # for that read for ever: say what holds it instead.
        assert not self._reader.is_alive(), (
            "smtpd's stderr is still open after it ended: a process it started outlives it"
        )
        assert self.process.stderr is not None
        self.process.stderr.close()


# The first address of the line ("listening on A:P, [B]:P, maxconnects ..."), and the workers.
_LISTENING = re.compile(r"listening on (\S+):(\d+)(?:, \S+)*, maxconnects \d+, (\d+) workers")


@contextmanager
def daemon(
    config: Path, *args: str, program: str = "smtpsrvr", channels: str = "local,smtp"
) -> Iterator[Daemon]:
    """smtpd on an ephemeral loopback port; stopped (SIGTERM) afterwards."""
    process = subprocess.Popen(
        [PYTHON, "-m", "mmdf_smtp.cli.smtpd", "-c", str(config), *args, program, channels],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env(),
    )
    try:
        started = Daemon(process, config)
    except BaseException:
        process.kill()
        process.wait()
        raise
    try:
        yield started
    finally:
        started.stop()


def smtpsrvr(
    config: Path,
    data: bytes,
    *,
    remote: str = "[127.0.0.1]",
    channels: str = "local,smtp",
    program: str = "smtpsrvr",
    options: tuple[str, ...] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    """Run smtpsrvr (or rsmtpsrvr) over pipes with ``data`` as the whole client side."""
    code = (
        "import sys; from mmdf_smtp.cli.smtpsrvr import main; "
        f"sys.argv[0] = {program!r}; raise SystemExit(main())"
    )
    return subprocess.run(
        [PYTHON, "-c", code, *options, "-c", str(config), remote, "mx.test", channels],
        input=data,
        capture_output=True,
        env=env(),
        timeout=timeout,
        check=False,
    )


def spawn_smtpsrvr(config: Path, remote: str = "[127.0.0.1]") -> subprocess.Popen[bytes]:
    """smtpsrvr on pipes, for a test that talks to it turn by turn."""
    return subprocess.Popen(
        [PYTHON, "-m", "mmdf_smtp.cli.smtpsrvr", "-c", str(config), remote, "mx.test", "local"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env(),
    )


def tcp_pair(
    listener: socket.socket, source: str | None = None
) -> tuple[socket.socket, socket.socket]:
    """A client connected to ``listener`` and the server's end of that connection.

    The server's end is the accepted connection whose peer is this client,
    found within a bound time.  On a heavily loaded machine the client's
    connect has returned while the listener, twice in CI runs, had nothing to
    accept for minutes; a client whose connection does not arrive is given
    up and another made, and a late arrival of an earlier one is closed.
    """
    listener.settimeout(10)
    for _ in range(3):
        client = socket.create_connection(
            listener.getsockname(),
            timeout=30,
            source_address=None if source is None else (source, 0),
        )
        try:
            while True:
                accepted, peer = listener.accept()
                if peer == client.getsockname():
                    accepted.settimeout(None)
                    return client, accepted
                accepted.close()
        except TimeoutError:
            client.close()
    raise AssertionError(f"no connection to {listener.getsockname()} arrived in 30 s")


def certificate(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    """A certificate for mx.test and 127.0.0.1, as [tls] wants it: (cert, key)."""
    cert = ca.issue_cert("mx.test", "localhost", "127.0.0.1")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def reply_lines(output: bytes) -> list[str]:
    return [line for line in output.decode().split("\r\n") if len(line) > 3 and line[3] == " "]
