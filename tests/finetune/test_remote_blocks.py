"""Remote blocks as autograd: gradients through in-process servers equal
local autograd on the same model; micro-batches; typed errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import trio

from libpipe.client import RemoteBlocks, TrainChain
from libpipe.errors import InvalidRequestError
from libpipe.model import load_client_head, load_span

from .conftest import running_swarm

CHAIN = [(0, 3), (3, 5), (5, 8)]


def training_step(blocks, head, ids, soft, deep):
    """One loss.backward() through ``blocks``; returns the loss and the
    gradients of every client-side trainable tensor."""
    soft = soft.detach().requires_grad_(True)
    deep = deep.detach().requires_grad_(True)
    x = torch.cat([soft.expand(ids.shape[0], -1, -1), head.embed(ids)], dim=1)
    out = blocks(x, deep)
    logits = head.logits(out[:, soft.shape[1] : -1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), soft.grad, deep.grad


def inputs(batch=3, tokens=10, prefix=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, tokens), generator=gen)
    soft = torch.randn(1, prefix, 64, generator=gen)
    deep = 0.1 * torch.randn(8, batch, prefix, 64, generator=gen)
    return ids, soft, deep


def local_step(checkpoint, ids, soft, deep):
    whole = load_span(checkpoint, 0, 8, progress=False)
    head = load_client_head(checkpoint, progress=False)
    return training_step(lambda x, p: whole(x, prompts=p), head, ids, soft, deep)


async def remote_step(ctx, checkpoint, ids, soft, deep, **chain_kw):
    head = load_client_head(checkpoint, progress=False)
    blocks = RemoteBlocks(TrainChain(ctx, **chain_kw))
    result = await trio.to_thread.run_sync(training_step, blocks, head, ids, soft, deep)
    return result, blocks


async def test_gradients_equal_local_autograd_with_fp32_on_the_wire(checkpoint, make_config):
    ids, soft, deep = inputs()
    expected = local_step(checkpoint, ids, soft, deep)
    async with running_swarm([make_config(checkpoint, b) for b in CHAIN]) as (servers, ctx):
        spans = [s.serving.span for s in servers]
        before = [{k: v.clone() for k, v in span.state_dict().items()} for span in spans]
        got, blocks = await remote_step(ctx, checkpoint, ids, soft, deep)
        # Frozen: no server weight changed or even got a gradient.
        for span, weights in zip(spans, before, strict=True):
            for name, value in span.state_dict().items():
                assert torch.equal(value, weights[name]), name
            assert all(p.grad is None and not p.requires_grad for p in span.parameters())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    # Per hop: forward sends [3, 12, 64] fp32 plus [blocks, 3, 2, 64] prompts,
    # backward twice the activations plus the prompts again.
    activations, prompts = 3 * 12 * 64 * 4, 8 * 3 * 2 * 64 * 4
    assert blocks.bytes_sent == 3 * 3 * activations + 2 * prompts
    assert blocks.bytes_received == 3 * 2 * activations + prompts


async def test_gradients_with_fp16_on_the_wire(checkpoint, make_config):
    ids, soft, deep = inputs(seed=1)
    expected = local_step(checkpoint, ids, soft, deep)
    configs = [make_config(checkpoint, b) for b in CHAIN]
    async with running_swarm(configs, wire_dtype=torch.float16) as (_, ctx):
        got, _ = await remote_step(ctx, checkpoint, ids, soft, deep)
    # fp16 keeps 11 bits: each hop rounds activations and gradients to ~5e-4
    # relative; a few hops and a softmax on top stay within a percent.
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype == torch.float32
        assert (g - e).norm() <= 1e-2 * e.norm()


async def test_micro_batches_fit_the_limit_and_spread_over_replicas(checkpoint, make_config):
    ids, soft, deep = inputs(batch=8, tokens=6, prefix=2, seed=2)
    expected = local_step(checkpoint, ids, soft, deep)
    configs = [make_config(checkpoint, (0, 8)) for _ in range(2)]
    # One row of backward: (2 x 8 tokens + 8 blocks x 2 prompt positions) x 64 x 4 bytes.
    per_row = (2 * 8 + 8 * 2) * 64 * 4
    async with running_swarm(configs) as (servers, ctx):
        chain = TrainChain(ctx, max_request_bytes=2 * per_row)
        sizes: list[tuple[str, int]] = []
        real_call = chain._call

        async def counting_call(hop, method, x, grad, prompts):
            tensors = [t for t in (x, grad, prompts) if t is not None]
            sizes.append((hop.peer_id, sum(t.numel() * t.element_size() for t in tensors)))
            return await real_call(hop, method, x, grad, prompts)

        chain._call = counting_call
        head = load_client_head(checkpoint, progress=False)
        got = await trio.to_thread.run_sync(
            training_step, RemoteBlocks(chain), head, ids, soft, deep
        )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    assert chain.micro_batches(8, 8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert TrainChain(ctx, max_rows=3).micro_batches(8, 8, 2) == [
        slice(0, 3),
        slice(3, 5),
        slice(5, 8),
    ]
    assert len(sizes) == 8  # four pieces, one forward and one backward each
    assert max(size for _, size in sizes) <= 2 * per_row
    assert {peer for peer, _ in sizes} == {s.peer_id for s in servers}


async def test_bad_use_is_a_typed_error(checkpoint, make_config):
    async with running_swarm([make_config(checkpoint, (0, 8))]) as (_, ctx):
        blocks = RemoteBlocks(TrainChain(ctx, start=2, end=6))
        assert repr(blocks) == "RemoteBlocks(blocks=[2, 6))"
        x = torch.zeros(1, 4, 64)
        with pytest.raises(InvalidRequestError, match=r"trio\.to_thread"):
            blocks(x)
        for bad, match in [
            (torch.zeros(1, 4, 32), "hidden states must be"),
            (torch.zeros(4, 64), "hidden states must be"),
            (torch.zeros(1, 0, 64), "hidden states must be"),
            (torch.zeros(1, 4, 64, dtype=torch.long), "floating-point"),
        ]:
            with pytest.raises(InvalidRequestError, match=match):
                await trio.to_thread.run_sync(blocks, bad)
        with pytest.raises(InvalidRequestError, match="deep prompts must be"):
            await trio.to_thread.run_sync(blocks, x, torch.zeros(4, 1, 5, 64))
        with pytest.raises(InvalidRequestError, match="over the limit"):
            await trio.to_thread.run_sync(RemoteBlocks(TrainChain(ctx, max_request_bytes=1000)), x)
        for kw in [
            {"start": 3, "end": 3},
            {"end": 9},
            {"adapter": ""},
            {"max_request_bytes": 0},
            {"max_rows": 0},
        ]:
            with pytest.raises(InvalidRequestError):
                TrainChain(ctx, **kw)


async def test_a_sub_span_with_prompts_matches_local_blocks(checkpoint, make_config):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 64, generator=gen)
    prompts = torch.randn(4, 2, 3, 64, generator=gen)
    grad_out = torch.randn(2, 9, 64, generator=gen)
    local = load_span(checkpoint, 2, 6, progress=False)
    xl, pl = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    expected = local(xl, prompts=pl)
    expected.backward(grad_out)
    async with running_swarm([make_config(checkpoint, b) for b in CHAIN]) as (_, ctx):
        blocks = RemoteBlocks(TrainChain(ctx, start=2, end=6))

        def step():
            xr, pr = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
            out = blocks(xr, pr)
            out.backward(grad_out)
            return out.detach(), xr.grad, pr.grad

        out, gx, gp = await trio.to_thread.run_sync(step)
    torch.testing.assert_close(out, expected.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, xl.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gp, pl.grad, atol=1e-6, rtol=1e-6)
