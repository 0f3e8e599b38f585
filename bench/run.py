"""Benchmark mmdf-smtp against Postfix and aiosmtpd, in one run on one machine.

    python bench/run.py [--smoke] [--rounds N] [--json FILE] [--milter opendkim] [--auth]
    python bench/run.py --e2e [--smoke] [--rounds N] [--only REGEX]   # the whole mail system

Every server's queue (and, end to end, its Maildirs) is on an ext4 with
its journal that the run makes in ``--workdir``, loop-mounts, and unmounts
at the end, as on a production host (bench/journaled.py says why);
``--root-fs`` runs on ``--workdir``'s own file system instead.

Starts the three servers on free loopback ports, each with the same
durability (250 only once the message is on stable storage), drives them
case by case in interleaved rounds (every case runs on every server before
the next case; the servers' order rotates from round to round), and prints
one table of medians over the rounds with mmdf-smtp's ratios to the others.
``--milter opendkim`` adds Postfix with OpenDKIM signing every message as
its smtpd milter ("postfix+opendkim") and mmdf-smtp through the same
OpenDKIM instance ("mmdf-smtp+opendkim"), the two compared with each other.
``--auth`` adds mmdf-smtp with its built-in checks on ("mmdf-smtp+auth":
SPF, DKIM, DMARC against a DNS server on loopback that publishes the load's
sender's records), compared with mmdf-smtp without them.  ``--e2e``
measures the whole mail system instead, mmdf-smtp (smtpd and deliver)
beside Postfix: received, queued and delivered to a Maildir or to an LMTP
sink, and the sustained receiving case with and without uvloop (see
bench/endtoend.py).  Every server it starts, it stops.  See README.md,
"Performance", and docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from endtoend import Delivered, LmtpSink, flows, mail_servers, measure_flow
from journaled import MountUnavailable, describe, journaled
from load import SENDER, IdleConnections, LoadError, Run, pipelining_client, smtp_source
from loopback_dns import loopback_dns, txt
from memory import Footprint, PeakSampler, footprint
from milter_servers import Milter, MilterUnavailable, OpenDKIM, make_rsa_key, require
from servers import (
    Aiosmtpd,
    Mmdf,
    MmdfPostgres,
    Postfix,
    Postgres,
    Server,
    spread_subdirectories,
    unique_name,
)

KIB = 1024
MIB = 1024 * KIB
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
IDLE_SLOTS = 1100  # maxconnects / Postfix's smtpd process limit: room for the idle case


@dataclass(frozen=True)
class Case:
    """One measurement: ``count`` messages of ``size`` octets from ``clients`` clients.

    ``load`` is "connect" (a connection per message, smtp-source), "reuse"
    (smtp-source -d) or "pipeline" (our client, reusing connections).
    """

    size: int
    clients: int
    load: str
    count: int

    @property
    def name(self) -> str:
        size = f"{self.size // MIB} MiB" if self.size >= MIB else f"{self.size // KIB} KiB"
        return f"{size} x{self.clients} {self.load}"

    def run_on(self, ports: list[int]) -> Run:
        """The case over several nodes: the clients and messages shared out, run at once."""
        if len(ports) == 1:
            return self.run(ports[0])
        shares = [
            Case(self.size, max(1, self.clients // len(ports)), self.load, self.count // len(ports))
            for _ in ports
        ]
        with ThreadPoolExecutor(len(ports)) as pool:
            runs = list(
                pool.map(lambda pair: pair[0].run(pair[1]), zip(shares, ports, strict=True))
            )
        return Run(
            sum(r.messages for r in runs),
            self.size,
            max(r.seconds for r in runs),
            [latency for r in runs for latency in r.latencies],
        )

    def run(self, port: int) -> Run:
        if self.load == "pipeline":
            return pipelining_client(port, size=self.size, count=self.count, clients=self.clients)
        return smtp_source(
            port,
            size=self.size,
            count=self.count,
            sessions=self.clients,
            reuse=self.load == "reuse",
        )


@dataclass
class Measurement:
    messages: int
    seconds: float
    size: int
    p50: float | None
    p99: float | None
    before: Footprint
    peak: Footprint
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def megabytes(self) -> float:
        return self.rate * self.size / 1e6


@dataclass
class Results:
    by_case: dict[str, dict[str, list[Measurement]]] = field(default_factory=dict)

    def add(self, case: str, server: str, measurement: Measurement) -> None:
        self.by_case.setdefault(case, {}).setdefault(server, []).append(measurement)


def cases(smoke: bool) -> list[Case]:
    """The benchmark's cases; in smoke mode a handful of tiny ones."""
    if smoke:
        return [
            Case(KIB, 2, "connect", 10),
            Case(KIB, 2, "reuse", 10),
            Case(KIB, 2, "pipeline", 10),
            Case(100 * KIB, 2, "pipeline", 4),
            Case(MIB, 1, "pipeline", 1),
        ]
    found = []
    for load in ("connect", "reuse", "pipeline"):
        # Sessions that reuse their connection are faster: twice the messages.
        scale = 1 if load == "connect" else 2
        for size, per_client, least in ((KIB, 20, 400), (100 * KIB, 4, 80)):
            for clients in (1, 10, 50):
                count = max(per_client * clients, least) * scale
                found.append(Case(size, clients, load, count))
    found.append(Case(20 * MIB, 1, "pipeline", 1))
    return found


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(server: Server, case: Case) -> Measurement:
    before = footprint(server.root_pid())
    error = None
    run = Run(0, case.size, 0.0)
    with PeakSampler(server.root_pid) as sampler:
        try:
            run = case.run_on(server.ports)
        except (LoadError, OSError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    server.settle()
    # What a case wrote (and Postfix removed) is the filesystem's work for a
    # while after; done now, it does not slow down whichever server comes next.
    os.sync()
    p50 = percentile(run.latencies, 0.5) if run.latencies else None
    p99 = percentile(run.latencies, 0.99) if run.latencies else None
    return Measurement(run.messages, run.seconds, case.size, p50, p99, before, sampler.peak, error)


def measure_idle(server: Server, count: int) -> Measurement:
    """Memory with ``count`` greeted, idle sessions, against the moment before.

    A few sessions first, so that the baseline is a server that has served:
    workers forked, session processes started, first-use imports done.
    """
    warm_up = IdleConnections(server.port, 10)
    warm_up.open()
    warm_up.close()
    before = footprint(server.root_pid())
    idle = IdleConnections(server.port, count)
    error = None
    peak = before
    start = time.perf_counter()
    try:
        idle.open()
        seconds = time.perf_counter() - start
        # Postfix forks a process per session: let the tree settle, keep the peak.
        for _ in range(5):
            peak = peak.max(footprint(server.root_pid()))
            time.sleep(0.2)
    except (LoadError, OSError, TimeoutError) as exc:
        seconds = time.perf_counter() - start
        error = f"{type(exc).__name__}: {exc}"
    finally:
        idle.close()
    return Measurement(count if error is None else 0, seconds, 0, None, None, before, peak, error)


@contextlib.contextmanager
def signing_milter(directory: Path, *, unix: bool) -> Iterator[Milter]:
    """OpenDKIM signing, with a 2048-bit RSA key, all mail From: the load's sender domain."""
    domain = SENDER.decode().rsplit("@", 1)[1]
    key = make_rsa_key(directory / "keys", domain, "bench")
    milter = OpenDKIM(directory, mode="s", keys=[key], unix=unix)
    with milter:
        yield milter


def milter_table(milter: Milter) -> str:
    """mmdf-smtp's [[milters]] for ``milter``, failing as Postfix's does here (tempfail).

    With ``reuse = true``, as an administrator running OpenDKIM (libmilter,
    protocol version 6) would set it: a milter connection serves one SMTP
    session after another (QUIT_NC) instead of being opened and negotiated
    for each.
    """
    return f'\n[[milters]]\nsocket = "{milter.socket}"\ndefault_action = "tempfail"\nreuse = true\n'


def sender_records() -> dict[tuple[str, str], list[str]]:
    """What the load's sender's domain publishes: SPF passing loopback, DMARC p=reject.

    Every message then takes the whole of [auth]'s work but a signature's:
    SPF of MAIL FROM and of the HELO name (client.bench), the DKIM and ARC
    pass over the message (no signature found), DMARC's record and
    alignment (SPF's, which passes).
    """
    domain = SENDER.decode().rsplit("@", 1)[1]
    return {
        (domain, "TXT"): [txt("v=spf1 ip4:127.0.0.0/8 -all")],
        (f"_dmarc.{domain}", "TXT"): [txt("v=DMARC1; p=reject")],
    }


def auth_table(nameserver: str) -> str:
    return f'\n[auth]\nauthserv_id = "mx.bench"\n\n[dns]\nnameservers = ["{nameserver}"]\n'


@contextlib.contextmanager
def started(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def prerequisites(milter: str | None) -> list[str]:
    missing = []
    if milter == "opendkim":
        for program, package in (("opendkim", "opendkim"), ("opendkim-genkey", "opendkim-tools")):
            try:
                require(program, package)
            except MilterUnavailable:
                missing.append(f"{program} (Debian's {package} package)")
    if shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists():
        missing.append("smtp-source (Debian's postfix package)")
    if shutil.which("postfix") is None:
        missing.append("postfix (Debian's postfix package)")
    if importlib.util.find_spec("aiosmtpd") is None:
        missing.append("aiosmtpd (pip install -e '.[bench]')")
    return missing


def raise_file_limit() -> None:
    """1,000 idle sessions need more descriptors than the usual 1024; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mib(value: int) -> str:
    return f"{value / MIB:.1f}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _cell(
    servers: list[str], runs: dict[str, list[Measurement]], get: Callable[[list[Measurement]], str]
) -> str:
    return " / ".join(get(runs.get(name, [])) if runs.get(name) else "-" for name in servers)


def _ok(measurements: list[Measurement]) -> list[Measurement]:
    return [m for m in measurements if m.error is None]


def reference(servers: list[str], other: str) -> str | None:
    """The mmdf-smtp variant compared with ``other``: the same milter, or none.

    "postfix+opendkim" is compared with "mmdf-smtp+opendkim" (when it runs),
    never with mmdf-smtp filtering nothing.
    """
    _, plus, milter = other.partition("+")
    ours = servers[0] + plus + milter
    return ours if ours in servers and ours != other else None


def _ratio(values: dict[str, float], servers: list[str], other: str) -> str:
    ours = reference(servers, other)
    if ours is None or not values[other]:
        return "-"
    return f"{values[ours] / values[other]:.2f}"


def table(results: Results, servers: list[str]) -> str:
    """One Markdown table: medians over rounds, mmdf-smtp's ratios to the others."""
    order = " / ".join(servers)
    others = [name for name in servers if not name.startswith(servers[0])]
    header = (
        f"| case | msg/s ({order}) | MB/s | p50 ms | p99 ms | peak PSS MiB | "
        + "".join(f"x {other} | " for other in others)
    ).rstrip()
    lines = [header, "|" + "---|" * (6 + len(others))]

    def fmt(values: list[float], pattern: str) -> str:
        return pattern.format(_median(values)) if values else "-"

    for case, runs in results.by_case.items():
        if case.startswith("idle"):
            continue
        ok = {name: _ok(runs.get(name, [])) for name in servers}
        rates = {name: _median([m.rate for m in ok[name]]) for name in servers}
        ratios = [_ratio(rates, servers, other) for other in others]
        lines.append(
            "| "
            + " | ".join(
                [
                    case,
                    _cell(servers, ok, lambda ms: fmt([m.rate for m in ms], "{:.0f}")),
                    _cell(servers, ok, lambda ms: fmt([m.megabytes for m in ms], "{:.1f}")),
                    _cell(
                        servers,
                        ok,
                        lambda ms: fmt([m.p50 * 1e3 for m in ms if m.p50 is not None], "{:.1f}"),
                    ),
                    _cell(
                        servers,
                        ok,
                        lambda ms: fmt([m.p99 * 1e3 for m in ms if m.p99 is not None], "{:.1f}"),
                    ),
                    _cell(servers, ok, lambda ms: fmt([m.peak.pss / MIB for m in ms], "{:.0f}")),
                    *ratios,
                ]
            )
            + " |"
        )
    for case, runs in results.by_case.items():
        if not case.startswith("idle"):
            continue
        ok = {name: _ok(runs.get(name, [])) for name in servers}
        growth = {
            name: _median([(m.peak.pss - m.before.pss) / MIB for m in ok[name]]) for name in servers
        }
        ratios = [_ratio(growth, servers, other) for other in others]
        cell = " / ".join(f"+{growth[name]:.1f}" if ok[name] else "-" for name in servers)
        lines.append(
            f"| {case} (PSS growth, MiB) | - | - | - | - | {cell} | " + " | ".join(ratios) + " |"
        )
    return "\n".join(lines)


def growth_notes(results: Results, servers: list[str]) -> list[str]:
    """Memory added by the largest message, per server (RSS and PSS of the tree)."""
    notes = []
    for case, runs in results.by_case.items():
        if "MiB" not in case:
            continue
        for name in servers:
            ok = _ok(runs.get(name, []))
            if ok:
                pss = _median([(m.peak.pss - m.before.pss) / MIB for m in ok])
                rss = _median([(m.peak.rss - m.before.rss) / MIB for m in ok])
                notes.append(f"{case}: {name} grew by {pss:.1f} MiB PSS ({rss:.1f} MiB RSS)")
    return notes


def variant_notes(results: Results, servers: list[str]) -> list[str]:
    """Each variant of the first server (mmdf-smtp+auth, ...) against the first, case by case."""
    notes = []
    variants = [name for name in servers if name.startswith(servers[0] + "+")]
    for case, runs in results.by_case.items():
        if case.startswith("idle"):
            continue
        base = _median([m.rate for m in _ok(runs.get(servers[0], []))])
        for name in variants:
            ok = _ok(runs.get(name, []))
            if ok and base:
                rate = _median([m.rate for m in ok])
                notes.append(
                    f"{case}: {name} at {rate / base:.2f}x {servers[0]}"
                    f" ({rate:.0f} vs {base:.0f} msg/s)"
                )
    return notes


def errors(results: Results) -> list[str]:
    found: list[str] = []
    for case, runs in results.by_case.items():
        for name, measurements in runs.items():
            found.extend(f"{case} on {name}: {m.error}" for m in measurements if m.error)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds of tiny cases")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also run mmdf-smtp on the PostgreSQL queue: one smtpd node, and two on one database",
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3; 1 with --smoke)")
    parser.add_argument("--json", type=Path, help="write every round's figures to this file")
    parser.add_argument(
        "--idle", type=int, help="idle sessions to hold (default 1000; 20 with --smoke)"
    )
    parser.add_argument(
        "--only",
        metavar="REGEX",
        help="run only the cases whose name matches, e.g. '1 KiB x10' (no idle case unless named)",
    )
    parser.add_argument(
        "--milter",
        choices=["opendkim"],
        help="also run Postfix with this milter (OpenDKIM signing every message) as a server",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="also run mmdf-smtp with [auth] on (SPF, DKIM, DMARC) as a server",
    )
    parser.add_argument(
        "--milter-socket",
        choices=["unix", "inet"],
        default="unix",
        help="the milter's socket: unix (Debian's default for OpenDKIM) or inet on loopback",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also run mmdf-smtp with [metrics] listen set (mmdf-smtp+metrics), to see its cost",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the run's directory is made: on disk, reachable by the postfix user",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="the whole mail system instead: received, queued and delivered to a Maildir or"
        " an LMTP sink, side by side with Postfix, and the sustained receiving case",
    )
    parser.add_argument(
        "--root-fs",
        action="store_true",
        help="run on --workdir's own file system instead of a journaled ext4 made for the run",
    )
    args = parser.parse_args(argv)
    missing = prerequisites(args.milter)
    if missing:
        print("bench: missing " + ", ".join(missing), file=sys.stderr)
        return EX_UNAVAILABLE
    raise_file_limit()
    # Killed (timeout(1), CI), the run still stops its servers and unmounts.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    with contextlib.ExitStack() as stack:
        if args.root_fs:
            where = describe(args.workdir)
            print(
                f"bench: on the root file system as asked: {where.describe()};"
                " without a journal, ext4 charges Postfix's queue churn (docs/performance.md)",
                file=sys.stderr,
            )
        else:
            try:
                where = stack.enter_context(journaled(args.workdir))
            except MountUnavailable as exc:
                print(
                    f"bench: no journaled file system for the queues: {exc}\n"
                    "bench: --root-fs runs on --workdir's file system instead (figures not"
                    " comparable with a production host's)",
                    file=sys.stderr,
                )
                return EX_UNAVAILABLE
        # On disk, not tmpfs: an fsync must reach stable storage.  Postfix's
        # daemons (user postfix) must be able to reach their directories.
        top = Path(tempfile.mkdtemp(prefix="mmdf-bench-", dir=where.path))
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        top.chmod(0o755)
        if not spread_subdirectories(top):
            print(
                "bench: the servers' directories share block groups (no chattr +T here):"
                " one server's unlinks may slow another's creates",
                file=sys.stderr,
            )
        print(f"queues and Maildirs: {where.describe()}", flush=True)
        if args.e2e:
            return end_to_end(args, top)
        return receiving(args, top)


def receiving(args: argparse.Namespace, top: Path) -> int:
    """The receiving cases (and idle sessions): mmdf-smtp, Postfix and aiosmtpd."""
    rounds = args.rounds or (1 if args.smoke else 3)
    idle = args.idle if args.idle is not None else (20 if args.smoke else 1000)
    results = Results()
    servers: list[Server] = [
        Mmdf(top / unique_name("mmdf"), maxconnects=100),
        Postfix(top / unique_name("postfix"), maxproc=IDLE_SLOTS),
        Aiosmtpd(top / unique_name("aiosmtpd")),
    ]
    # The idle case holds a thousand sessions: the milter variants would
    # hold a thousand milter connections too, a measure of the milter.
    idle_servers = list(servers)
    started_at = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.milter == "opendkim":
            milter = stack.enter_context(
                signing_milter(top / unique_name("opendkim"), unix=args.milter_socket == "unix")
            )
            servers.append(
                Mmdf(
                    top / unique_name("mmdf-opendkim"),
                    maxconnects=100,
                    extra=milter_table(milter),
                    name=f"mmdf-smtp+{milter.name}",
                )
            )
            servers.append(
                Postfix(
                    top / unique_name("postfix-opendkim"),
                    maxproc=IDLE_SLOTS,
                    milters=[milter.socket],
                    name=f"postfix+{milter.name}",
                )
            )
        if args.postgres:
            database = Postgres(top / unique_name("postgres"))
            database.start()
            stack.callback(database.stop)
            for nodes in (1, 2):
                servers.insert(
                    nodes, MmdfPostgres(top / unique_name(f"mmdf-pg{nodes}"), 100, database, nodes)
                )
        if args.metrics:
            servers.insert(1, Mmdf(top / unique_name("mmdf-metrics"), 100, metrics=True))
        if args.auth:
            nameserver = stack.enter_context(loopback_dns(sender_records()))
            servers.append(
                Mmdf(
                    top / unique_name("mmdf-auth"),
                    maxconnects=100,
                    extra=auth_table(nameserver),
                    name="mmdf-smtp+auth",
                )
            )
        names = [server.name for server in servers]
        for server in servers:
            stack.enter_context(started(server))
        chosen = [c for c in cases(args.smoke) if not args.only or re.search(args.only, c.name)]
        for round_ in range(rounds):
            for case in chosen:
                shift = round_ % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    measurement = measure(server, case)
                    results.add(case.name, server.name, measurement)
                    if not server.alive():
                        raise RuntimeError(f"{server.name} died during {case.name}")
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
        # The idle case last: Postfix's session processes outlive it for
        # max_idle, and would weigh on every later measurement.
        idle_name = f"idle x{idle}"
        for server in idle_servers if not args.only or re.search(args.only, idle_name) else []:
            target = server
            if isinstance(server, Mmdf):
                # maxconnects 100 above, as Postfix's default process limit;
                # holding the idle sessions needs a daemon with more slots.
                target = stack.enter_context(
                    started(Mmdf(top / unique_name("mmdf-idle"), IDLE_SLOTS))
                )
            results.add(idle_name, server.name, measure_idle(target, idle))
    elapsed = time.monotonic() - started_at

    print(
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{rounds} round(s), {elapsed:.0f} s; medians over rounds"
    )
    print(table(results, names))
    print()
    for note in growth_notes(results, names) + variant_notes(results, names):
        print(f"- {note}")
    if args.json:
        raw = {
            case: {name: [asdict(m) for m in ms] for name, ms in runs.items()}
            for case, runs in results.by_case.items()
        }
        args.json.write_text(json.dumps(raw, indent=1))
    failures = errors(results)
    for failure in failures:
        print(f"bench: {failure}", file=sys.stderr)
    return EX_SOFTWARE if failures else 0


def end_to_end_table(results: dict[str, dict[str, list[Delivered]]], names: list[str]) -> str:
    """Medians over rounds: delivered msg/s, the receiving half's, the queue's peak, the ratio."""
    order = " / ".join(names)
    lines = [
        f"| case | delivered msg/s ({order}) | accepted msg/s | peak queue | x postfix |",
        "|---|---|---|---|---|",
    ]
    for case, runs in results.items():
        ok = {name: [m for m in runs.get(name, []) if m.error is None] for name in names}

        def cell(
            get: Callable[[Delivered], float | None],
            pattern: str,
            ok: dict[str, list[Delivered]] = ok,
        ) -> str:
            values = {name: [v for m in ok[name] if (v := get(m)) is not None] for name in names}
            return " / ".join(
                pattern.format(_median(values[name])) if values[name] else "-" for name in names
            )

        rates = {name: _median([m.rate for m in ok[name]]) for name in names}
        ratio = f"{rates['mmdf-smtp'] / rates['postfix']:.2f}" if rates["postfix"] else "-"
        lines.append(
            f"| {case} | {cell(lambda m: m.rate, '{:.0f}')}"
            f" | {cell(lambda m: m.accept_rate, '{:.0f}')}"
            f" | {cell(lambda m: m.peak_queue, '{:.0f}')} | {ratio} |"
        )
    return "\n".join(lines)


def end_to_end(args: argparse.Namespace, top: Path) -> int:
    """The whole mail system, mmdf-smtp and Postfix side by side: see bench/endtoend.py."""
    rounds = args.rounds or 1
    results: dict[str, dict[str, list[Delivered]]] = {}
    chosen = [f for f in flows(args.smoke) if not args.only or re.search(args.only, f.name)]
    started_at = time.monotonic()
    with contextlib.ExitStack() as stack:
        sink = LmtpSink(top / unique_name("lmtp-sink"))
        stack.callback(sink.stop)
        sink.start()
        by_sink = mail_servers(top, unique_name, sink)
        for kind in dict.fromkeys(flow.sink for flow in chosen):
            for server in by_sink[kind]:
                stack.enter_context(started(server))
        for round_ in range(rounds):
            for flow in chosen:
                servers = [
                    server
                    for server in by_sink[flow.sink]
                    if flow.variant or server.name in ("mmdf-smtp", "postfix")
                ]
                shift = round_ % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    measurement = measure_flow(server, flow, sink if flow.sink == "lmtp" else None)
                    results.setdefault(flow.name, {}).setdefault(server.name, []).append(
                        measurement
                    )
                    if not server.alive():
                        raise RuntimeError(f"{server.name} died during {flow.name}")
                    print(
                        f"{flow.name} on {server.name}: {measurement.rate:.0f} msg/s"
                        + (f" ({measurement.error})" if measurement.error else ""),
                        file=sys.stderr,
                        flush=True,
                    )
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started_at
    names = ["mmdf-smtp", "postfix"]
    variants = sorted({name for runs in results.values() for name in runs} - set(names))
    print(
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{rounds} round(s), {elapsed:.0f} s; medians over rounds; "
        "msg/s from the first connection to the last message delivered"
    )
    print(end_to_end_table(results, [*names, *variants]))
    print()
    for case, runs in results.items():
        rates = {
            name: _median([m.rate for m in ms if m.error is None]) for name, ms in runs.items()
        }
        for variant in variants:
            if rates.get(variant) and rates.get("mmdf-smtp") and rates.get("postfix"):
                print(
                    f"- {case}: {variant} at {rates[variant]:.0f} msg/s,"
                    f" {rates[variant] / rates['mmdf-smtp']:.2f}x mmdf-smtp,"
                    f" {rates[variant] / rates['postfix']:.2f}x postfix"
                )
    if args.json:
        raw = {
            case: {name: [asdict(m) for m in ms] for name, ms in runs.items()}
            for case, runs in results.items()
        }
        args.json.write_text(json.dumps(raw, indent=1))
    failures = [
        f"{case} on {name}: {m.error}"
        for case, runs in results.items()
        for name, ms in runs.items()
        for m in ms
        if m.error
    ]
    for failure in failures:
        print(f"bench: {failure}", file=sys.stderr)
    return EX_SOFTWARE if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
