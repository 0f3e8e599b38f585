"""CPU time per message of the milter client alone, against OpenDKIM, for A/B runs of two trees.

No SMTP server around it: a script drives ``mmdf_smtp.milter.client.Milter``
under uvloop, one session after another, against one OpenDKIM (signing
with RSA 2048, as in ``bench/run.py --milter opendkim``) over its Unix
socket, with ``reuse = true``, and reads its own CPU time
(``time.process_time``); OpenDKIM's comes from /proc before and after.
A session a message by default, one session for them all with ``--reuse``::

    .venv/bin/python bench/milter_client_cpu.py --baseline /tmp/before/src
    .venv/bin/python bench/milter_client_cpu.py --baseline /tmp/before/src --reuse

The trees run in turn, alternating, each in a fresh interpreter with its
``src`` first on the path; the last lines give the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu import tree_cpu_seconds  # noqa: E402
from load import SENDER  # noqa: E402
from run import signing_milter  # noqa: E402
from servers import SRC, unique_name  # noqa: E402

WARM_UP = 50

# Run in the child interpreter: argv is socket, count, "connect" or "reuse", sender, warm-up.
DRIVER = r"""
import sys, time
import uvloop
from mmdf_smtp.milter.client import Milter
from mmdf_smtp.milter.config import MilterConfig

socket_, count, mode, sender = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
WARM_UP = int(sys.argv[5])
HEADERS = [
    ("Received", " from client.example ([127.0.0.1])\r\n\tby mx.example with ESMTP id 4C3F2A;"
     "\r\n\tMon, 1 Jan 2024 00:00:00 +0000"),
    ("From", f" <{sender}>"), ("To", " <bob@example.net>"), ("Subject", " test"),
    ("Date", " Mon, 1 Jan 2024 00:00:00 +0000"), ("Message-ID", " <1@client.bench>"),
]
BODY = (b"x" * 70 + b"\r\n") * 13
MACROS = {"j": "mx.example", "i": "4C3F2A", "{daemon_name}": "smtpd",
          "_": "client.example [127.0.0.1]", "{client_addr}": "127.0.0.1",
          "{client_name}": "client.example", "{client_port}": "40000",
          "{mail_addr}": sender, "{rcpt_addr}": "bob@example.net"}
config = MilterConfig.from_table({"socket": socket_, "reuse": True})

async def message(milter, first):
    if first:
        await milter.connect(hostname="localhost", address="127.0.0.1", port=4000, macros=MACROS)
        await milter.helo("client.example", MACROS)
    await milter.mail(f"<{sender}>", (), MACROS)
    await milter.rcpt("<bob@example.net>", (), MACROS)
    await milter.data(MACROS)
    verdict = await milter.message(HEADERS, [BODY], MACROS)
    assert verdict.modifications, verdict  # signed

async def run(n):
    if mode == "connect":
        for _ in range(n):
            milter = Milter(config)
            await message(milter, True)
            await milter.quit()
    else:
        milter = Milter(config)
        await message(milter, True)
        for _ in range(n - 1):
            await message(milter, False)
        await milter.quit()

async def main():
    await run(WARM_UP)
    started = time.process_time()
    await run(count)
    print((time.process_time() - started) / count * 1000)

uvloop.run(main())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=800, help="messages a run (800)")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each tree (4)")
    parser.add_argument("--reuse", action="store_true", help="one session, many messages")
    parser.add_argument("--src", type=Path, default=SRC, help="the tree under test")
    parser.add_argument("--baseline", type=Path, required=True, help="the tree to compare")
    args = parser.parse_args()
    trees = {"mmdf-smtp": args.src, "baseline": args.baseline}
    mode = "reuse" if args.reuse else "connect"
    sender = SENDER.decode()
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    top = Path(tempfile.mkdtemp(prefix="mmdf-milter-client-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        with signing_milter(top / unique_name("opendkim"), unix=True) as milter:
            assert milter.process is not None
            for round_ in range(args.rounds):
                order = list(trees.items())
                if round_ % 2:
                    order.reverse()
                for name, src in order:
                    before = tree_cpu_seconds(milter.process.pid)
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            DRIVER,
                            milter.socket,
                            str(args.count),
                            mode,
                            sender,
                            str(WARM_UP),
                        ],
                        env={**os.environ, "PYTHONPATH": str(src)},
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    after = tree_cpu_seconds(milter.process.pid)
                    client = float(done.stdout)
                    opendkim = (after - before) / (args.count + WARM_UP) * 1000
                    figures[name].append((client, opendkim))
                    print(f"{name}: client {client:.3f} ms, opendkim {opendkim:.3f} ms", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    for name, results in figures.items():
        client, opendkim = (statistics.median(column) for column in zip(*results, strict=True))
        print(
            f"median {name} ({mode}): client {client:.3f} ms,"
            f" opendkim {opendkim:.3f} ms CPU a message"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
