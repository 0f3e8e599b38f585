"""CPU time per message with OpenDKIM as a milter: mmdf-smtp's and Postfix's, and OpenDKIM's.

On a shared machine msg/s moves with the neighbours' load; the CPU each
process group spends per message moves far less, and on a CPU-bound box
the ratio of throughputs follows it.  One OpenDKIM instance (signing with
RSA 2048, as in ``bench/run.py --milter opendkim``) serves both servers in
turn; for each server the run reports its own process tree's CPU per
message and OpenDKIM's::

    .venv/bin/python bench/milter_cpu.py                 # 1 KiB, 10 clients, a connection a message
    .venv/bin/python bench/milter_cpu.py --reuse         # reused connections (smtp-source -d)
    .venv/bin/python bench/milter_cpu.py --socket inet   # OpenDKIM on loopback TCP

A server's CPU counts its processes' user and system time, and that of
the children they have reaped (Postfix's smtpd and cleanup come and go),
from /proc/<pid>/stat before and after the run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu import tree_cpu_seconds  # noqa: E402
from load import smtp_source  # noqa: E402
from run import IDLE_SLOTS, milter_table, signing_milter  # noqa: E402
from servers import (  # noqa: E402
    SRC,
    Mmdf,
    Postfix,
    Server,
    spread_subdirectories,
    unique_name,
)


def measure(
    server: Server, milter_pid: int, *, count: int, sessions: int, size: int, reuse: bool
) -> tuple[float, float, float]:
    """(msg/s, the server's CPU ms a message, the milter's CPU ms a message)."""
    # A few messages first: workers started, first-use imports done.
    smtp_source(server.port, size=size, count=sessions * 2, sessions=sessions, reuse=reuse)
    server.settle()
    server_before = tree_cpu_seconds(server.root_pid(), reaped=True)
    milter_before = tree_cpu_seconds(milter_pid, reaped=True)
    run = smtp_source(server.port, size=size, count=count, sessions=sessions, reuse=reuse)
    server.settle()
    server_after = tree_cpu_seconds(server.root_pid(), reaped=True)
    milter_after = tree_cpu_seconds(milter_pid, reaped=True)
    return (
        count / run.seconds,
        (server_after - server_before) / count * 1000,
        (milter_after - milter_before) / count * 1000,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="messages a run (1000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel clients (10)")
    parser.add_argument("--size", type=int, default=1024, help="message octets (1024)")
    parser.add_argument("--reuse", action="store_true", help="reuse connections (-d)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians reported (3)")
    parser.add_argument("--socket", choices=["unix", "inet"], default="unix")
    parser.add_argument("--src", type=Path, default=SRC, help="mmdf-smtp's source tree")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree, run as a third server in the same run (A/B)",
    )
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="mmdf-milter-cpu-", dir="/var/tmp"))
    figures: dict[str, list[tuple[float, float, float]]] = {}
    try:
        top.chmod(0o755)
        spread_subdirectories(top)
        with signing_milter(top / unique_name("opendkim"), unix=args.socket == "unix") as milter:
            assert milter.process is not None
            servers: list[Server] = [
                Mmdf(
                    top / unique_name("mmdf"),
                    maxconnects=100,
                    src=args.src,
                    extra=milter_table(milter),
                    name="mmdf-smtp+opendkim",
                ),
                Postfix(
                    top / unique_name("postfix"),
                    maxproc=IDLE_SLOTS,
                    milters=[milter.socket],
                    name="postfix+opendkim",
                ),
            ]
            if args.baseline is not None:
                servers.append(
                    Mmdf(
                        top / unique_name("baseline"),
                        maxconnects=100,
                        src=args.baseline,
                        extra=milter_table(milter),
                        name="baseline+opendkim",
                    )
                )
            for server in servers:
                server.start()
            try:
                for repetition in range(args.repeat):
                    shift = repetition % len(servers)
                    order = servers[shift:] + servers[:shift]
                    for server in order:
                        result = measure(
                            server,
                            milter.process.pid,
                            count=args.count,
                            sessions=args.sessions,
                            size=args.size,
                            reuse=args.reuse,
                        )
                        figures.setdefault(server.name, []).append(result)
                        rate, own, milter_cost = result
                        print(
                            f"{server.name}: {rate:.0f} msg/s, server {own:.2f} ms,"
                            f" opendkim {milter_cost:.2f} ms CPU a message",
                            flush=True,
                        )
            finally:
                for server in servers:
                    server.stop()
    finally:
        shutil.rmtree(top, ignore_errors=True)
    medians = {}
    for name, results in figures.items():
        rate, own, milter_cost = (
            statistics.median(column) for column in zip(*results, strict=True)
        )
        medians[name] = (rate, own, milter_cost)
        print(
            f"median {name}: {rate:.0f} msg/s, server {own:.2f} ms, opendkim {milter_cost:.2f} ms,"
            f" together {own + milter_cost:.2f} ms CPU a message"
        )
    mmdf, postfix = medians.get("mmdf-smtp+opendkim"), medians.get("postfix+opendkim")
    if mmdf and postfix:
        print(
            f"CPU a message, postfix+opendkim over mmdf-smtp+opendkim (the expected msg/s ratio):"
            f" {(postfix[1] + postfix[2]) / (mmdf[1] + mmdf[2]):.2f};"
            f" msg/s ratio measured: {mmdf[0] / postfix[0]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
