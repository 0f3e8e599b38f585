"""CPU time per message of deliver handing a queue to an LMTP next hop.

deliver's half of the end-to-end "lmtp" case, alone: a spool is filled
with ``--count`` messages (through the queue's own API, before the clock
starts), bench/lmtp_sink.py is started, and deliver's runner makes one
pass over the queue, as ``deliver --once`` does, with
``next_hop = "lmtp:127.0.0.1:PORT"``::

    .venv/bin/python bench/deliver_cpu.py                     # 1 KiB and 100 KiB
    .venv/bin/python bench/deliver_cpu.py --size 1024 --count 5000
    .venv/bin/python bench/deliver_cpu.py --src A/src --src B/src   # A/B, alternating
    .venv/bin/python bench/deliver_cpu.py --arriving   # new mail, as end to end: no state written
    .venv/bin/python bench/deliver_cpu.py --set 'concurrency = 8'   # a [deliver] setting
    .venv/bin/python bench/deliver_cpu.py --profile stacks.txt      # py-spy of deliver

Each line gives msg/s and the CPU milliseconds a message of deliver (its
process, every thread: getrusage) and of the sink (/proc/<pid>/stat); the
last lines give the medians.  On a shared machine msg/s moves with the
neighbours' load, CPU per message far less: judge a change by the latter.
The queue lies on a journaled ext4 made for the run (bench/journaled.py),
or with ``--root-fs`` on --workdir's own file system, as the output says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from endtoend import LmtpSink  # noqa: E402
from journaled import MountUnavailable, describe, journaled  # noqa: E402
from servers import SRC  # noqa: E402

KIB = 1024
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def message_of(size: int, n: int) -> bytes:
    """A message of about ``size`` octets: headers, then lines of text."""
    head = (
        f"From: <sender@example.net>\r\nTo: <a@remote.bench>\r\n"
        f"Subject: message {n}\r\nMessage-ID: <{n}@bench>\r\n\r\n"
    ).encode()
    # Text, one line in eight with a leading dot: stuffing is exercised.
    text = b"Some words of a line of text, as mail has them, wrapped at 76.\r\n" * 7
    block = text + b".a line that starts with a dot, doubled on the wire\r\n"
    body = block * (size // len(block) + 1)
    return head + body[: max(0, size - len(head))].rpartition(b"\r\n")[0] + b"\r\n"


@dataclass
class Cost:
    rate: float  # msg/s
    deliver: float  # CPU milliseconds a message
    sink: float


def child(args: argparse.Namespace) -> int:
    """In a process whose PYTHONPATH is the checkout measured: fill, then deliver once."""
    from mmdf_smtp.config import load
    from mmdf_smtp.delivery.runner import Runner
    from mmdf_smtp.queue import Envelope
    from mmdf_smtp.queue.spool import Spool

    directory = Path(args.directory)
    config_path = directory / "mmdf.toml"
    config_path.write_text(
        f'hostname = "mx.bench"\nspool = "{directory / "spool"}"\n'
        'local_domains = ["local.bench"]\n\n'
        f'[deliver]\nnext_hop = "lmtp:127.0.0.1:{args.port}"\n'
        + "".join(f"{setting}\n" for setting in args.set or ())
    )
    config = load(str(config_path))
    spool = Spool(config.spool)
    spool.prepare()
    from datetime import UTC, datetime

    if args.arriving:
        # The deliverer's first claim (of nothing) marks where the queue stood
        # when it started: what is queued after it is new mail, never tried.
        spool.claim(0, datetime.now(UTC))
    # As smtpd queues them: line ends vouched CRLF, where the --src tree's
    # envelope has that field (an older one has not).
    as_smtpd_writes: dict[str, Any] = (
        {"crlf": True} if "crlf" in Envelope.__dataclass_fields__ else {}
    )
    for n in range(args.count):
        writer = spool.open(
            Envelope(
                sender="sender@example.net",
                recipients=("a@remote.bench",),
                channel="local",
                remote_host="client.bench",
                remote_addr="127.0.0.1",
                helo="client.bench",
                received=datetime.now(UTC),
                **as_smtpd_writes,
            )
        )
        writer.write(message_of(args.size, n))
        writer.commit()
    os.sync()
    runner = Runner(config, spool)
    spy = _spy(args.profile) if args.profile else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    try:
        runner.run()
    finally:
        runner.close()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.communicate(timeout=60)
    left = len(spool.ids())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "left": left}))
    return 0


def _spy(output: str) -> subprocess.Popen[bytes]:
    """py-spy sampling this process, every thread (the deliveries run in a
    pool), from now until SIGINT: collapsed stacks into ``output``."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("deliver_cpu: --profile needs py-spy (.venv/bin/pip install py-spy)")
    process = subprocess.Popen(
        [
            *(spy, "record", "--pid", str(os.getpid()), "--gil", "--rate", "1000"),
            *("--format", "raw", "--output", output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    # Started once it says so: its first line comes when sampling begins.
    assert process.stdout is not None
    process.stdout.readline()
    return process


def top_of(collapsed: Path, lines: int = 15) -> str:
    """The functions most often on the CPU (with the GIL) in py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:lines]
    return "\n".join(f"{100 * n / total:5.1f}%  {frame}" for frame, n in ranked)


def measure(
    top: Path,
    src: Path,
    sink: LmtpSink,
    *,
    count: int,
    size: int,
    profile: str,
    settings: list[str],
    arriving: bool,
) -> Cost:
    directory = Path(tempfile.mkdtemp(prefix="deliver-", dir=top))
    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert sink.process is not None
    delivered_before, _ = sink.stat()
    sink_before = _cpu_seconds(sink.process.pid)
    argv = [sys.executable, __file__, "--child", str(directory), "--port", str(sink.port)]
    argv += ["--count", str(count), "--size", str(size)]
    for setting in settings:
        argv += ["--set", setting]
    if arriving:
        argv.append("--arriving")
    if profile:
        argv += ["--profile", profile]
        Path(profile).unlink(missing_ok=True)
    result = subprocess.run(argv, env=env, capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"deliver_cpu: the run failed:\n{result.stderr.decode()}")
    sink_after = _cpu_seconds(sink.process.pid)
    delivered_after, _ = sink.stat()
    figures = json.loads(result.stdout.splitlines()[-1])
    if figures["left"] or delivered_after - delivered_before != count:
        raise SystemExit(
            f"deliver_cpu: {figures['left']} left in the queue,"
            f" {delivered_after - delivered_before} of {count} delivered"
        )
    shutil.rmtree(directory, ignore_errors=True)
    if profile:
        print(f"py-spy, own samples (GIL held) of deliver's pass, {size} octets:")
        print(top_of(Path(profile)))
    return Cost(
        count / figures["seconds"],
        figures["cpu"] / count * 1000,
        (sink_after - sink_before) / count * 1000,
    )


def _line(cost: Cost) -> str:
    return (
        f"{cost.rate:.0f} msg/s, CPU ms a message: deliver {cost.deliver:.3f}, sink {cost.sink:.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, help="messages a run (2000 of 1 KiB, 500 of 100 KiB)")
    parser.add_argument(
        "--size", type=int, action="append", help="message octets (repeatable; 1 KiB and 100 KiB)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians reported (3)")
    parser.add_argument(
        "--src", type=Path, action="append", help="the package's source tree (repeatable)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--root-fs", action="store_true", help="no journaled ext4: --workdir's")
    parser.add_argument(
        "--profile", default="", help="py-spy deliver's pass (collapsed stacks) into this file"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a line for deliver's [deliver] table, e.g. 'concurrency = 8' (repeatable)",
    )
    parser.add_argument(
        "--arriving",
        action="store_true",
        help="the messages come after deliver started, as in the end-to-end cases"
        " (never tried: sent with no delivery state written); by default they were"
        " queued before, and each gets its state recorded first",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.directory = args.child
        args.size = args.size[0]
        return child(args)
    sizes: list[int] = args.size or [KIB, 100 * KIB]
    sources: list[Path] = [src.resolve() for src in args.src or [SRC]]
    with contextlib.ExitStack() as stack:
        if args.root_fs:
            where = describe(args.workdir)
            print(f"deliver_cpu: on the root file system as asked: {where.describe()}")
        else:
            try:
                where = stack.enter_context(journaled(args.workdir))
            except MountUnavailable as exc:
                print(f"deliver_cpu: no journaled file system: {exc}; --root-fs", file=sys.stderr)
                return 69
            print(f"deliver_cpu: queue on {where.describe()}")
        top = Path(tempfile.mkdtemp(prefix="deliver-cpu-", dir=where.path))
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        sink = LmtpSink(top / "sink")
        sink.start()
        stack.callback(sink.stop)
        for size in sizes:
            count = args.count or (2000 if size <= 10 * KIB else 500)
            print(f"-- {count} messages of {size} octets")
            costs: dict[Path, list[Cost]] = {src: [] for src in sources}
            for _ in range(args.repeat):
                for src in sources:
                    cost = measure(
                        top,
                        src,
                        sink,
                        count=count,
                        size=size,
                        profile=args.profile,
                        settings=args.set or [],
                        arriving=args.arriving,
                    )
                    costs[src].append(cost)
                    where_from = f"{src}: " if len(sources) > 1 else ""
                    print(where_from + _line(cost), flush=True)
            for src, runs in costs.items():
                median = Cost(
                    statistics.median(r.rate for r in runs),
                    statistics.median(r.deliver for r in runs),
                    statistics.median(r.sink for r in runs),
                )
                named = f" {src}" if len(sources) > 1 else ""
                print(f"median{named} ({size} octets): " + _line(median), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
