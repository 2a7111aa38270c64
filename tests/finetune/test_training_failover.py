"""Training through servers that die: the step completes with the same
gradients; requests with an adapter reach only servers that have it."""

from __future__ import annotations

import pytest
import torch
import trio

from libpipe.client import RemoteBlocks, TrainChain
from libpipe.errors import InvalidRequestError, NoRouteError, TensorOverflowError
from libpipe.model import load_client_head, load_span

from .conftest import kill, running_swarm
from .test_remote_blocks import inputs, local_step, training_step

# Announced (decode steps/s, forward tokens/s): "fast" wins every route it can.
FAST, SLOW = (1000.0, 1e6), (100.0, 1000.0)


def recording(chain: TrainChain, *, kill_before=None):
    """Wrap ``chain._call`` to log (method, peer, blocks) of every request.
    ``kill_before=(method, kill)``: call ``kill(peer_id)`` just before the
    first request of ``method``, with the peer id it goes to."""
    calls: list[tuple[str, str, int, int]] = []
    real_call = chain._call
    pending = [kill_before] if kill_before else []

    async def call(hop, method, x, grad, prompts):
        calls.append((method, hop.peer_id, hop.start, hop.end))
        if pending and pending[0][0] == method:
            pending.pop()[1](hop.peer_id)
        return await real_call(hop, method, x, grad, prompts)

    chain._call = call
    return calls


async def step(ctx, checkpoint, ids, soft, deep, chain):
    head = load_client_head(checkpoint, progress=False)
    return await trio.to_thread.run_sync(training_step, RemoteBlocks(chain), head, ids, soft, deep)


@pytest.mark.parametrize("method", ["forward", "backward"])
async def test_server_killed_mid_step_is_replaced_with_the_same_gradients(
    checkpoint, make_config, method
):
    ids, soft, deep = inputs(seed=3)
    expected = local_step(checkpoint, ids, soft, deep)
    configs = [
        make_config(checkpoint, (0, 8), throughput=FAST),
        make_config(checkpoint, (0, 4), throughput=SLOW),
        make_config(checkpoint, (4, 8), throughput=SLOW),
    ]
    async with running_swarm(configs) as (servers, ctx):
        whole, first, second = servers
        chain = TrainChain(ctx)
        by_id = {s.peer_id: s for s in servers}
        calls = recording(chain, kill_before=(method, lambda peer: kill(by_id[peer])))
        got = await step(ctx, checkpoint, ids, soft, deep, chain)
        assert ctx.view.is_banned(whole.peer_id)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    a, b, c = whole.peer_id, first.peer_id, second.peer_id
    if method == "forward":
        assert calls == [
            ("forward", a, 0, 8),  # dies
            ("forward", b, 0, 4),
            ("forward", c, 4, 8),
            ("backward", c, 4, 8),
            ("backward", b, 0, 4),
        ]
    else:
        # The forward went through the whole model in one hop; the new route
        # splits it, so the inner hop's input is recomputed before backward.
        assert calls == [
            ("forward", a, 0, 8),
            ("backward", a, 0, 8),  # dies
            ("forward", b, 0, 4),
            ("backward", c, 4, 8),
            ("backward", b, 0, 4),
        ]


async def test_adapter_requests_reach_only_servers_with_it(checkpoint, adapters, make_config):
    ids, soft, deep = inputs(batch=6, tokens=6, seed=4)
    adapter = adapters["attn"]
    whole = load_span(checkpoint, 0, 8, progress=False, adapters=[adapter])
    head = load_client_head(checkpoint, progress=False)
    expected = training_step(
        lambda x, p: whole(x, adapter="attn", prompts=p), head, ids, soft, deep
    )
    configs = [
        make_config(checkpoint, (0, 8), throughput=FAST),  # no adapter, and fastest
        make_config(checkpoint, (0, 8), throughput=SLOW, adapters=(adapter,)),
        make_config(checkpoint, (0, 4), throughput=SLOW, adapters=(adapter,)),
        make_config(checkpoint, (4, 8), throughput=SLOW, adapters=(adapter,)),
    ]
    async with running_swarm(configs) as (servers, ctx):
        plain = servers[0].peer_id
        # A row of backward: (2 x 8 tokens + 8 blocks x 2 prompts) x 64 x 4 bytes = 8192.
        chain = TrainChain(ctx, adapter="attn", max_request_bytes=2 * 8192)
        calls = recording(chain)
        got = await step(ctx, checkpoint, ids, soft, deep, chain)
        assert len(chain.micro_batches(6, 8, 2)) == 3
        assert len(calls) >= 6 and plain not in {peer for _, peer, _, _ in calls}
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)

        # Without an adapter the fast server is used: the check above can fail.
        base = TrainChain(ctx)
        base_calls = recording(base)
        await step(ctx, checkpoint, ids, soft, deep, base)
        assert plain in {peer for _, peer, _, _ in base_calls}

        with pytest.raises(NoRouteError, match="with adapter 'other'") as info:
            # three pieces fail alike: the error comes out as itself
            other = TrainChain(ctx, adapter="other", max_request_bytes=2 * 8192)
            await step(ctx, checkpoint, ids, soft, deep, other)
        assert info.value.details["adapter"] == "other"


async def test_server_that_cannot_say_its_adapters_is_banned(checkpoint, adapters, make_config):
    ids, soft, deep = inputs(seed=5)
    adapter = adapters["attn"]
    configs = [make_config(checkpoint, (0, 8), adapters=(adapter,)) for _ in range(2)]
    async with running_swarm(configs) as (servers, ctx):
        dead, alive = servers
        kill(dead)
        await trio.sleep(0.1)  # let the kill close its listener
        chain = TrainChain(ctx, adapter="attn")
        calls = recording(chain)
        await step(ctx, checkpoint, ids, soft, deep, chain)
        assert ctx.view.is_banned(dead.peer_id)
        assert chain.directory.loaded(dead.peer_id) is None
        assert chain.directory.loaded(alive.peer_id) == frozenset({"attn"})
        assert {peer for _, peer, _, _ in calls} == {alive.peer_id}


async def test_errors_that_are_not_the_servers_fault_are_not_retried(checkpoint, make_config):
    async with running_swarm([make_config(checkpoint, (0, 8))], wire_dtype=torch.float16) as (
        servers,
        ctx,
    ):
        (server,) = servers
        x = torch.zeros(1, 4, 64)
        x[0, 0, 0] = 1e5  # no fp16 for that
        chain = TrainChain(ctx)
        calls = recording(chain)
        with pytest.raises(TensorOverflowError, match="overflows 1 value"):
            await trio.to_thread.run_sync(RemoteBlocks(chain), x)
        assert calls == []
        # The client believes (wrongly) that the server has adapter "ghost":
        # the server's invalid_request comes back at once, nobody is banned.
        chain = TrainChain(ctx, adapter="ghost")
        chain.directory._loaded[server.peer_id] = frozenset({"ghost"})
        calls = recording(chain)
        with pytest.raises(InvalidRequestError, match="unknown adapter 'ghost'"):
            await trio.to_thread.run_sync(RemoteBlocks(chain), torch.zeros(1, 4, 64))
        assert len(calls) == 1 and not ctx.view.is_banned(server.peer_id)
