"""How the milter client writes: what gets no answer goes with the next write, in bounds."""

from __future__ import annotations

import asyncio

from milterpeer import MilterPeer
from mmdf_smtp.milter import DefaultAction, Milter, MilterConfig, codec
from mmdf_smtp.milter.codec import ProtocolFlag


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
