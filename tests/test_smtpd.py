"""smtpd's flavours and controls: inetd, sun, an external smtpsrvr, limits, signals."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dnsserver import Zone, dns_server
from test_wire import read_replies, recv_reply
from wire import PYTHON, SRC, Daemon, daemon, env, queued, session_uid, write_config

SMTPD = [PYTHON, "-m", "mmdf_smtp.cli.smtpd"]


def serve_on_socketpair(args: list[str], client_bytes: bytes) -> tuple[bytes, int]:
    """Run smtpd with one end of a socketpair as stdin/stdout (inetd)."""
    ours, theirs = socket.socketpair()
    with ours:
        process = subprocess.Popen([*SMTPD, *args], stdin=theirs, stdout=theirs, env=env())
        theirs.close()
        ours.settimeout(30)
        ours.sendall(client_bytes)
        data = b""
        while chunk := ours.recv(65536):
            data += chunk
        return data, process.wait(timeout=30)


def test_inetd_flavour_serves_the_connection_on_stdin(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    out, status = serve_on_socketpair(
        ["-c", str(config), "smtpsrvr", "local"],
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\ninetd\r\n.\r\nQUIT\r\n",
    )
    assert status == 0
    assert out.startswith(b"220 mx.test Server SMTP ready\r\n")
    assert out.endswith(b"221 2.0.0 mx.test closing connection\r\n")
    [message] = queued(config)
    assert (message["channel"], message["remote_addr"]) == ("local", "")


def test_sun_flavour_takes_the_peer_from_its_argument(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    out, status = serve_on_socketpair(
        ["-c", str(config), "7f000002.1234"],
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nsun\r\n.\r\nQUIT\r\n",
    )
    assert status == 0
    assert b"250 2.0.0 Submitted & queued" in out
    [message] = queued(config)
    assert (message["channel"], message["remote_addr"]) == ("smtp", "127.0.0.2")


WRAPPER_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
/* A site's own smtpsrvr: records argv (argv[0] included, which a script
   would lose to its interpreter) and the peer of stdin, then says hello. */
int main(int argc, char **argv) {
    FILE *log = fopen(LOGFILE, "w");
    for (int i = 0; i < argc; i++) fprintf(log, "%s\n", argv[i]);
    struct sockaddr_in peer; socklen_t len = sizeof peer;
    if (getpeername(0, (struct sockaddr *)&peer, &len) == 0)
        fprintf(log, "peer=%s\n", inet_ntoa(peer.sin_addr));
    fprintf(log, "uid=%d\n", (int)getuid());
    fclose(log);
    const char *hello = "220 wrapper ready\r\n", *bye = "221 wrapper bye\r\n";
    char line[512];
    write(1, hello, strlen(hello));
    read(0, line, sizeof line);
    write(1, bye, strlen(bye));
    return 0;
}
"""


@pytest.fixture
def wrapper(tmp_path: Path) -> tuple[Path, Path]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to build the test's smtpsrvr"
    log = tmp_path / "argv.txt"
    log.touch(mode=0o666)  # written by the program, which runs as SESSION_USER
    log.chmod(0o666)
    source = tmp_path / "mysrvr.c"
    source.write_text(WRAPPER_C.replace("LOGFILE", json.dumps(str(log))))
    program = tmp_path / "mysrvr"
    subprocess.run([compiler, "-o", str(program), str(source)], check=True)
    return program, log


@pytest.mark.parametrize("finicky", [False, True])
def test_an_external_smtpsrvr_gets_the_connection_and_the_seed_argv(
    tmp_path: Path, wrapper: tuple[Path, Path], finicky: bool
) -> None:
    program, log = wrapper
    zone = Zone()
    zone.add("1.0.0.127.in-addr.arpa", "PTR", "loopback.test.")
    zone.add("loopback.test", "A", "127.0.0.1")
    with dns_server(zone) as nameserver:
        config = write_config(
            tmp_path, f'\n[dns]\nnameservers = ["{nameserver}"]\ntimeout = 2\n', scripted=True
        )
        flags = ["-f"] if finicky else []
        started = daemon(config, *flags, program=str(program), channels="local,smtp")
        with started as d, d.connect() as sock:
            assert recv_reply(sock) == b"220 wrapper ready\r\n"
            sock.sendall(b"QUIT\r\n")
            assert recv_reply(sock) == b"221 wrapper bye\r\n"
    assert log.read_text().splitlines() == [
        "rsmtpsrvr" if finicky else "smtpsrvr",
        "loopback.test",
        "mx.test",
        "local,smtp",
        "peer=127.0.0.1",
        f"uid={session_uid()}",
    ]


def test_finicky_daemon_refuses_a_client_on_127_0_0_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config, "-f", channels="local") as d:
        with d.connect("127.0.0.2") as sock:
            assert recv_reply(sock) == (
                b"554 5.7.1 mx.test: Your name, '[127.0.0.2]', is unknown to us.\r\n"
            )
            sock.sendall(b"MAIL FROM:<>\r\nQUIT\r\n")
            assert read_replies(sock, 2) == [
                b"503 5.5.1 Service refused; send QUIT",
                b"221 2.0.0 mx.test closing connection",
            ]
        with d.connect("127.0.0.1") as sock:
            assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"


def with_smtpd_settings(config: Path, **settings: int) -> Path:
    lines = "".join(f"\n{key} = {value}" for key, value in settings.items())
    config.write_text(config.read_text().replace("maxconnects = 8", "maxconnects = 8" + lines))
    return config


def test_max_per_client(tmp_path: Path) -> None:
    config = with_smtpd_settings(write_config(tmp_path, scripted=True), max_per_client=1)
    with daemon(config) as d:
        first = d.connect()
        try:
            assert recv_reply(first).startswith(b"220 ")
            with d.connect() as second:
                assert recv_reply(second) == (
                    b"421 4.7.0 Too many connections from your host, try again later\r\n"
                )
            with d.connect("127.0.0.2") as other:
                assert recv_reply(other).startswith(b"220 ")
        finally:
            first.close()


def test_max_per_network_counts_a_slash_24(tmp_path: Path) -> None:
    config = with_smtpd_settings(write_config(tmp_path, scripted=True), max_per_network=2)
    with daemon(config) as d:
        held = [d.connect("127.0.0.1"), d.connect("127.0.0.2")]
        try:
            for sock in held:
                assert recv_reply(sock).startswith(b"220 ")
            with d.connect("127.0.0.3") as third:
                assert recv_reply(third) == (
                    b"421 4.7.0 Too many connections from your network, try again later\r\n"
                )
            with d.connect("127.0.1.1") as elsewhere:  # another /24
                assert recv_reply(elsewhere).startswith(b"220 ")
            # A session that ends gives its place back (once the server saw it end).
            held.pop().close()
            deadline = time.monotonic() + 10
            greeting = b""
            while not greeting.startswith(b"220 ") and time.monotonic() < deadline:
                with d.connect("127.0.0.3") as later:
                    greeting = recv_reply(later)
            assert greeting.startswith(b"220 ")
        finally:
            for sock in held:
                sock.close()


def test_connection_rates_per_client_and_per_network(tmp_path: Path) -> None:
    config = with_smtpd_settings(
        write_config(tmp_path, scripted=True), rate_per_client=2, rate_per_network=3
    )
    with daemon(config) as d:

        def greeting(source: str) -> bytes:
            with d.connect(source) as sock:
                return recv_reply(sock)

        assert greeting("127.0.0.1").startswith(b"220 ")
        assert greeting("127.0.0.1").startswith(b"220 ")
        assert greeting("127.0.0.1") == (
            b"421 4.7.0 Too many connections from your host in the last minute, try again later\r\n"
        )
        # The refused attempt counted for the network too: 3 this minute.
        assert greeting("127.0.0.2") == (
            b"421 4.7.0 Too many connections from your network in the last minute,"
            b" try again later\r\n"
        )
        assert greeting("127.0.1.1").startswith(b"220 ")


def test_errors_are_tarpitted_without_holding_up_other_clients(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "\n[limits]\nerrors_before_delay = 1\nerror_delay = 1.5\n", scripted=True
    )
    with daemon(config) as d, d.connect() as slow:
        assert recv_reply(slow).startswith(b"220 ")
        started = time.monotonic()
        slow.sendall(b"BAD\r\n" * 3)  # two errors past the first: 3 s held back
        with d.connect("127.0.0.2") as other:
            assert recv_reply(other).startswith(b"220 ")
            other.sendall(b"NOOP\r\n")
            assert recv_reply(other) == b"250 2.0.0 OK\r\n"
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)  # the other client was served while these wait
        slow.setblocking(True)
        assert read_replies(slow, 3) == [b"500 5.5.1 Command unrecognized"] * 3
        assert time.monotonic() - started >= 3.0


def test_command_timeout_through_the_daemon(tmp_path: Path) -> None:
    config = write_config(tmp_path, "\n[limits]\ncommand_timeout = 1\n", scripted=True)
    with daemon(config) as d, d.connect() as sock:
        assert recv_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO c\r\n")
        recv_reply(sock)
        sock.sendall(b"NOOP")
        assert recv_reply(sock) == (
            b"421 4.4.2 Timeout waiting for input, closing transmission channel\r\n"
        )
        assert sock.recv(100) == b""


def test_sighup_reloads_and_keeps_the_old_configuration_when_the_new_is_bad(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config) as d:
        config.write_text(
            config.read_text().replace('hostname = "mx.test"', 'hostname = "mx2.test"')
        )
        d.process.send_signal(signal.SIGHUP)
        # The supervisor reloads, once, and replaces the workers.
        d.log_lines("configuration reloaded")
        d.log_lines(" started, pid ", d.workers)
        with d.connect() as sock:
            assert recv_reply(sock) == b"220 mx2.test Server SMTP ready\r\n"
        config.write_text(config.read_text() + "\n[limits]\nerrors = 0\n")
        d.process.send_signal(signal.SIGHUP)
        [line] = d.log_lines("reload failed")
        assert "reload failed, keeping the running configuration" in line
        assert "limits.errors: must be at least 1" in line
        with d.connect() as sock:
            assert recv_reply(sock) == b"220 mx2.test Server SMTP ready\r\n"


def test_sighup_to_every_process_reloads_once_and_no_worker_dies(tmp_path: Path) -> None:
    """`pkill -HUP smtpd` signals the workers as well as the supervisor:
    the reload is the supervisor's alone, and a worker's own SIGHUP leaves
    it serving until the supervisor retires it."""
    config = write_config(tmp_path, scripted=True)
    with daemon(config) as d:
        said: list[str] = []

        def read_until(text: str, count: int = 1) -> None:
            """Every line of the log until ``count`` more of them hold ``text``."""
            deadline, found = time.monotonic() + 20, 0
            while found < count:
                line = d.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                assert line is not None, f"smtpd ended before logging {text!r}: {said}"
                said.append(line)
                found += text in line

        wait_for(lambda: len(children_of(d.process.pid)) == d.workers)
        workers = children_of(d.process.pid)
        for pid in workers:  # the workers alone: nothing changes
            os.kill(pid, signal.SIGHUP)
        read_until("SIGHUP ignored: it is the supervisor's", d.workers)
        with d.connect() as sock:
            assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"
        assert children_of(d.process.pid) == workers
        config.write_text(
            config.read_text().replace('hostname = "mx.test"', 'hostname = "mx2.test"')
        )
        for pid in [d.process.pid, *workers]:  # as pkill does
            os.kill(pid, signal.SIGHUP)
        read_until("configuration reloaded")
        read_until(" started, pid ", d.workers)
        with d.connect() as sock:
            assert recv_reply(sock) == b"220 mx2.test Server SMTP ready\r\n"
        wait_for(lambda: not set(workers) & set(children_of(d.process.pid)))
        d.process.send_signal(signal.SIGTERM)
        d.process.wait(timeout=40)
        said.extend(iter(lambda: d.lines.get(timeout=30), None))
    text = "".join(said)
    assert " died " not in text, text
    assert text.count("configuration reloaded") == 1, text


def test_after_sighup_messages_go_to_the_new_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config, "-n", "1") as d:
        wait_for(lambda: len(children_of(d.process.pid)) == 1)
        [before] = children_of(d.process.pid)
        moved = tmp_path / "spool2"
        moved.mkdir()
        os.chown(moved, session_uid(), -1)  # smtpd has become the session user by now
        config.write_text(config.read_text().replace(str(tmp_path / "spool"), str(moved)))
        d.process.send_signal(signal.SIGHUP)
        d.log_lines("configuration reloaded")
        # The old queue's commit process had nothing left to commit: it is gone.
        wait_for(lambda: before not in children_of(d.process.pid))
        with d.connect() as sock:
            sock.sendall(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            assert read_replies(sock, 4)[-1].startswith(b"354")
            sock.sendall(b"after the reload\r\n.\r\nQUIT\r\n")
            assert read_replies(sock, 2)[0].startswith(b"250 2.0.0 Submitted")
    assert list((tmp_path / "spool").glob("queue/*")) == []
    [name] = os.listdir(moved / "queue")
    assert (moved / "queue" / name).read_bytes().endswith(b"after the reload\r\n")


def test_sigterm_lets_a_session_finish_then_exits_0(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config) as d:
        with d.connect() as sock:
            assert recv_reply(sock).startswith(b"220 ")
            d.process.send_signal(signal.SIGTERM)
            sock.sendall(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            assert read_replies(sock, 4)[-1].startswith(b"354")
            sock.sendall(b"finished after SIGTERM\r\n.\r\nQUIT\r\n")
            assert read_replies(sock, 2)[0].startswith(b"250 2.0.0 Submitted")
        assert d.process.wait(timeout=30) == 0
        with pytest.raises(OSError):
            d.connect()
    assert len(queued(config)) == 1


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["smtpsrvr"], 64, b"expected: smtpsrvr channels"),
        (["-n", "0", "smtpsrvr", "local"], 64, b"maxconnects must be a positive number"),
        (["/nonexistent/srvr", "local"], 64, b"/nonexistent/srvr: not an executable program"),
        (["smtpsrvr", "local,nosuch"], 64, b"unknown channel 'nosuch'"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], status: int, message: bytes) -> None:
    config = write_config(tmp_path, scripted=True)
    result = subprocess.run(
        [*SMTPD, "-c", str(config), *args],
        capture_output=True,
        env=env(),
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert result.returncode == status
    assert message in result.stderr


def test_bad_configuration_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[smtpd]\nmaxconnects = 0\n")
    result = subprocess.run(
        [*SMTPD, "-c", str(config), "smtpsrvr", "local"],
        capture_output=True,
        env=env(),
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78
    assert f"{config}:2: smtpd.maxconnects: must be at least 1".encode() in result.stderr


def test_systemd_socket_activation(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # sd_listen_fds(3): the socket is fd 3 and LISTEN_PID names the server
    # itself, so set it in the process that then becomes smtpd.
    code = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'mmdf_smtp.cli.smtpd', "
        "'-c', sys.argv[2], 'smtpsrvr', 'local'])"
    )
    process = subprocess.Popen(
        [PYTHON, "-c", code, str(listener.fileno()), str(config)],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env(),
    )
    listener.close()
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        while b"listening on" not in line:
            assert line, "smtpd did not start"
            line = process.stderr.readline()
        assert f"listening on 127.0.0.1:{port}".encode() in line
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        process.stderr.close()  # type: ignore[union-attr]


def test_workers_sets_how_many_processes_serve_the_sessions(tmp_path: Path) -> None:
    wanted = (os.cpu_count() or 1) + 1  # never the default, one per core
    config = write_config(tmp_path, scripted=True)
    config.write_text(
        config.read_text().replace("maxconnects = 8\n", f"maxconnects = 64\nworkers = {wanted}\n")
    )
    with daemon(config) as d:
        assert d.workers == wanted
        pids = {int(line.rsplit(" ", 1)[1]) for line in d.log_lines(" started, pid ", wanted)}
        assert len(pids) == wanted
        with d.connect() as sock:
            sock.settimeout(30)
            assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"


def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config, "-n", "4") as d:
        workers = [int(line.rsplit(" ", 1)[1]) for line in d.log_lines(" started, pid ", 2)]
        os.kill(workers[0], signal.SIGKILL)
        [line] = d.log_lines("starting another")
        assert f"(pid {workers[0]}) died with status -9" in line
        for _ in range(4):  # every slot is served again
            with d.connect() as sock:
                assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"
                sock.sendall(b"QUIT\r\n")
                recv_reply(sock)


def test_a_worker_that_replaces_another_after_sighup_has_the_reloaded_configuration(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config, "-n", "2") as d:  # two workers, one session each
        workers = [int(line.rsplit(" ", 1)[1]) for line in d.log_lines(" started, pid ", 2)]
        config.write_text(
            config.read_text().replace('hostname = "mx.test"', 'hostname = "mx2.test"')
        )
        d.process.send_signal(signal.SIGHUP)
        d.log_lines("configuration reloaded")
        d.log_lines(" started, pid ", 2)
        replacements = [pid for pid in children_of(d.process.pid) if pid not in workers]
        os.kill(replacements[0], signal.SIGKILL)
        d.log_lines(" started, pid ")
        # Both at once: one of them is the replacement's.
        with d.connect() as first, d.connect() as second:
            assert recv_reply(first) == b"220 mx2.test Server SMTP ready\r\n"
            assert recv_reply(second) == b"220 mx2.test Server SMTP ready\r\n"


FAILING_WORKERS = """
import logging, sys
from mmdf_smtp.daemon import Supervisor
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
def work(index):
    raise RuntimeError("this worker cannot start")
Supervisor(1, work).run()
"""


def test_a_worker_that_cannot_start_is_restarted_after_a_growing_pause() -> None:
    process = subprocess.Popen(
        [PYTHON, "-c", FAILING_WORKERS], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env()
    )
    assert process.stderr is not None
    seen = b""
    try:
        # The second death's pause is the doubled one; the third start is
        # due 2 s after it, so a prompt SIGTERM must come before it.
        deadline = time.monotonic() + 30
        while b"starting another in 2 s" not in seen:
            ready, _, _ = select.select([process.stderr], [], [], deadline - time.monotonic())
            assert ready, seen
            chunk = os.read(process.stderr.fileno(), 65536)  # unbuffered: select sees it all
            assert chunk, seen
            seen += chunk
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (seen + process.stderr.read()).decode()
    process.stderr.close()
    assert log.count("worker 0 failed") == 2, log  # stopped before the third start was due
    pauses = re.findall(r"died with status 70 after [0-9.]+ s; starting another in (\S+) s", log)
    assert pauses == ["1", "2"], log
    assert log.rstrip().endswith("stopped")


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("Uid:")]
    return int(line.split()[2])  # the effective uid


@pytest.mark.skipif(os.geteuid() != 0, reason="only root is asked to drop privileges")
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("", b"user: not set; the mail system never runs as root"),
        ('user = "root"', b"user: 'root' is root; the mail system never runs as root"),
        ('user = "no-such-user"', b"user: no such user 'no-such-user'"),
    ],
)
def test_root_without_an_unprivileged_user_is_refused(
    tmp_path: Path, setting: str, message: bytes
) -> None:
    config = write_config(tmp_path, scripted=True)
    text = config.read_text().replace('user = "nobody"', setting)
    config.write_text(text)
    for command in (
        [*SMTPD, "-c", str(config), "smtpsrvr", "local"],
        [PYTHON, "-m", "mmdf_smtp.cli.smtpsrvr", "-c", str(config), "-", "-", "local"],
    ):
        result = subprocess.run(
            command,
            capture_output=True,
            env=env(),
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
        assert result.returncode == 78, result.stderr
        assert message in result.stderr
        assert result.stdout == b""  # not even a greeting
    assert not (tmp_path / "spool" / "queue").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root is asked to drop privileges")
def test_started_as_root_sessions_run_as_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config, "-n", "2") as d:
        workers = [int(line.rsplit(" ", 1)[1]) for line in d.log_lines(" started, pid ", 2)]
        wait_for(lambda: all(children_of(worker) for worker in workers))
        committers = [pid for worker in workers for pid in children_of(worker)]
        assert len(committers) == 2  # a commit process each
        # The supervisor stays root, to reload what only root may read; it
        # serves nobody.  Those that do are the user's.
        assert uid_of(d.process.pid) == 0
        assert {uid_of(pid) for pid in [*workers, *committers]} == {session_uid()}
        with d.connect() as sock:
            assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"
            sock.sendall(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            assert read_replies(sock, 4)[-1].startswith(b"354")
            sock.sendall(b"x\r\n.\r\nQUIT\r\n")
            assert read_replies(sock, 2)[0].startswith(b"250 2.0.0 Submitted")
    [message] = queued(config)
    assert (tmp_path / "spool" / "queue" / message["id"]).stat().st_uid == session_uid()


def runner_for_nobody() -> tuple[list[str], dict[str, str]] | None:
    """A command prefix and environment that run this checkout as nobody, if any.

    The tests' own interpreter may live where nobody can read (under /root),
    so this is Debian's, given the checkout's source and installed packages.
    """
    site = next(iter(Path(PYTHON).parent.parent.glob("lib/python3*/site-packages")), None)
    system = Path("/usr/bin/python3")
    if not system.exists() or site is None or shutil.which("setpriv") is None:
        return None
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(system)]
    environment = {**env(), "PYTHONPATH": f"{SRC}:{site}"}
    probe = [*command, "-c", "import dns.resolver, mmdf_smtp.cli.smtpd"]
    if subprocess.run(probe, env=environment, capture_output=True, check=False).returncode:
        return None
    return command, environment


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an ordinary user")
def test_started_as_an_ordinary_user_it_serves_above_port_1023(tmp_path: Path) -> None:
    runner = runner_for_nobody()
    if runner is None:
        pytest.skip("no interpreter with this checkout's packages that nobody can run")
    command, environment = runner
    config = write_config(tmp_path, scripted=True)
    config.write_text(config.read_text().replace('user = "nobody"\n', ""))
    (tmp_path / "spool").mkdir()
    os.chown(tmp_path / "spool", 65534, 65534)
    process = subprocess.Popen(
        [*command, "-m", "mmdf_smtp.cli.smtpd", "-c", str(config), "-n", "1", "smtpsrvr", "local"],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=environment,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline().decode()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=30) as sock:
            assert recv_reply(sock) == b"220 mx.test Server SMTP ready\r\n"
            sock.sendall(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            assert read_replies(sock, 4)[-1].startswith(b"354")
            sock.sendall(b"as nobody\r\n.\r\nQUIT\r\n")
            assert read_replies(sock, 2)[0].startswith(b"250 2.0.0 Submitted")
        assert uid_of(process.pid) == 65534
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        process.stderr.close()  # type: ignore[union-attr]
    [message] = queued(config)
    assert (tmp_path / "spool" / "queue" / message["id"]).stat().st_uid == 65534


def the_worker(d: Daemon) -> int:
    """The one worker of ``-n 1``: smtpd itself, or under root its supervisor's child."""
    if os.geteuid() != 0:
        return d.process.pid
    wait_for(lambda: len(children_of(d.process.pid)) == 1)
    [worker] = children_of(d.process.pid)
    return worker


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def test_a_commit_process_that_dies_is_replaced_and_keeps_no_connection_open(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, scripted=True)
    with daemon(config, "-n", "1") as d:  # one worker, with its commit process
        assert d.workers == 1
        worker = the_worker(d)
        wait_for(lambda: len(children_of(worker)) == 1)  # forked as the loop starts
        [first] = children_of(worker)
        with d.connect() as sock:
            sock.settimeout(10)
            assert recv_reply(sock).startswith(b"220 ")
            os.kill(first, signal.SIGKILL)
            # Reaped once the worker saw its socket end.
            wait_for(lambda: first not in children_of(worker))
            sock.sendall(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            assert read_replies(sock, 4)[-1].startswith(b"354")
            sock.sendall(b"after the commit process died\r\n.\r\nQUIT\r\n")
            assert read_replies(sock, 2) == [
                b"250 2.0.0 Submitted & queued (" + queued(config)[0]["id"].encode() + b")",
                b"221 2.0.0 mx.test closing connection",
            ]
            # The new commit process was forked with this connection open: a
            # copy of its socket held there would keep it open now.
            assert sock.recv(1) == b""
        [second] = children_of(worker)
        assert second != first
        d.stop()
        wait_for(lambda: not Path(f"/proc/{second}").exists())  # it ended with its worker
    [message] = queued(config)
    assert message["sender"] == ""
