"""A forward call cut into per-block jobs: the outputs equal one pass over
the span (plain, deep prompts, LoRA adapters, long inputs), and decode
steps run between the jobs instead of after the whole call."""

from __future__ import annotations

import threading

import pytest
import torch
import trio

from libpipe.errors import ConfigError
from libpipe.model import KVCachePool
from libpipe.server import Priority
from libpipe.server._compute import ChunkedForward

from .conftest import running_servers

H = 64
EXACT = {"rtol": 0.0, "atol": 0.0}
# Fewer rows per matmul can take another CPU GEMM kernel (tests/server/
# test_scheduling.py): row groups agree to fp32 rounding, not bit for bit.
ROWS = {"rtol": 1e-4, "atol": 1e-4}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(plan: ChunkedForward) -> torch.Tensor:
    for job in plan.jobs():
        assert plan.result is None
        job()
    assert plan.result is not None
    return plan.result


@pytest.mark.parametrize(
    ("chunk", "deep", "adapter", "prefill_chunk", "row_groups"),
    [
        (1, False, None, 512, 1),
        (2, True, "tuned", 512, 1),
        (1, True, "tuned", 6, 3),
        (2, False, None, 6, 3),
    ],
)
def test_chunked_forward_equals_one_job_over_the_whole_span(
    lora_span, monkeypatch, chunk, deep, adapter, prefill_chunk, row_groups
):
    """Chunks of blocks, and of rows; with prefill_chunk 6 the 9-token rows
    also take the long path (block by block through a cache session)."""
    monkeypatch.setattr(lora_span, "prefill_chunk", prefill_chunk)
    pool = KVCachePool(1 << 24)
    start, end = 1, 6
    hidden = rand(3, 9, H, seed=1)
    prompts = rand(end - start, 3, 3, H, seed=3) * 0.1 if deep else None
    plans = {
        c: ChunkedForward(
            lora_span, pool, hidden, start, end, chunk=c, prompts=prompts, adapter=adapter
        )
        for c in (chunk, end - start)
    }
    assert len(plans[chunk].jobs()) == row_groups * -(-(end - start) // chunk)
    got, whole = run(plans[chunk]), run(plans[end - start])
    torch.testing.assert_close(got, whole, **EXACT)
    with torch.no_grad():
        one_pass = lora_span(hidden, start, end, adapter=adapter, prompts=prompts)
    torch.testing.assert_close(got, one_pass, **(EXACT if row_groups == 1 else ROWS))
    assert pool.free_bytes == pool.budget_bytes  # the long path's sessions are closed


def test_a_chunked_forwards_reply_comes_in_the_request_dtype(lora_span):
    plan = ChunkedForward(
        lora_span, KVCachePool(1 << 20), rand(1, 5, H, seed=4).half(), 3, 5, chunk=1
    )
    out = run(plan)
    assert (out.dtype, out.device.type, out.shape) == (torch.float16, "cpu", (1, 5, H))


async def test_a_decode_step_runs_between_the_jobs_of_a_forward_call(gqa, make_config):
    """The first job of a 4-block forward holds the worker until a decode-
    priority job is queued; that job then runs next, before the forward's
    other three jobs, not after the whole call as with one job per call."""
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        serving = servers[0].serving
        span, executor = serving.span, serving.executor
        executor.max_wait = 600.0  # priorities alone, however slow the machine
        order: list[str] = []
        first_entered, gate = threading.Event(), threading.Event()
        forward = span.forward

        def held_forward(*args, **kwargs):
            order.append("forward")
            if not first_entered.is_set():
                first_entered.set()
                gate.wait(30)
            return forward(*args, **kwargs)

        span.forward = held_forward  # what every job of the call runs
        conn = await pool.get(servers[0].address)
        x = rand(1, 6, H, seed=7)
        jobs_before = executor.stats.jobs
        async with trio.open_nursery() as nursery:
            replies = []

            async def call_forward() -> None:
                replies.append(await conn.call("forward", {"start": 2, "end": 6}, (x,)))

            nursery.start_soon(call_forward)
            await trio.to_thread.run_sync(first_entered.wait, 30)
            nursery.start_soon(executor.call, Priority.DECODE, lambda: order.append("decode"))
            while not executor.queued:
                await trio.sleep(0.001)
            gate.set()
        assert order == ["forward", "decode"] + ["forward"] * 3
        assert executor.stats.jobs - jobs_before == 5
        del span.forward
        with torch.no_grad():
            want = span(x, 2, 6)
        torch.testing.assert_close(replies[0].tensors[0], want, **EXACT)


def test_forward_chunk_must_be_positive(gqa, make_config):
    with pytest.raises(ConfigError, match="forward_chunk"):
        make_config(gqa, (2, 6), forward_chunk=0)
