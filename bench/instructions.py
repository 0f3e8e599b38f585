"""Instructions a message in smtpd's workers and commit processes, counted by callgrind.

CPU time on a shared machine moves with the neighbours' load; the
instructions a message costs do not.  smtpd runs under
``valgrind --tool=callgrind`` (every process it forks is counted apart),
takes a warm-up and then ``--count`` messages from smtp-source (1 KiB,
10 clients, a connection per message); a second server takes ``--base``
messages the same way, and the difference of the two runs' counts over
the difference of their messages is the cost of a message, start-up and
shut-down left out.  User space only: the kernel's work is not counted::

    .venv/bin/python bench/instructions.py                        # this checkout
    .venv/bin/python bench/instructions.py --src A/src --src B/src

Each run takes a minute or two (callgrind is some 50 times slower).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import smtp_source  # noqa: E402
from servers import SRC, Mmdf, process_tree, spread_subdirectories, unique_name  # noqa: E402

_SUMMARY = re.compile(rb"^summary: (\d+)", re.MULTILINE)
_ROLES = ("workers", "commit processes")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


def count(top: Path, src: Path, messages: int, size: int, sessions: int) -> dict[str, int]:
    """Instructions of smtpd's workers and commit processes over a run of ``messages``."""
    out = top / unique_name("callgrind")
    out.mkdir()
    out.chmod(0o777)  # the sessions run as nobody
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p"]
    server = Mmdf(top / unique_name("mmdf"), maxconnects=100, src=src, wrapper=wrapper)
    server.start()
    try:
        # The commit processes start with the first commits.
        smtp_source(server.port, size=size, count=4 * sessions, sessions=sessions, reuse=False)
        smtp_source(server.port, size=size, count=messages, sessions=sessions, reuse=False)
        root = server.root_pid()
        roles: dict[int, str] = {}
        for pid in process_tree(root):
            if pid != root:
                roles[pid] = _ROLES[0] if _parent(pid) == root else _ROLES[1]
    finally:
        server.stop()  # callgrind writes its counts as each process exits
    counts = dict.fromkeys(_ROLES, 0)
    for pid, role in roles.items():
        found = _SUMMARY.search((out / f"callgrind.{pid}").read_bytes())
        if found is None:
            raise RuntimeError(f"no count for process {pid} in {out}")
        counts[role] += int(found.group(1))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400, help="messages of the long run (400)")
    parser.add_argument("--base", type=int, default=100, help="messages of the short run (100)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel clients (10)")
    parser.add_argument("--size", type=int, default=1024, help="message octets (1024)")
    parser.add_argument(
        "--src", type=Path, action="append", help="the package's source tree (repeatable)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    top = Path(tempfile.mkdtemp(prefix="mmdf-instructions-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        spread_subdirectories(top)
        for src in args.src or [SRC]:
            short = count(top, src, args.base, args.size, args.sessions)
            long = count(top, src, args.count, args.size, args.sessions)
            each = {role: (long[role] - short[role]) / (args.count - args.base) for role in _ROLES}
            figures = ", ".join(f"{role} {n / 1e6:.3f}" for role, n in each.items())
            total = sum(each.values()) / 1e6
            print(f"{src}: M instructions a message: {figures}; in all {total:.3f}", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
