"""The TCP channel between rank 0 and ranks on other nodes: framing, both directions, EOF, peer watching."""

from __future__ import annotations

import asyncio
import socket
from array import array

import pytest

from baleen.actors.channel import ChannelClosed
from baleen.actors.dp import ControlServer, SocketChannel, connect, watch_peers
from baleen.messages import SeqRow, Shutdown, StepPlan, StepResult, WorkerReady


def ready(rank: int) -> WorkerReady:
    return WorkerReady(rank=rank, num_pages=8, page_size=4, max_context_len=64, max_num_slots=2)


async def pair(server: ControlServer, rank: int) -> tuple[SocketChannel, SocketChannel]:
    """(rank 0's end, the remote rank's end) of one connection."""
    remote = await connect("127.0.0.1", server.port, 5.0)
    await remote.send(ready(rank))
    return (await server.accept(1, 5.0))[rank], remote


def test_frames_travel_both_ways_and_eof_is_seen() -> None:
    async def main() -> None:
        server = await ControlServer.start("127.0.0.1")
        local, remote = await pair(server, 3)
        assert local.peer == "rank 3"
        big = array("i", range(300_000)).tobytes()  # 1.2 MB: many TCP reads for one frame
        plans = [StepPlan(step_id=i, rows=[SeqRow(i, 0, len(big) // 4, big, True)]) for i in range(3)]
        for p in plans:
            local.send_nowait(p)
        got = [await remote.recv() for _ in plans]
        assert got == plans
        await remote.send(StepResult(step_id=0, token_ids=b"\x01\x00\x00\x00"))
        assert isinstance(await local.recv(), StepResult)
        assert local.recv_nowait() == []
        await local.send(Shutdown("bye"))
        assert isinstance(await remote.recv(), Shutdown)
        assert local.sent_shutdown and remote.received_shutdown and not local.received_shutdown
        remote.close()
        await asyncio.wait_for(local.wait_lost(), 5.0)
        with pytest.raises(ChannelClosed):
            local.recv_nowait()
        with pytest.raises(ChannelClosed):
            await local.send(Shutdown())
        server.close()

    asyncio.run(main())


def test_watch_peers_raises_only_on_an_unexpected_disconnect() -> None:
    async def main() -> None:
        server = await ControlServer.start("127.0.0.1")
        a_local, a_remote = await pair(server, 1)
        b_local, b_remote = await pair(server, 2)
        watcher = asyncio.ensure_future(watch_peers({1: a_local, 2: b_local}))
        await a_local.send(Shutdown())
        a_remote.close()  # expected: rank 1 was told to stop
        await asyncio.sleep(0.05)
        assert not watcher.done()
        b_remote.close()  # rank 2 vanished on its own
        with pytest.raises(RuntimeError, match="rank 2 on another node disconnected"):
            await asyncio.wait_for(watcher, 5.0)
        server.close()

    asyncio.run(main())


def test_timeouts_name_what_is_missing() -> None:
    async def main() -> None:
        server = await ControlServer.start("127.0.0.1")
        with pytest.raises(TimeoutError, match="only 0 of the 2 ranks"):
            await server.accept(2, 0.2)
        server.close()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # nothing listens there
        with pytest.raises(TimeoutError, match="could not connect to rank 0"):
            await connect("127.0.0.1", port, 0.3)

    asyncio.run(main())


def test_stray_connections_are_dropped_while_ranks_connect() -> None:
    async def main() -> None:
        server = await ControlServer.start("127.0.0.1")
        _, junk = await asyncio.open_connection("127.0.0.1", server.port)
        junk.write(b"\xff\xff\x00\x00garbage that is no frame")  # a port scanner, say
        silent = await connect("127.0.0.1", server.port, 5.0)  # connects but never says who it is
        early = await connect("127.0.0.1", server.port, 5.0)
        await early.send(StepResult(step_id=0, token_ids=b""))  # not a WorkerReady: dropped
        remote = await connect("127.0.0.1", server.port, 5.0)
        await remote.send(ready(5))
        ranks = await server.accept(1, 5.0)
        assert list(ranks) == [5] and ranks[5].peer == "rank 5"
        await asyncio.wait_for(early.wait_lost(), 5.0)  # rank 0 hung up on it
        assert silent.connected
        for ch in (silent, remote):
            ch.close()
        junk.close()
        server.close()

    asyncio.run(main())
