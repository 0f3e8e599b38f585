"""How the milter client writes: what gets no answer goes with the next write, in bounds."""

from __future__ import annotations

import asyncio
import logging

import pytest

from milterpeer import MilterPeer
from mmdf_smtp.milter import codec
from mmdf_smtp.milter.client import Milter
from mmdf_smtp.milter.codec import ProtocolFlag
from mmdf_smtp.milter.config import DefaultAction, MilterConfig


def test_unanswered_body_chunks_are_not_held_past_a_chunk() -> None:
    """With SMFIP_NR_BODY every chunk is unanswered: they still leave as they fill."""

    async def main() -> None:
        async with MilterPeer(protocol=ProtocolFlag.NR_BODY) as peer:
            milter = Milter(MilterConfig(socket=peer.socket, default_action=DefaultAction.REJECT))
            await milter.connect(hostname="c", address="127.0.0.1", port=2)
            await milter.mail("<a@x>")
            body = bytes(range(256)) * 1024  # four chunks' worth and a bit
            held = []
            for start in range(0, len(body), 10_000):
                assert (await milter.body(body[start : start + 10_000])).is_continue
                held.append(len(milter._unsent))  # the bound under test
            assert (await milter.end_of_message()).is_continue
            await milter.quit()
        assert max(held) < 2 * codec.CHUNK_SIZE, held
        chunks = [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)]
        assert b"".join(chunks) == body
        assert isinstance(peer.commands()[-2], codec.EndOfMessage)

    asyncio.run(main())


def test_a_milter_that_stops_reading_costs_the_content_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write the milter does not take waits at most content_timeout, then the default action."""
    skip_all_but_headers = (
        ProtocolFlag.NOCONNECT
        | ProtocolFlag.NOHELO
        | ProtocolFlag.NOMAIL
        | ProtocolFlag.NORCPT
        | ProtocolFlag.NODATA
        | ProtocolFlag.NOEOH
        | ProtocolFlag.NOBODY
        | ProtocolFlag.NOUNKNOWN
    )

    async def main() -> None:
        stop = asyncio.Event()

        async def milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            incoming = codec.command_reader()
            while (command := incoming.next_event()) is codec.NEED_DATA:
                incoming.receive_data(await reader.read(65536))
            assert isinstance(command, codec.Negotiate)
            answer = codec.Negotiate(
                version=6, actions=codec.ActionFlag(0), protocol=skip_all_but_headers
            )
            writer.write(codec.encode(answer))
            await stop.wait()  # and never read again
            writer.close()

        server = await asyncio.start_server(milter, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = MilterConfig(
            socket=f"inet:127.0.0.1:{port}",
            default_action=DefaultAction.REJECT,
            content_timeout=0.5,
        )
        milter_client = Milter(config)
        assert (await milter_client.connect(hostname="c", address="127.0.0.1", port=2)).is_continue
        assert (await milter_client.mail("<a@x>")).is_continue
        # Far more than the socket's buffers and the transport's high-water mark.
        fields = [(f"X-Field-{n}", " " + "v" * 200) for n in range(20_000)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        verdict = await milter_client.message(fields, [b"body\r\n"])
        waited = loop.time() - started
        stop.set()
        server.close()
        await server.wait_closed()
        assert verdict.action.value == "reject"
        assert milter_client.failed
        assert 0.4 < waited < 5, waited

    with caplog.at_level(logging.WARNING, "mmdf_smtp.milter"):
        asyncio.run(main())
    [record] = caplog.records
    assert "content: no progress writing for 0.5 s" in record.getMessage()
