"""Moves: one that cannot happen leaves the server serving where it was; after
one, requests for the old blocks are draining, not bad."""

from __future__ import annotations

import pytest
import torch

from libpipe.errors import DrainingError, InvalidRequestError
from libpipe.server._rebalance import SpanMover
from libpipe.swarm import RecordState

from .conftest import running_servers

H = 64


async def test_a_move_whose_blocks_fail_to_load_leaves_the_server_where_it_was(
    gqa, make_config, tmp_path
):
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        server = servers[0]
        serving = server.serving
        gone = make_config(tmp_path / "no-checkpoint-here", (2, 6))
        assert not await SpanMover(gone, serving, server._publisher).move(4, 8)
        assert serving.blocks == (2, 6) and serving.retired == []
        conn = await pool.get(server.address)
        info = (await conn.call("info")).meta
        assert info["span"] == [2, 6] and info["state"] == "online"
        reply = await conn.call("forward", {"start": 2, "end": 6}, (torch.randn(1, 3, H),))
        assert reply.tensors[0].shape == (1, 3, H)


async def test_a_draining_server_does_not_move(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, _):
        server = servers[0]
        server.serving.state = RecordState.DRAINING
        mover = SpanMover(server.config, server.serving, server._publisher)
        assert not await mover.move(4, 8)
        assert server.serving.blocks == (2, 6) and server.serving.retired == []


async def test_requests_touching_blocks_the_server_moved_from_are_draining(gqa, make_config):
    """A client whose view predates the move re-routes (DrainingError) whether
    it asks for the old blocks wholly or only in part; blocks this server
    never held stay a bad request."""
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        server = servers[0]
        mover = SpanMover(server.config, server.serving, server._publisher)
        assert await mover.move(4, 8)
        assert server.serving.blocks == (4, 8) and server.serving.retired == [(2, 6)]
        conn = await pool.get(server.address)
        x = torch.randn(1, 3, H)
        for start, end in [(2, 6), (2, 4), (3, 5), (1, 3), (3, 8)]:
            with pytest.raises(DrainingError):
                await conn.call("forward", {"start": start, "end": end}, (x,))
        for start, end in [(0, 2), (1, 2), (6, 5)]:
            with pytest.raises(InvalidRequestError):
                await conn.call("forward", {"start": start, "end": end}, (x,))
        reply = await conn.call("forward", {"start": 5, "end": 8}, (x,))
        assert reply.tensors[0].shape == (1, 3, H)
