"""CPU time per message of mmdf-smtp's smtpd under Postfix's smtp-source.

On a shared machine msg/s moves with the neighbours' load; the CPU time
the server's whole process tree spends per message (user + system, from
/proc/<pid>/stat, before and after the run) moves far less, so this is
what a change to the fast path is judged by::

    .venv/bin/python bench/cpu.py                  # connection per message, 10 clients
    .venv/bin/python bench/cpu.py --reuse          # reused connections (smtp-source -d)
    .venv/bin/python bench/cpu.py --src /elsewhere/src   # another checkout, for A/B runs
    .venv/bin/python bench/cpu.py --postgres       # on the PostgreSQL queue, the database counted
    .venv/bin/python bench/cpu.py --postgres --src A/src --src B/src   # A/B, alternating

Each repetition starts a fresh smtpd (served as ``nobody``), sends
``--count`` messages, and prints msg/s and CPU milliseconds per message,
in all and by role (the supervisor, the workers, their commit processes);
the last lines give the medians.  With ``--postgres`` smtpd is one node
on a PostgreSQL the run starts (as ``bench/run.py --postgres`` does), and
the CPU is smtpd's and the database's (the postmaster and every backend,
those that exited too), each given, beside the transactions that wrote
and the statements run (``pg_stat_statements``) per message.  Several
``--src`` alternate, repetition by repetition, each with its medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import smtp_source  # noqa: E402
from servers import (  # noqa: E402
    SRC,
    Mmdf,
    MmdfPostgres,
    Postgres,
    process_tree,
    spread_subdirectories,
    unique_name,
)

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


def _cpu_of(pid: int, *, reaped: bool = False) -> tuple[int, str]:
    """(ticks, the command line) of one process, (0, "") once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return 0, ""
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks, command


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                found.extend(int(child) for child in file.read().split())
        except OSError:
            continue
    return found


def _smtpd_processes(root: int) -> Iterator[tuple[str, int]]:
    """(role, pid) of smtpd's supervisor, its workers and their commit processes."""
    depth = {root: 0}
    for pid in process_tree(root):  # parents before their children
        for child in _children(pid):
            depth[child] = depth[pid] + 1
        yield {0: "supervisor", 1: "workers", 2: "commit processes"}.get(depth[pid], "other"), pid


def smtpd_roles(root: int) -> dict[str, float]:
    """CPU seconds of smtpd's supervisor, its workers and their commit processes."""
    roles: dict[str, float] = {}
    for role, pid in _smtpd_processes(root):
        roles[role] = roles.get(role, 0.0) + _cpu_of(pid)[0] / _TICKS
    return roles


def _switches_of(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all of ``pid``'s threads."""
    waits = preempted = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as file:
                for line in file:
                    if line.startswith("voluntary_ctxt_switches:"):
                        waits += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        preempted += int(line.split()[1])
        except OSError:
            continue
    return waits, preempted


def smtpd_switches(root: int) -> dict[str, tuple[int, int]]:
    """Context switches by role: how often each slept (waits) and was preempted.

    A process that sleeps and is woken for each client's command pays for
    the wake-up each time: this shows why a message costs more CPU with few
    clients than with many, where one wake-up serves several."""
    roles: dict[str, tuple[int, int]] = {}
    for role, pid in _smtpd_processes(root):
        waits, preempted = _switches_of(pid)
        before = roles.get(role, (0, 0))
        roles[role] = (before[0] + waits, before[1] + preempted)
    return roles


def database_roles(root: int) -> dict[str, float]:
    """CPU seconds of PostgreSQL's postmaster (with the children it reaped:
    backends that exited), its client backends, its WAL writer, the rest."""
    roles: dict[str, float] = {}
    for pid in process_tree(root):
        ticks, command = _cpu_of(pid, reaped=pid == root)
        if pid == root:
            role = "postmaster"
        elif "walwriter" in command:
            role = "walwriter"
        elif "(" in command:  # "postgres: user database host(port) state"
            role = "backends"
        else:
            role = "other"
        roles[role] = roles.get(role, 0.0) + ticks / _TICKS
    return roles


@dataclass
class Cost:
    rate: float  # msg/s
    smtpd: float  # CPU milliseconds a message, smtpd's process tree
    database: float = 0.0  # and the database's
    transactions: float = 0.0  # that wrote, a message
    statements: float = 0.0  # a message
    roles: dict[str, float] = field(default_factory=dict)  # CPU milliseconds a message
    # waits and preemptions a message
    switches: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.smtpd + self.database


def measure(
    top: Path,
    src: Path,
    *,
    count: int,
    sessions: int,
    size: int,
    reuse: bool,
    database: Postgres | None = None,
) -> Cost:
    """One run on a fresh server in ``top``."""
    name = unique_name("mmdf")
    server = (
        Mmdf(top / name, maxconnects=100, src=src)
        if database is None
        else MmdfPostgres(top / name, 100, database, 1, src=src)
    )
    server.start()
    try:
        if database is not None:  # the commit processes' first connections
            smtp_source(server.port, size=size, count=sessions * 4, sessions=sessions, reuse=reuse)
            database_before = tree_cpu_seconds(database.root_pid(), reaped=True)
            counted_before = database.counts()
            roles_before = smtpd_roles(server.root_pid()) | database_roles(database.root_pid())
        else:
            roles_before = smtpd_roles(server.root_pid())
        switches_before = smtpd_switches(server.root_pid())
        before = tree_cpu_seconds(server.root_pid())
        run = smtp_source(server.port, size=size, count=count, sessions=sessions, reuse=reuse)
        after = tree_cpu_seconds(server.root_pid())
        cost = Cost(count / run.seconds, (after - before) / count * 1000)
        if database is not None:
            database_after = tree_cpu_seconds(database.root_pid(), reaped=True)
            counted_after = database.counts()
            cost.database = (database_after - database_before) / count * 1000
            cost.transactions = (counted_after[0] - counted_before[0]) / count
            cost.statements = (counted_after[1] - counted_before[1]) / count
            roles_after = smtpd_roles(server.root_pid()) | database_roles(database.root_pid())
        else:
            roles_after = smtpd_roles(server.root_pid())
        cost.roles = {
            role: (seconds - roles_before.get(role, 0.0)) / count * 1000
            for role, seconds in roles_after.items()
        }
        cost.switches = {
            role: (
                (waits - switches_before.get(role, (0, 0))[0]) / count,
                (preempted - switches_before.get(role, (0, 0))[1]) / count,
            )
            for role, (waits, preempted) in smtpd_switches(server.root_pid()).items()
            if role != "supervisor"
        }
    finally:
        server.stop()
        if database is not None:
            database.empty()
    return cost


def _line(cost: Cost, postgres: bool) -> str:
    line = f"{cost.rate:.0f} msg/s, {cost.cpu:.2f} ms CPU per message"
    if postgres:
        line += (
            f" (smtpd {cost.smtpd:.2f}, database {cost.database:.2f});"
            f" {cost.transactions:.2f} transactions, {cost.statements:.2f} statements a message"
        )
    if cost.roles:
        line += "\n  ms a message: " + ", ".join(
            f"{role} {ms:.3f}" for role, ms in cost.roles.items()
        )
    if cost.switches:
        line += "\n  context switches a message (waits + preempted): " + ", ".join(
            f"{role} {waits:.1f} + {preempted:.1f}"
            for role, (waits, preempted) in cost.switches.items()
        )
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="messages a run (3000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel clients (10)")
    parser.add_argument("--size", type=int, default=1024, help="message octets (1024)")
    parser.add_argument("--reuse", action="store_true", help="reuse connections (-d)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians reported (3)")
    parser.add_argument(
        "--src", type=Path, action="append", help="the package's source tree (repeatable)"
    )
    parser.add_argument("--postgres", action="store_true", help="smtpd on a PostgreSQL queue")
    args = parser.parse_args()
    sources: list[Path] = args.src or [SRC]
    costs: dict[Path, list[Cost]] = {src: [] for src in sources}
    # The runs' files are removed only at the end: on ext4 without a journal
    # a run's creates would pay for the unlinks of the run before (see
    # servers.spread_subdirectories).
    top = Path(tempfile.mkdtemp(prefix="mmdf-cpu-", dir="/var/tmp"))
    database = Postgres(top / "postgres", statements=True) if args.postgres else None
    try:
        top.chmod(0o755)  # the sessions run as nobody
        spread_subdirectories(top)
        if database is not None:
            database.start()
        for _ in range(args.repeat):
            for src in sources:
                cost = measure(
                    top,
                    src,
                    count=args.count,
                    sessions=args.sessions,
                    size=args.size,
                    reuse=args.reuse,
                    database=database,
                )
                costs[src].append(cost)
                where = f"{src}: " if len(sources) > 1 else ""
                print(where + _line(cost, args.postgres), flush=True)
    finally:
        if database is not None:
            database.stop()
        shutil.rmtree(top, ignore_errors=True)
    for src, runs in costs.items():
        median = Cost(0.0, 0.0)
        for name in (f.name for f in fields(Cost) if f.name not in ("roles", "switches")):
            setattr(median, name, statistics.median(getattr(run, name) for run in runs))
        median.roles = {
            role: statistics.median(run.roles.get(role, 0.0) for run in runs)
            for role in runs[0].roles
        }
        median.switches = {
            role: (
                statistics.median(run.switches.get(role, (0.0, 0.0))[0] for run in runs),
                statistics.median(run.switches.get(role, (0.0, 0.0))[1] for run in runs),
            )
            for role in runs[0].switches
        }
        where = f" {src}" if len(sources) > 1 else ""
        print(f"median{where}: " + _line(median, args.postgres))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
