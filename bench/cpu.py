"""CPU time per message of mmdf-smtp's smtpd under Postfix's smtp-source.

On a shared machine msg/s moves with the neighbours' load; the CPU time
the server's whole process tree spends per message (user + system, from
/proc/<pid>/stat, before and after the run) moves far less, so this is
what a change to the fast path is judged by::

    .venv/bin/python bench/cpu.py                  # connection per message, 10 clients
    .venv/bin/python bench/cpu.py --reuse          # reused connections (smtp-source -d)
    .venv/bin/python bench/cpu.py --src /elsewhere/src   # another checkout, for A/B runs

Each repetition starts a fresh smtpd (served as ``nobody``), sends
``--count`` messages, and prints msg/s and CPU milliseconds per message;
the last line gives the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import smtp_source  # noqa: E402
from servers import SRC, Mmdf, process_tree, spread_subdirectories, unique_name  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int, *, reaped: bool = False) -> float:
    """User plus system time of ``root`` and its descendants (their threads
    included); with ``reaped``, of the children they reaped too (a
    session's short-lived processes)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if reaped:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _TICKS


def measure(
    top: Path, src: Path, *, count: int, sessions: int, size: int, reuse: bool
) -> tuple[float, float]:
    """One run on a fresh server in ``top``: (msg/s, CPU milliseconds per message)."""
    server = Mmdf(top / unique_name("mmdf"), maxconnects=100, src=src)
    server.start()
    try:
        before = tree_cpu_seconds(server.root_pid())
        run = smtp_source(server.port, size=size, count=count, sessions=sessions, reuse=reuse)
        after = tree_cpu_seconds(server.root_pid())
    finally:
        server.stop()
    return count / run.seconds, (after - before) / count * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="messages a run (3000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel clients (10)")
    parser.add_argument("--size", type=int, default=1024, help="message octets (1024)")
    parser.add_argument("--reuse", action="store_true", help="reuse connections (-d)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians reported (3)")
    parser.add_argument("--src", type=Path, default=SRC, help="the package's source tree")
    args = parser.parse_args()
    rates, costs = [], []
    # The runs' files are removed only at the end: on ext4 without a journal
    # a run's creates would pay for the unlinks of the run before (see
    # servers.spread_subdirectories).
    top = Path(tempfile.mkdtemp(prefix="mmdf-cpu-", dir="/var/tmp"))
    try:
        top.chmod(0o755)  # the sessions run as nobody
        spread_subdirectories(top)
        for _ in range(args.repeat):
            rate, cost = measure(
                top,
                args.src,
                count=args.count,
                sessions=args.sessions,
                size=args.size,
                reuse=args.reuse,
            )
            rates.append(rate)
            costs.append(cost)
            print(f"{rate:.0f} msg/s, {cost:.2f} ms CPU per message", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(
        f"median: {statistics.median(rates):.0f} msg/s, "
        f"{statistics.median(costs):.2f} ms CPU per message"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
