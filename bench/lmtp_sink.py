"""An LMTP server that accepts every message and keeps nothing: the end-to-end cases' next hop.

    python bench/lmtp_sink.py HOST PORT

Prints "listening on HOST:PORT" once bound.  It stands for a mail store
infinitely fast, the same for every server under test, so that what is
measured is the server's delivery, not the store.  Every recipient of a
message gets its own 250 after the data (RFC 2033 4.2).  A client may ask
``XSTAT``: "250 <recipients delivered> <time.time() of the last 250>",
which the bench reads to know when the last message was delivered.
PIPELINING is offered (RFC 2920): commands are answered in the order
they came, however they were batched.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import cast

GREETING = b"220 sink.bench LMTP\r\n"
LHLO_REPLY = b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
END_OF_DATA = b"\r\n.\r\n"


class Counter:
    def __init__(self) -> None:
        self.delivered = 0
        self.last = 0.0


class Session(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buffer = bytearray()
        self.in_data = False
        self.recipients = 0
        # The data is searched for CRLF "." CRLF; seeded with a CRLF, an
        # empty message's lone "." line is found the same way.
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        out = bytearray()
        self.buffer += data
        while self.buffer:
            if self.in_data:
                window = self.tail + bytes(self.buffer)
                end = window.find(END_OF_DATA)
                if end < 0:
                    self.tail = window[-4:]
                    self.buffer.clear()
                    break
                consumed = end + len(END_OF_DATA) - len(self.tail)
                del self.buffer[:consumed]
                self.in_data = False
                out += b"250 2.0.0 delivered\r\n" * self.recipients
                self.counter.delivered += self.recipients
                self.counter.last = time.time()
                self.recipients = 0
                continue
            newline = self.buffer.find(b"\n")
            if newline < 0:
                break
            line = bytes(self.buffer[: newline + 1]).rstrip(b"\r\n")
            del self.buffer[: newline + 1]
            verb = line[:4].upper()
            if verb == b"LHLO":
                out += LHLO_REPLY
            elif verb == b"MAIL":
                self.recipients = 0
                out += b"250 2.1.0 ok\r\n"
            elif verb == b"RCPT":
                self.recipients += 1
                out += b"250 2.1.5 ok\r\n"
            elif verb == b"DATA" and self.recipients:
                self.in_data = True
                self.tail = b"\r\n"
                out += b"354 go ahead\r\n"
            elif verb == b"DATA":
                out += b"503 5.5.1 no valid recipients\r\n"
            elif verb in (b"RSET", b"NOOP"):
                self.recipients = 0 if verb == b"RSET" else self.recipients
                out += b"250 2.0.0 ok\r\n"
            elif verb == b"QUIT":
                out += b"221 2.0.0 bye\r\n"
                self.transport.write(bytes(out))
                self.transport.close()
                return
            elif line.upper() == b"XSTAT":
                out += f"250 {self.counter.delivered} {self.counter.last!r}\r\n".encode()
            else:
                out += b"500 5.5.2 unknown command\r\n"
        if out:
            self.transport.write(bytes(out))


async def serve(host: str, port: int) -> None:
    counter = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Session(counter), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port))
    else:
        uvloop.run(serve(host, port))


if __name__ == "__main__":
    main()
