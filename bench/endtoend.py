"""The whole mail system: received, queued, and delivered to a Maildir or an LMTP next hop.

Each server gets the same messages for the same mailbox, a@example.org:

* "maildir": mmdf-smtp's smtpd and its deliver (started as an
  administrator runs it, ``deliver -c config``) writing Maildir/new;
  Postfix's smtpd, cleanup, qmgr and virtual(8) writing the same.
* "lmtp": the same, with the mailbox's domain not local, every message
  sent on to one LMTP sink (bench/lmtp_sink.py): mmdf-smtp's deliver with
  ``next_hop = "lmtp:..."``, Postfix's lmtp(8).
* "receive": smtpd alone, the queue kept (mmdf-smtp) or handed to the
  discard transport (Postfix), as the receiving cases of run.py.

A case's rate runs from its first connection to its last message
delivered: the last file linked into Maildir/new (its ctime), the last
250 the sink gave.  Each case first sends a warm-up of its own, waits for
it to be delivered, and only then starts the clock.  While a case runs the
queue's length is sampled (mmdf-smtp's queue/, Postfix's incoming, active
and deferred queues) and its peak kept.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from load import HOST, LoadError, pipelining_client, smtp_source
from servers import HERE, Mmdf, Postfix, Server, _terminate, _wait_for_line

KIB = 1024
MIB = 1024 * KIB
DELIVERY_TIMEOUT = 900.0
SAMPLE_INTERVAL = 0.05
MAILBOX_USER = "nobody"  # who owns the Maildirs: deliver's user, virtual(8)'s uid


class LmtpSink:
    """bench/lmtp_sink.py in a process of its own, and what it has delivered."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "lmtp_sink.py"), HOST, "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        line = _wait_for_line(
            self.process.stdout, b"listening on", self.directory / "sink.log", "lmtp sink"
        )
        self.port = int(line.strip().rsplit(b":", 1)[1])

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)

    def stat(self) -> tuple[int, float]:
        """Recipients delivered so far, and the wall-clock time of the last one."""
        with socket.create_connection((HOST, self.port), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"XSTAT\r\nQUIT\r\n")
            fields = reader.readline().split()
        return int(fields[1]), float(fields[2])


class MmdfMail(Mmdf):
    """mmdf-smtp's smtpd and, beside it, deliver as a service on the same spool."""

    def __init__(self, directory: Path, maxconnects: int, *, next_hop: str | None = None) -> None:
        super().__init__(directory, maxconnects)
        self.next_hop = next_hop
        self.mail = directory / "mail"
        self.deliver: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        # Local mail is delivered at commit time, as the default has it.
        text = (
            super()
            .config_text()
            .replace("deliver_at_commit = false\n", "deliver_at_commit = true\n")
        )
        if self.next_hop is None:
            return text + f'maildir = "{self.mail}/{{user}}/Maildir"\n'
        # The mailbox's domain is not local: every message goes to the next hop.
        text = text.replace('local_domains = ["example.org"]', 'local_domains = ["local.bench"]')
        return text + f'\n[deliver]\nnext_hop = "{self.next_hop}"\n'

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        mailbox_base(self.mail)
        super().start()
        self.deliver = subprocess.Popen(
            [sys.executable, "-m", "mmdf_smtp.cli.deliver", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.environment(),
        )
        assert self.deliver.stderr is not None
        _wait_for_line(
            self.deliver.stderr, b"waiting for messages", self.directory / "deliver.log", "deliver"
        )

    def settle(self) -> None:
        """Nothing to clear: deliver empties the queue."""

    def stop(self) -> None:
        if self.deliver is not None:
            _terminate(self.deliver)
        super().stop()

    def alive(self) -> bool:
        return super().alive() and self.deliver is not None and self.deliver.poll() is None

    def queue_length(self) -> int:
        try:
            return len(os.listdir(self.spool / "queue"))
        except FileNotFoundError:
            return 0


def mailbox_base(directory: Path) -> None:
    """The folder the Maildirs go in, owned by their user (deliver's, virtual(8)'s)."""
    directory.mkdir(parents=True, exist_ok=True)
    entry = pwd.getpwnam(MAILBOX_USER)
    os.chown(directory, entry.pw_uid, entry.pw_gid)


def virtual_maps(base: Path) -> str:
    """main.cf for virtual(8): a@example.org's Maildir under ``base``, as ``MAILBOX_USER``."""
    entry = pwd.getpwnam(MAILBOX_USER)
    return f"""\
virtual_mailbox_domains = example.org
virtual_mailbox_base = {base}
virtual_mailbox_maps = inline:{{ a@example.org=a/Maildir/ }}
virtual_uid_maps = static:{entry.pw_uid}
virtual_gid_maps = static:{entry.pw_gid}
virtual_minimum_uid = 1
virtual_mailbox_limit = 0
"""


class PostfixMail(Postfix):
    """A private Postfix delivering with virtual(8) to a Maildir, or with lmtp(8) to a sink."""

    def __init__(self, directory: Path, maxproc: int, *, lmtp_port: int | None = None) -> None:
        self.mail = directory / "mail"
        if lmtp_port is None:
            super().__init__(directory, maxproc, transport="virtual", extra=virtual_maps(self.mail))
        else:
            super().__init__(directory, maxproc, transport=f"lmtp:inet:{HOST}:{lmtp_port}")

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        mailbox_base(self.mail)
        super().start()

    def settle(self) -> None:
        """Nothing to wait for: the case waited for every delivery."""

    def queue_length(self) -> int:
        queue = self.directory / "queue"
        return sum(
            len(files)
            for name in ("maildrop", "incoming", "active", "deferred")
            for _, _, files in os.walk(queue / name)
        )


def queue_length(server: Server) -> int:
    if isinstance(server, MmdfMail | PostfixMail):
        return server.queue_length()
    return 0


class QueueSampler:
    """The peak of a server's queue length, sampled in a thread while a case runs."""

    def __init__(self, length: Callable[[], int]) -> None:
        self.length = length
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.length())
            if self._stop.wait(SAMPLE_INTERVAL):
                return

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class Maildir:
    """a@example.org's Maildir/new under a server's mail folder."""

    def __init__(self, base: Path) -> None:
        self.new = base / "a" / "Maildir" / "new"

    def count(self) -> int:
        try:
            return len(os.listdir(self.new))
        except FileNotFoundError:
            return 0

    def last(self) -> float:
        """When the last message was linked into new/ (the newest ctime)."""
        latest = 0.0
        with os.scandir(self.new) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    latest = max(latest, entry.stat().st_ctime)
        return latest

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.new) as entries:
            for entry in entries:
                os.unlink(entry.path)


@dataclass(frozen=True)
class Flow:
    """``count`` messages of ``size`` octets to ``sink``, after ``warmup`` not measured.

    ``sink`` is "maildir", "lmtp" or "receive"; ``load`` is "connect"
    (smtp-source, a connection per message) or "pipeline" (our client,
    reusing connections).
    """

    sink: str
    size: int
    clients: int
    load: str
    count: int
    warmup: int
    variant: bool = False  # also run mmdf-smtp without uvloop (mmdf-smtp+asyncio)

    @property
    def name(self) -> str:
        size = f"{self.size // MIB} MiB" if self.size >= MIB else f"{self.size // KIB} KiB"
        return f"{self.sink} {size} x{self.clients} {self.load}"

    def send(self, port: int, count: int) -> None:
        if self.load == "pipeline":
            run = pipelining_client(port, size=self.size, count=count, clients=self.clients)
            if run.messages != count:
                raise LoadError(f"{run.messages} of {count} messages accepted")
        else:
            smtp_source(port, size=self.size, count=count, sessions=self.clients, reuse=False)


def flows(smoke: bool) -> list[Flow]:
    """The end-to-end and sustained cases; in smoke mode a handful of tiny ones."""
    if smoke:
        return [
            Flow("receive", KIB, 2, "connect", 10, 2, variant=True),
            Flow("maildir", KIB, 2, "connect", 10, 2),
            Flow("maildir", 100 * KIB, 2, "pipeline", 4, 1),
            Flow("lmtp", KIB, 2, "pipeline", 10, 2),
            Flow("lmtp", 100 * KIB, 2, "connect", 4, 1),
        ]
    found = [Flow("receive", KIB, 10, "connect", 3000, 500, variant=True)]
    for sink in ("maildir", "lmtp"):
        for load in ("connect", "pipeline"):
            for size, count, warmup in ((KIB, 3000, 500), (100 * KIB, 1000, 150)):
                found.extend(Flow(sink, size, clients, load, count, warmup) for clients in (10, 50))
    return found


@dataclass
class Delivered:
    """One case on one server: the whole system's rate and the receiving half's."""

    messages: int
    seconds: float  # first connection to last delivery
    accept_seconds: float  # first connection to the load's last 250
    peak_queue: int | None
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept_seconds if self.accept_seconds > 0 else 0.0


class Progress:
    """How many messages a server has delivered so far, and when the last one went."""

    def __init__(self, server: Server, sink: LmtpSink | None) -> None:
        self.server = server
        self.sink = sink
        self.maildir = Maildir(server.mail) if isinstance(server, MmdfMail | PostfixMail) else None

    def count(self) -> int:
        if self.sink is not None:
            return self.sink.stat()[0]
        assert self.maildir is not None
        return self.maildir.count()

    def last(self) -> float:
        if self.sink is not None:
            return self.sink.stat()[1]
        assert self.maildir is not None
        return self.maildir.last()

    def wait(self, target: int, started: float) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while self.count() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.count()} of {target} delivered after {DELIVERY_TIMEOUT:.0f} s"
                )
            if not self.server.alive():
                raise LoadError(f"{self.server.name} died while delivering")
            time.sleep(0.02 if time.time() - started < 5 else 0.1)

    def reset(self) -> None:
        if self.maildir is not None:
            self.maildir.clear()


def measure_flow(server: Server, flow: Flow, sink: LmtpSink | None) -> Delivered:
    """A warm-up, delivered and cleared; then the measured messages, end to end."""
    try:
        if flow.sink == "receive":
            if flow.warmup:
                flow.send(server.port, flow.warmup)
                server.settle()
            started = time.time()
            flow.send(server.port, flow.count)
            accepted = time.time()
            server.settle()
            os.sync()
            return Delivered(flow.count, accepted - started, accepted - started, None)
        progress = Progress(server, sink)
        if flow.warmup:
            base = progress.count()
            flow.send(server.port, flow.warmup)
            progress.wait(base + flow.warmup, time.time())
            progress.reset()
        os.sync()
        base = progress.count()
        with QueueSampler(lambda: queue_length(server)) as sampler:
            started = time.time()
            flow.send(server.port, flow.count)
            accepted = time.time()
            progress.wait(base + flow.count, started)
            finished = progress.last()
        progress.reset()
        os.sync()
        return Delivered(flow.count, finished - started, accepted - started, sampler.peak)
    except (LoadError, OSError, TimeoutError) as exc:
        return Delivered(0, 0.0, 0.0, None, f"{type(exc).__name__}: {exc}")


def mail_servers(
    top: Path, unique: Callable[[str], str], sink: LmtpSink
) -> dict[str, list[Server]]:
    """Each sink's servers, mmdf-smtp first; receiving also with mmdf-smtp+asyncio (no uvloop).

    ``sink`` must be started: the LMTP pair is given its port.
    """
    return {
        "receive": [
            Mmdf(top / unique("mmdf"), 100),
            Postfix(top / unique("postfix"), maxproc=100),
            Mmdf(top / unique("mmdf-asyncio"), 100, name="mmdf-smtp+asyncio", uvloop=False),
        ],
        "maildir": [
            MmdfMail(top / unique("mmdf-maildir"), 100),
            PostfixMail(top / unique("postfix-maildir"), 100),
        ],
        "lmtp": [
            MmdfMail(top / unique("mmdf-lmtp"), 100, next_hop=f"lmtp:{HOST}:{sink.port}"),
            PostfixMail(top / unique("postfix-lmtp"), 100, lmtp_port=sink.port),
        ],
    }
