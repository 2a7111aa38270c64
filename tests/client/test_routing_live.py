"""Routing decisions against real servers: the nearer replica, a full
cache, blocks nobody serves."""

from __future__ import annotations

import pytest
import torch

import libpipe
from libpipe.errors import NoRouteError
from libpipe.net import DelayProxy

PROMPT = [9, 8, 7, 6]


@pytest.fixture(scope="module")
def twins(spawn) -> list[str]:
    """Two equal servers of the whole model, and one faster whose cache holds
    almost nothing (16 KiB: a 64-token session needs 32 KiB in each block)."""
    servers = spawn(
        [
            ((0, 8), ()),
            ((0, 8), ()),
            ((0, 8), ["--throughput", "2000,40000", "--cache-bytes", "16K"]),
        ]
    )
    return [s.address for s in servers]


async def test_prefers_the_replica_without_a_delay(model_dir, twins, local_model):
    a, b, _ = twins
    async with DelayProxy(a, delay=0.015) as slow_a, DelayProxy(b, delay=0.0) as fast_b:
        # 15 ms each way: 30 ms more per round trip through A.
        for slow, fast in ((slow_a, fast_b), (fast_b, slow_a)):
            slow.set_delay(0.015)
            fast.set_delay(0.0)
            peers = [slow_a.address, fast_b.address]
            async with libpipe.Client(model_dir, peers, insecure=True) as client:
                rtt = {
                    e.address: client.view.rtt_of(e.peer_id) for e in client.view.servers.values()
                }
                assert rtt[slow.address] > rtt[fast.address] + 0.02
                tokens = await client.generate(PROMPT, max_new_tokens=4, stop_tokens=())
                assert [h.server.address for h in client.last_route] == [fast.address]
            assert tokens == local_model.greedy(PROMPT, 4)


async def test_avoids_a_server_whose_cache_is_full(model_dir, twins):
    _, b, tiny = twins
    async with libpipe.Client(model_dir, [tiny, b], insecure=True) as client:
        async with client.inference_session(max_length=64) as session:
            await session.step(PROMPT)
            # The faster server is passed over before trying: no failover.
            assert [h.server.address for h in session.route] == [b]
            assert session.failovers == 0


async def test_no_route_names_the_blocks_nobody_serves(model_dir, chain):
    async with libpipe.Client(model_dir, chain[:2], insecure=True) as client:
        with pytest.raises(NoRouteError) as caught:
            await client.generate(PROMPT, max_new_tokens=2)
        assert "[5, 8)" in str(caught.value)
        with pytest.raises(NoRouteError):
            await client.forward(torch.zeros(1, 2, 64))
        # Blocks that are served still work.
        assert (await client.forward(torch.zeros(1, 2, 64), start=0, end=5)).shape == (1, 2, 64)


async def test_no_reachable_peer_is_no_route(model_dir):
    async with libpipe.Client(model_dir, ["127.0.0.1:9"], insecure=True) as client:
        with pytest.raises(NoRouteError) as caught:
            await client.generate(PROMPT, max_new_tokens=2)
        assert "[0, 8)" in str(caught.value)
        assert "unreachable" in str(caught.value)
