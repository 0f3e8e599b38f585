"""aiosmtpd with mmdf-smtp's durability: 250 only once the message is on disk.

    python aiosmtpd_spool.py HOST PORT SPOOL

Each message is written to SPOOL/tmp, fsynced, renamed into SPOOL/queue and
the directory fsynced, in the event loop's thread pool (as a Python developer
would, to keep the loop free), before the handler returns ``250``.  It runs
on uvloop when it is installed, the loop mmdf-smtp's daemon uses.  aiosmtpd
does not offer PIPELINING, so clients talk to it in lock-step.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class SpoolHandler:
    def __init__(self, spool: Path) -> None:
        self.tmp = spool / "tmp"
        self.queue = spool / "queue"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(parents=True, exist_ok=True)
        self.counter = itertools.count()

    def _store(self, envelope: Envelope) -> None:
        name = f"{os.getpid()}.{next(self.counter)}"
        content = envelope.original_content or b""
        header = f"{envelope.mail_from}\t{','.join(envelope.rcpt_tos)}\n".encode()
        fd = os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, header)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp / name, self.queue / name)
        directory = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        await asyncio.get_running_loop().run_in_executor(None, self._store, envelope)
        return "250 2.0.0 Message accepted for delivery"


async def serve(host: str, port: int, spool: Path) -> None:
    loop = asyncio.get_running_loop()
    handler = SpoolHandler(spool)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aio.bench", data_size_limit=52428800),
        host,
        port,
        backlog=128,
    )
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    host, port, spool = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port, spool))
    else:
        uvloop.run(serve(host, port, spool))


if __name__ == "__main__":
    main()
