"""A backward call cut into per-block jobs: the gradients equal torch autograd
over the whole span (plain, deep prompts, LoRA adapters), and decode steps
run between the jobs instead of after the whole call."""

from __future__ import annotations

import threading

import pytest
import torch
import trio

from libpipe.errors import ConfigError
from libpipe.server import Priority
from libpipe.server._compute import ChunkedBackward

from .conftest import running_servers

H = 64
FP32 = {"rtol": 1e-5, "atol": 1e-5}
# Fewer rows per matmul can take another CPU GEMM kernel (tests/server/
# test_scheduling.py), whose last-bit differences grow over five blocks'
# forward and backward: row groups agree to fp32 rounding, not bit for bit.
ROWS = {"rtol": 1e-4, "atol": 1e-4}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def autograd_reference(span, hidden, grad_out, start, end, prompts, adapter):
    """Torch autograd through blocks [start, end) in one graph, prompts added by hand."""
    x = hidden.clone().requires_grad_(True)
    p = None if prompts is None else prompts.clone().requires_grad_(True)
    y = x
    for i in range(start, end):
        if p is not None:
            n = p.shape[2]
            y = torch.cat([y[:, :n] + p[i - start], y[:, n:]], dim=1)
        y = span(y, i, i + 1, adapter=adapter)
    (y * grad_out).sum().backward()
    return (x.grad,) if p is None else (x.grad, p.grad)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("adapter", [None, "tuned"])
@pytest.mark.parametrize(("prefill_chunk", "row_groups"), [(512, 1), (18, 2), (9, 3)])
def test_chunked_backward_equals_autograd_over_the_whole_span(
    lora_span, monkeypatch, chunk, deep, adapter, prefill_chunk, row_groups
):
    """Chunks of blocks, and of rows: a row group holds at most prefill_chunk tokens."""
    monkeypatch.setattr(lora_span, "prefill_chunk", prefill_chunk)
    start, end = 1, 6
    hidden, grad_out = rand(3, 9, H, seed=1), rand(3, 9, H, seed=2)
    prompts = rand(end - start, 3, 3, H, seed=3) * 0.1 if deep else None
    plan = ChunkedBackward(
        lora_span, hidden, grad_out, start, end, chunk=chunk, prompts=prompts, adapter=adapter
    )
    jobs = plan.jobs()
    chunks = -(-(end - start) // chunk)
    assert len(jobs) == row_groups * (2 * chunks - 1)
    for job in jobs:
        assert plan.result is None
        job()
    assert plan.result is not None
    expected = autograd_reference(lora_span, hidden, grad_out, start, end, prompts, adapter)
    assert len(plan.result) == len(expected)
    for got, want in zip(plan.result, expected, strict=True):
        torch.testing.assert_close(got, want, **(FP32 if row_groups == 1 else ROWS))


def test_replies_of_a_chunked_backward_come_in_the_request_dtypes(lora_span):
    hidden, grad_out = rand(1, 5, H, seed=4).half(), rand(1, 5, H, seed=5).half()
    prompts = (rand(2, 1, 2, H, seed=6) * 0.1).to(torch.bfloat16)
    plan = ChunkedBackward(lora_span, hidden, grad_out, 3, 5, chunk=1, prompts=prompts)
    for job in plan.jobs():
        job()
    assert plan.result is not None
    assert [t.dtype for t in plan.result] == [torch.float16, torch.bfloat16]
    assert [t.device.type for t in plan.result] == ["cpu", "cpu"]


async def test_a_decode_step_runs_between_the_jobs_of_a_backward_call(gqa, make_config):
    """The first job of a 4-block backward holds the worker until a decode-
    priority job is queued; that job then runs next, before the backward's
    other six jobs, not after the whole call as with one job per call."""
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        serving = servers[0].serving
        span, executor = serving.span, serving.executor
        # Priorities alone: on a loaded machine the call may age past
        # max_wait before the decode job is queued, and then go first.
        executor.max_wait = 600.0
        order: list[str] = []
        first_entered, gate = threading.Event(), threading.Event()
        forward = span.forward

        def held_forward(*args, **kwargs):
            order.append("backward")
            if not first_entered.is_set():
                first_entered.set()
                gate.wait(30)
            return forward(*args, **kwargs)

        span.forward = held_forward  # what every job of the call runs first
        conn = await pool.get(servers[0].address)
        x, g = rand(1, 6, H, seed=7), rand(1, 6, H, seed=8)
        jobs_before = executor.stats.jobs
        async with trio.open_nursery() as nursery:
            replies = []

            async def backward() -> None:
                replies.append(await conn.call("backward", {"start": 2, "end": 6}, (x, g)))

            nursery.start_soon(backward)
            await trio.to_thread.run_sync(first_entered.wait, 30)
            nursery.start_soon(executor.call, Priority.DECODE, lambda: order.append("decode"))
            while not executor.queued:
                await trio.sleep(0.001)
            gate.set()
        assert order == ["backward", "decode"] + ["backward"] * 6
        assert executor.stats.jobs - jobs_before == 8
        del span.forward
        (grad,) = replies[0].tensors
        (want,) = autograd_reference(span, x, g, 2, 6, None, None)
        torch.testing.assert_close(grad, want, **FP32)


def test_backward_chunk_must_be_positive(gqa, make_config):
    with pytest.raises(ConfigError, match="backward_chunk"):
        make_config(gqa, (2, 6), backward_chunk=0)
