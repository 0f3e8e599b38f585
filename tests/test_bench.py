"""The benchmark's smoke run: every server starts, answers every case, and stops.

Timings are never asserted: the machine is shared and noisy.  What must
hold is that the run completed, each server accepted (and, end to end,
delivered) every message it was sent, and no server was left running.
The bench puts the queues on a journaled ext4 it loop-mounts; where loop
mounts are refused (some CI machines), the smoke run falls back to
``--root-fs`` and says so: the harness is what is tested, not the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters import unavailable

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
SERVERS = ["mmdf-smtp", "postfix", "aiosmtpd"]

pytestmark = [
    pytest.mark.skipif(
        shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists(),
        reason="smtp-source comes with Debian's postfix, installed by .ci/run",
    ),
    pytest.mark.skipif(
        shutil.which("postfix") is None, reason="Debian's postfix is installed by .ci/run"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("aiosmtpd") is None,
        reason="aiosmtpd is the extra 'bench' (pip install -e '.[bench]')",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance must start as root"),
]


NO_JOURNALED_FS = b"no journaled file system"
EX_UNAVAILABLE = 69


def run_bench(arguments: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """bench/run.py with ``arguments``; on --workdir's own file system when loop mounts fail."""
    command = [sys.executable, str(BENCH), *arguments]
    result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    if result.returncode == EX_UNAVAILABLE and NO_JOURNALED_FS in result.stderr:
        warnings.warn(
            "no loop mount here, the smoke run falls back to --root-fs: "
            + result.stderr.decode(errors="replace").strip(),
            stacklevel=2,
        )
        command.append("--root-fs")
        result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    else:
        assert b"queues and Maildirs: " in result.stdout, result.stderr.decode()
        assert b"(ext4, journal: data=ordered)" in result.stdout, result.stdout.decode()
    return result


def _leftovers(directory: Path) -> list[str]:
    """Processes that name ``directory`` in their command line or environment.

    Postfix's daemons name it only in MAIL_CONFIG, the others in argv.
    """
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            environment = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if str(directory).encode() in command + environment:
            found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def workdir() -> Iterator[Path]:
    """On disk and reachable by the postfix user, which pytest's tmp_path is not."""
    directory = Path(tempfile.mkdtemp(prefix="mmdf-bench-test-", dir="/var/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_smoke_run_completes_and_every_server_answers(tmp_path: Path, workdir: Path) -> None:
    figures = tmp_path / "figures.json"
    result = run_bench(["--smoke", "--json", str(figures), "--workdir", str(workdir)], timeout=100)
    assert result.returncode == 0, result.stderr.decode()
    raw = json.loads(figures.read_text())
    assert list(raw) == [
        "1 KiB x2 connect",
        "1 KiB x2 reuse",
        "1 KiB x2 pipeline",
        "100 KiB x2 pipeline",
        "1 MiB x1 pipeline",
        "idle x20",
    ]
    sent = {"1 KiB x2 connect": 10, "1 KiB x2 reuse": 10, "1 KiB x2 pipeline": 10}
    sent |= {"100 KiB x2 pipeline": 4, "1 MiB x1 pipeline": 1, "idle x20": 20}
    for case, runs in raw.items():
        assert sorted(runs) == sorted(SERVERS), case
        for server, [measurement] in runs.items():
            assert measurement["error"] is None, (case, server, measurement["error"])
            assert measurement["messages"] == sent[case], (case, server)
            assert measurement["peak"]["pss"] > 0, (case, server)
    table = result.stdout.decode()
    assert "| case | msg/s (mmdf-smtp / postfix / aiosmtpd) |" in table
    assert "| idle x20 (PSS growth, MiB) |" in table
    assert _leftovers(workdir) == []
    assert list(workdir.iterdir()) == [], "the run's directory was not removed"


def test_smoke_run_with_opendkim_and_auth(tmp_path: Path, workdir: Path) -> None:
    """--milter opendkim pairs both servers through OpenDKIM; --auth adds mmdf-smtp's checks."""
    for program, package in (("opendkim", "opendkim"), ("opendkim-genkey", "opendkim-tools")):
        if shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            unavailable(f"{program} is missing (Debian's package {package})")
    figures = tmp_path / "figures.json"
    command = ["--smoke", "--milter", "opendkim", "--auth"]
    command += ["--only", "1 KiB x2 (connect|pipeline)", "--json", str(figures)]
    command += ["--workdir", str(workdir)]
    result = run_bench(command, timeout=150)
    assert result.returncode == 0, result.stderr.decode()
    raw = json.loads(figures.read_text())
    assert list(raw) == ["1 KiB x2 connect", "1 KiB x2 pipeline"]
    variants = ["mmdf-smtp+opendkim", "postfix+opendkim", "mmdf-smtp+auth"]
    for case, runs in raw.items():
        assert sorted(runs) == sorted([*SERVERS, *variants]), case
        for server, [measurement] in runs.items():
            assert measurement["error"] is None, (case, server, measurement["error"])
            assert measurement["messages"] == 10, (case, server)
    table = result.stdout.decode()
    header = f"| case | msg/s ({' / '.join([*SERVERS, *variants])}) |"
    assert header in table
    # postfix+opendkim's ratio is mmdf-smtp+opendkim's, a figure.
    [row] = [line for line in table.splitlines() if line.startswith("| 1 KiB x2 connect |")]
    assert re.search(r" \| \d+\.\d\d \|$", row), row
    notes = [line for line in table.splitlines() if line.startswith("- 1 KiB x2 connect: ")]
    assert [note.split()[5] for note in notes] == ["mmdf-smtp+opendkim", "mmdf-smtp+auth"], notes
    assert _leftovers(workdir) == []
    assert list(workdir.iterdir()) == [], "the run's directory was not removed"


def test_end_to_end_smoke_run_delivers_every_message(tmp_path: Path, workdir: Path) -> None:
    """--e2e: every message received, queued and delivered, by both servers, to both sinks."""
    figures = tmp_path / "figures.json"
    result = run_bench(
        ["--e2e", "--smoke", "--json", str(figures), "--workdir", str(workdir)], timeout=110
    )
    assert result.returncode == 0, result.stderr.decode()
    raw = json.loads(figures.read_text())
    sent = {
        "receive 1 KiB x2 connect": 10,
        "maildir 1 KiB x2 connect": 10,
        "maildir 100 KiB x2 pipeline": 4,
        "lmtp 1 KiB x2 pipeline": 10,
        "lmtp 100 KiB x2 connect": 4,
    }
    assert list(raw) == list(sent)
    for case, runs in raw.items():
        expected = ["mmdf-smtp", "postfix"]
        if case.startswith("receive"):
            expected.append("mmdf-smtp+asyncio")
        assert sorted(runs) == sorted(expected), case
        for server, [measurement] in runs.items():
            assert measurement["error"] is None, (case, server, measurement["error"])
            assert measurement["messages"] == sent[case], (case, server)
            assert measurement["seconds"] > 0, (case, server)
            if not case.startswith("receive"):
                assert measurement["peak_queue"] is not None, (case, server)
    table = result.stdout.decode()
    assert "| case | delivered msg/s (mmdf-smtp / postfix / mmdf-smtp+asyncio) |" in table
    [row] = [line for line in table.splitlines() if line.startswith("| lmtp 1 KiB x2 pipeline |")]
    assert re.search(r" \| \d+\.\d\d \|$", row), row
    assert _leftovers(workdir) == []
    assert list(workdir.iterdir()) == [], "the run's directory was not removed"
