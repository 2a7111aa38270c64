"""Routing decisions against real servers: the nearer replica, a full
cache, blocks nobody serves."""

from __future__ import annotations

import socket

import pytest
import torch
import trio

import libpipe
from libpipe.client import RetryPolicy
from libpipe.errors import NoRouteError
from libpipe.net import DelayProxy, Security
from libpipe.server import BlockServer, ServerConfig
from libpipe.swarm import GossipConfig, RecordState

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
    # Two retries (a few ms of backoff) before giving up: the gap stays.
    policy = RetryPolicy(max_failures=2, backoff_base=0.01)
    async with libpipe.Client(model_dir, chain[:2], insecure=True, retry=policy) as client:
        with pytest.raises(NoRouteError) as caught:
            await client.generate(PROMPT, max_new_tokens=2)
        assert "[5, 8)" in str(caught.value)
        assert "still after 2 retries" in str(caught.value)
        assert caught.value.details["missing_blocks"] == [[5, 8]]
        with pytest.raises(NoRouteError):
            await client.forward(torch.zeros(1, 2, 64))
        # Blocks that are served still work.
        assert (await client.forward(torch.zeros(1, 2, 64), start=0, end=5)).shape == (1, 2, 64)
    # A policy without retries gives up at the first look.
    policy = RetryPolicy(max_failures=0)
    async with libpipe.Client(model_dir, chain[:2], insecure=True, retry=policy) as client:
        with pytest.raises(NoRouteError) as caught:
            await client.generate(PROMPT, max_new_tokens=2)
        assert "retries" not in str(caught.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_new_generation_waits_for_a_gap_to_close(model_dir, chain, tmp_path, local_model):
    """Blocks [5, 8) are served by nobody when the generation starts; a
    server for them comes up a second later, and the generation, which has
    met no failure, waits for it within its retry policy instead of failing."""
    port = free_port()
    config = ServerConfig(
        model_dir, (5, 8), port=port, throughput=(200.0, 4000.0), cache_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    late = BlockServer(config, Security.insecure())
    policy = RetryPolicy(max_failures=30, backoff_max=0.5)
    peers = [*chain[:2], f"127.0.0.1:{port}"]
    async with (
        libpipe.Client(model_dir, peers, insecure=True, retry=policy) as client,
        trio.open_nursery() as nursery,
    ):
        began = trio.current_time()

        async def start_late() -> None:
            await trio.sleep(1.0)
            await nursery.start(late.run)

        nursery.start_soon(start_late)
        tokens = await client.generate(PROMPT, max_new_tokens=4, stop_tokens=())
        assert trio.current_time() - began >= 1.0
        assert [h.server.address for h in client.last_route][-1] == late.address
        nursery.cancel_scope.cancel()
    assert tokens == local_model.greedy(PROMPT, 4)


async def test_no_reachable_peer_is_no_route(model_dir):
    policy = RetryPolicy(max_failures=1, backoff_base=0.01)
    async with libpipe.Client(model_dir, ["127.0.0.1:9"], insecure=True, retry=policy) as client:
        with pytest.raises(NoRouteError) as caught:
            await client.generate(PROMPT, max_new_tokens=2)
        assert "[0, 8)" in str(caught.value)
        assert "unreachable" in str(caught.value)


async def test_learns_every_server_from_one_peer_by_gossip(model_dir, tmp_path, local_model):
    """In-process servers that gossip: the client is told about one of them
    and routes through both (the other is known from signed records)."""
    gossip = GossipConfig.local().replace(
        probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, request_timeout=1.0
    )

    def config(blocks: tuple[int, int], peers: tuple[str, ...] = ()) -> ServerConfig:
        return ServerConfig(
            model_dir, blocks, throughput=(200.0, 4000.0), gossip=gossip, peers=peers,
            cache_dir=tmp_path, progress=False,
        )  # fmt: skip

    async with trio.open_nursery() as nursery:
        server = BlockServer(config((0, 5)), Security.insecure())
        first = await nursery.start(server.run)
        await nursery.start(BlockServer(config((5, 8), (first,)), Security.insecure()).run)
        with trio.fail_after(30):  # until the first server's view has the other online
            while not any(
                s.record.span == (5, 8) and s.record.state is RecordState.ONLINE
                for s in server.node.view()
            ):
                await trio.sleep(0.05)
        async with libpipe.Client(model_dir, [first], insecure=True) as client:
            learned = {e.span: e for e in client.view.servers.values()}
            assert set(learned) == {(0, 5), (5, 8)}
            assert learned[(5, 8)].pinned  # from a signed record: dialled by its peer id
            tokens = await client.generate(PROMPT, max_new_tokens=4, stop_tokens=())
            assert [(h.start, h.end) for h in client.last_route] == [(0, 5), (5, 8)]
        nursery.cancel_scope.cancel()
    assert tokens == local_model.greedy(PROMPT, 4)


async def test_bulk_forward_spreads_over_replicas(model_dir, twins, local_model, monkeypatch):
    from libpipe.client import _bulk

    used: list[str] = []
    real_call_hop = _bulk.call_hop

    async def recording_call_hop(ctx, hop, *args, **kwargs):
        used.append(hop.server.address)
        return await real_call_hop(ctx, hop, *args, **kwargs)

    monkeypatch.setattr(_bulk, "call_hop", recording_call_hop)
    a, b, _ = twins
    hidden = torch.randn(2, 64, 64)  # 128 tokens: compute-bound, RTT noise does not decide
    async with libpipe.Client(model_dir, [a, b], insecure=True) as client:
        outs = []

        async def one() -> None:
            outs.append(await client.forward(hidden))

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(one)
    with torch.no_grad():
        expected = local_model.blocks(hidden)
    assert all(torch.allclose(o, expected, atol=1e-4) for o in outs)
    # Equal replicas: each takes a fair share (12 calls, both used at least 3 times).
    assert min(used.count(a), used.count(b)) >= 3, used
