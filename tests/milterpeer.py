"""A scripted milter (the filter side of the protocol) for the client's wire tests.

An asyncio server on 127.0.0.1, ephemeral port, that speaks the filter side
with the package's own codec.  Each test says what to answer at each
stage::

    async with MilterPeer(replies={b"R": [codec.Reject()]}) as peer:
        config = MilterConfig(socket=peer.socket, ...)

``replies`` maps a command code (``b"C"``, ``b"H"``, ``b"M"``, ``b"R"``,
``b"T"``, ``b"L"``, ``b"N"``, ``b"B"``, ``b"E"``, ``b"U"``) to what to send
when it arrives: a sequence of items, or a function of the command giving
one.  An item is a response, raw ``bytes`` (garbage), :data:`HANG` (answer
nothing, keep the connection) or :data:`CLOSE` (close the connection).
Unlisted stages are answered CONTINUE, or not at all when the negotiated
flags say the MTA waits for no answer.  Everything received is kept in
``received`` (per SMTP session in ``sessions``), so a test can check the
macros and commands exactly.

A QUIT_NC ends a session but not its connection: the next session the MTA
starts on it is a new entry of ``sessions`` with the same ``connection``
number, as libmilter keeps a connection's thread for it.  With
``quit_nc=False`` the peer closes the connection at QUIT_NC instead, as a
milter that does not support it would.  Connections waiting for their next
session are closed when the peer stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from mmdf_smtp.milter import codec
from mmdf_smtp.milter.client import close_idle_connections
from mmdf_smtp.milter.codec import ActionFlag, ProtocolFlag


class Act(enum.Enum):
    HANG = "hang"
    CLOSE = "close"


HANG = Act.HANG
CLOSE = Act.CLOSE


@dataclass(frozen=True)
class Delay:
    """Wait this long before the next item: a slow milter (never used to synchronise)."""

    seconds: float


Item = codec.Response | bytes | Act | Delay
Replies = Sequence[Item] | Callable[[codec.Command], Sequence[Item]]

_NO_REPLY_FLAG = {
    b"C": ProtocolFlag.NR_CONN,
    b"H": ProtocolFlag.NR_HELO,
    b"M": ProtocolFlag.NR_MAIL,
    b"R": ProtocolFlag.NR_RCPT,
    b"T": ProtocolFlag.NR_DATA,
    b"L": ProtocolFlag.NR_HDR,
    b"N": ProtocolFlag.NR_EOH,
    b"B": ProtocolFlag.NR_BODY,
    b"U": ProtocolFlag.NR_UNKN,
}

ALL_ACTIONS = ActionFlag(0x1FF)
NO_FLAGS = ProtocolFlag(0)


@dataclass
class Session:
    received: list[codec.Command] = field(default_factory=list)
    closed_by_mta: bool = False
    connection: int = 0  # which connection it came on, counted from 0
    over: bool = False  # ended: QUIT, QUIT_NC, or its connection closed


class MilterPeer:
    def __init__(
        self,
        *,
        replies: dict[bytes, Replies] | None = None,
        version: int = 6,
        actions: ActionFlag = ALL_ACTIONS,
        protocol: ProtocolFlag = NO_FLAGS,
        macro_lists: tuple[tuple[codec.MacroStage, tuple[str, ...]], ...] = (),
        negotiate_reply: Sequence[Item] | None = None,
        host: str = "127.0.0.1",
        unix_path: str | None = None,
        quit_nc: bool = True,
        nagle: bool = False,
    ) -> None:
        self.host = host
        self.unix_path = unix_path
        self.replies = replies or {}
        self.negotiation = codec.Negotiate(
            version=version, actions=actions, protocol=protocol, macro_lists=macro_lists
        )
        self.negotiate_reply = negotiate_reply
        self.quit_nc = quit_nc
        # Nagle's algorithm on, as libmilter leaves it: a write waits for
        # the acknowledgement of the one before.
        self.nagle = nagle
        self.sessions: list[Session] = []
        self.connections = 0
        self._parked: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # after a QUIT_NC
        self._stopping = False
        self.ended = asyncio.Event()  # set when a session's connection is over
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def socket(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        if ":" in self.host:
            return f"inet6:[{self.host}]:{self.port}"
        return f"inet:{self.host}:{self.port}"

    @property
    def received(self) -> list[codec.Command]:
        return [c for s in self.sessions for c in s.received]

    def commands(self) -> list[codec.Command]:
        """What was received, without the macro definitions."""
        return [c for c in self.received if not isinstance(c, codec.DefineMacros)]

    def macros(self, for_code: bytes) -> list[dict[str, str]]:
        return [
            dict(c.macros)
            for c in self.received
            if isinstance(c, codec.DefineMacros) and c.for_code == for_code
        ]

    async def __aenter__(self) -> MilterPeer:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._serve, self.unix_path)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        # The MTA's kept connections first, as a worker closes them at
        # shutdown: each writes what ends its last session (QUIT_NC), which
        # the conversation below then reads.
        close_idle_connections()
        self._server.close()
        self._stopping = True
        for writer in list(self._parked.values()):
            writer.close()  # the conversation reads end of file and ends
        # Each conversation ends when the MTA closes its end; give the
        # last packets time to be read, then stop what is left.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def drop_kept_connections(self) -> None:
        """Close the connections kept after QUIT_NC, and wait until they are over."""
        parked = list(self._parked)
        for writer in self._parked.values():
            writer.close()
        if parked:
            await asyncio.wait(parked)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if self.nagle:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        connection = self.connections
        self.connections += 1
        session = Session(connection=connection)
        self.sessions.append(session)
        self.session_started(session, writer)
        try:
            await self._converse(session, reader, writer)
        finally:
            self._tasks.discard(task)
            self._parked.pop(task, None)
            writer.close()
            for ending in self.sessions:
                if ending.connection == connection and not ending.over:
                    ending.over = True
                    self.session_ended(ending)
            self.ended.set()

    def session_started(self, session: Session, writer: asyncio.StreamWriter) -> None:
        """A hook: an SMTP session's conversation begins on ``writer``'s connection."""

    def session_ended(self, session: Session) -> None:
        """A hook: an SMTP session's conversation is over (its connection may go on)."""

    async def _converse(
        self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        incoming = codec.command_reader()
        protocol = ProtocolFlag(0)
        task = asyncio.current_task()
        assert task is not None
        while True:
            command = incoming.next_event()
            if command is codec.NEED_DATA:
                if session.closed_by_mta:  # after QUIT_NC: parked until the next session
                    if self._stopping:
                        return
                    self._parked[task] = writer
                    self.ended.set()
                data = await reader.read(65536)
                self._parked.pop(task, None)
                incoming.receive_data(data)
                continue
            if command is codec.CLOSED:
                session.closed_by_mta = True
                return
            assert not isinstance(command, codec.Signal)
            if session.closed_by_mta:
                session = Session(connection=session.connection)
                self.sessions.append(session)
                self.session_started(session, writer)
            session.received.append(command)
            items: Sequence[Item]
            if isinstance(command, codec.Negotiate):
                protocol = self.negotiation.protocol
                items = self.negotiate_reply or [self.negotiation]
            elif isinstance(command, codec.DefineMacros | codec.Abort):
                continue
            elif isinstance(command, codec.QuitNewConnection) and self.quit_nc:
                session.closed_by_mta = session.over = True
                self.session_ended(session)
                continue
            elif isinstance(command, codec.Quit | codec.QuitNewConnection):
                session.closed_by_mta = True
                return
            elif command.code in _NO_REPLY_FLAG and protocol & _NO_REPLY_FLAG[command.code]:
                continue
            else:
                script = self.replies.get(command.code, [codec.Continue()])
                items = script(command) if callable(script) else script
            for item in items:
                if item is HANG:
                    await writer.drain()
                    await reader.read()  # until the MTA gives up and closes
                    session.closed_by_mta = True
                    return
                if item is CLOSE:
                    return
                if isinstance(item, Delay):
                    await writer.drain()
                    await asyncio.sleep(item.seconds)
                    continue
                writer.write(item if isinstance(item, bytes) else codec.encode(item))
            await writer.drain()
