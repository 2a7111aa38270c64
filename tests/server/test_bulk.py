"""forward and backward RPCs against local autograd: deep prompts, sub-spans,
long inputs in chunks, and wire dtypes."""

from __future__ import annotations

import torch

from libpipe.model import load_span

from .conftest import running_servers

H = 64
FP32 = {"rtol": 1e-5, "atol": 1e-5}
# Fewer rows per matmul can take another CPU GEMM kernel (test_scheduling.py):
# rows in groups agree with one pass to fp32 rounding, not bit for bit.
ROWS = {"rtol": 1e-4, "atol": 1e-4}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


async def test_backward_equals_local_autograd_with_deep_prompts(gqa, make_config):
    local = load_span(gqa, 2, 6, progress=False)
    hidden, grad_out = rand(2, 7, H, seed=1), rand(2, 7, H, seed=2)
    prompts = rand(3, 2, 4, H, seed=3) * 0.1
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        plain = await conn.call("backward", {"start": 2, "end": 6}, (hidden, grad_out))
        deep = await conn.call("backward", {"start": 3, "end": 6}, (hidden, grad_out, prompts))
        out = await conn.call("forward", {"start": 3, "end": 6}, (hidden, prompts))
    x = hidden.clone().requires_grad_(True)
    (local(x, 2, 6) * grad_out).sum().backward()
    (grad_x,) = plain.tensors
    torch.testing.assert_close(grad_x, x.grad, **FP32)

    x = hidden.clone().requires_grad_(True)
    p = prompts.clone().requires_grad_(True)
    y = x
    for i in range(3, 6):  # the prompt of block i goes on the first 4 positions
        y = local(torch.cat([y[:, :4] + p[i - 3], y[:, 4:]], dim=1), i, i + 1)
    (y * grad_out).sum().backward()
    grad_x, grad_p = deep.tensors
    torch.testing.assert_close(grad_x, x.grad, **FP32)
    torch.testing.assert_close(grad_p, p.grad, **FP32)
    torch.testing.assert_close(out.tensors[0], y.detach(), **FP32)
    assert all(not w.requires_grad for w in local.parameters())


async def test_long_forward_in_chunks_equals_one_pass(gqa, make_config):
    local = load_span(gqa, 2, 6, progress=False)
    hidden = rand(2, 45, H, seed=4)
    prompts = rand(4, 2, 3, H, seed=5) * 0.1
    config = make_config(gqa, (2, 6), prefill_chunk=8)
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        plain = await conn.call("forward", {"start": 2, "end": 6}, (hidden,))
        deep = await conn.call("forward", {"start": 2, "end": 6}, (hidden, prompts))
        info = (await conn.call("info")).meta
        assert info["cache_bytes_free"] == info["cache_bytes_total"]  # scratch returned
    with torch.no_grad():
        torch.testing.assert_close(plain.tensors[0], local(hidden), **FP32)
        torch.testing.assert_close(deep.tensors[0], local(hidden, prompts=prompts), **FP32)


async def test_replies_come_in_the_request_dtype(gqa, make_config):
    local = load_span(gqa, 2, 6, progress=False)
    hidden = rand(1, 5, H, seed=6)
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            reply = await conn.call("forward", {"start": 2, "end": 6}, (hidden.to(dtype),))
            out = reply.tensors[0]
            assert out.dtype == dtype
            with torch.no_grad():
                expected = local(hidden.to(dtype).float())
            torch.testing.assert_close(
                out.float(), expected.to(dtype).float(), rtol=2e-2, atol=2e-2
            )


async def test_a_batch_of_many_short_rows_goes_through_in_bounded_groups(gqa, make_config):
    """The frame limit lets ~10^8 values through: thousands of short rows in
    one pass would need activations and attention scratch far beyond the
    input. Each pass takes at most prefill_chunk tokens of rows (here 8: 4
    rows of 2), and the results equal one pass over all rows."""
    local = load_span(gqa, 2, 6, progress=False)
    hidden, grad_out = rand(30, 2, H, seed=6), rand(30, 2, H, seed=7)
    prompts = rand(4, 30, 1, H, seed=8) * 0.1
    # One forward job over the span, so each row group is one forward call.
    config = make_config(gqa, (2, 6), prefill_chunk=8, forward_chunk=4)
    async with running_servers([config]) as (servers, pool):
        span = servers[0].serving.span
        rows_seen: list[int] = []
        forward = span.forward

        def counting_forward(hidden, *args, **kwargs):
            rows_seen.append(hidden.shape[0])
            return forward(hidden, *args, **kwargs)

        span.forward = counting_forward
        conn = await pool.get(servers[0].address)
        out = await conn.call("forward", {"start": 2, "end": 6}, (hidden, prompts))
        grads = await conn.call("backward", {"start": 2, "end": 6}, (hidden, grad_out, prompts))
        del span.forward
    assert max(rows_seen) == 4 and sum(rows_seen[:8]) == 30  # 7 groups of 4, one of 2
    x = hidden.clone().requires_grad_(True)
    p = prompts.clone().requires_grad_(True)
    y = local(x, prompts=p)
    (y * grad_out).sum().backward()
    torch.testing.assert_close(out.tensors[0], y.detach(), **ROWS)
    torch.testing.assert_close(grads.tensors[0], x.grad, **ROWS)
    torch.testing.assert_close(grads.tensors[1], p.grad, **ROWS)
