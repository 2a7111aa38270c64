"""The compute queue: priorities, continuous batching (identical results),
abandoned jobs, and long sessions whose prefill goes in chunks."""

from __future__ import annotations

import functools
import threading
from contextlib import AsyncExitStack

import pytest
import torch
import trio

from libpipe.errors import BusyError, DrainingError, InvalidRequestError
from libpipe.model import KVCachePool, load_span
from libpipe.net import Stream
from libpipe.server import Executor, Priority
from libpipe.server._worker import ComputeThread

from .conftest import running_servers

H = 64
EXACT = {"rtol": 0.0, "atol": 0.0}
# CPU GEMM (MKL) takes a different kernel for fewer than ~12 rows, so a
# session of batch 1 stepped alone and the same rows inside a batch of 7 can
# differ in the last bit (measured: rows M in 1-3, 5-7, 9-11 differ from a
# big-M product; M = 4, 8 and >= 12 agree bit for bit). Batched decode is
# exact wherever both sides take the same kernel (sessions of >= 12 rows,
# below), and within fp32 rounding otherwise.
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def span(gqa):
    return load_span(gqa, 2, 6, progress=False)


async def hold_worker(nursery: trio.Nursery, executor: Executor) -> threading.Event:
    """Occupy the worker until the returned event is set, so jobs pile up."""
    gate, running = threading.Event(), threading.Event()

    def blocker() -> None:
        running.set()
        gate.wait(30)

    nursery.start_soon(executor.call, Priority.BULK, blocker)
    while not running.is_set():
        await trio.sleep(0.005)
    return gate


async def wait_queued(executor: Executor, n: int) -> None:
    with trio.fail_after(10):
        while executor.queued < n:
            await trio.sleep(0.005)


async def test_decode_before_prefill_before_bulk_fifo_within_each():
    executor = Executor(max_wait=60)  # no aging here, however slow the machine
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        gate = await hold_worker(nursery, executor)
        jobs = [
            (Priority.BULK, "bulk1"),
            (Priority.PREFILL, "prefill1"),
            (Priority.DECODE, "decode1"),
            (Priority.BULK, "bulk2"),
            (Priority.DECODE, "decode2"),
        ]
        for i, (priority, name) in enumerate(jobs):
            nursery.start_soon(executor.call, priority, lambda name=name: order.append(name))
            await wait_queued(executor, i + 1)
        gate.set()
        with trio.fail_after(10):
            while len(order) < len(jobs):
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert order == ["decode1", "decode2", "prefill1", "bulk1", "bulk2"]
    assert (executor.stats.jobs, executor.stats.batches) == (6, 0)  # with the blocker


async def test_a_job_waiting_past_max_wait_goes_first():
    executor = Executor(max_wait=0.05)
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        gate = await hold_worker(nursery, executor)
        nursery.start_soon(executor.call, Priority.BULK, lambda: order.append("bulk"))
        await wait_queued(executor, 1)
        await trio.sleep(0.1)
        nursery.start_soon(executor.call, Priority.DECODE, lambda: order.append("decode"))
        await wait_queued(executor, 2)
        gate.set()
        with trio.fail_after(10):
            while len(order) < 2:
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert order == ["bulk", "decode"]


async def test_a_later_job_of_a_request_keeps_the_requests_age():
    """A request cut into jobs (a chunked backward) passes its arrival as
    ``since``: its next job, queued just now, has waited past max_wait and
    goes before a decode step queued earlier; one without it does not."""
    executor = Executor(max_wait=30)
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        gate = await hold_worker(nursery, executor)
        nursery.start_soon(executor.call, Priority.DECODE, lambda: order.append("decode"))
        await wait_queued(executor, 1)
        long_ago = trio.current_time() - 60
        nursery.start_soon(
            functools.partial(
                executor.call, Priority.BULK, lambda: order.append("aged"), since=long_ago
            )
        )
        nursery.start_soon(executor.call, Priority.BULK, lambda: order.append("fresh"))
        await wait_queued(executor, 3)
        gate.set()
        with trio.fail_after(10):
            while len(order) < 3:
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert order == ["aged", "decode", "fresh"]


@pytest.mark.parametrize(
    ("batches", "tolerance"), [((12, 13, 16, 12), EXACT), ((1, 2, 1, 3), FP32)]
)
async def test_queued_decode_steps_run_as_one_batch_equal_to_alone(span, batches, tolerance):
    pool = KVCachePool(1 << 24)
    batched = [span.open_session(pool, batch=b, max_length=16) for b in batches]
    alone = [span.open_session(pool, batch=b, max_length=16) for b in batches]
    other = span.open_session(pool, batch=1, max_length=16, start=3)  # another sub-span
    for i, (a, b) in enumerate(zip(batched, alone, strict=True)):
        prompt = rand(a.cache.batch, 3 + i, H, seed=i)
        a.step(prompt)
        b.step(prompt)
    steps = [rand(s.cache.batch, 1, H, seed=10 + i) for i, s in enumerate(batched)]
    results: dict[int, torch.Tensor] = {}
    executor = Executor(max_batch=8, max_wait=60)

    async def decode(i: int) -> None:
        results[i] = await executor.decode(batched[i], steps[i])

    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        async with trio.open_nursery() as work:
            gate = await hold_worker(work, executor)
            for i in range(4):
                work.start_soon(decode, i)
            work.start_soon(executor.decode, other, rand(1, 1, H, seed=99))
            await wait_queued(executor, 5)
            gate.set()
        nursery.cancel_scope.cancel()
    assert executor.stats.batches == 1 and executor.stats.largest_batch == 4
    for i, b in enumerate(alone):
        torch.testing.assert_close(results[i], b.step(steps[i]), **tolerance)
    assert other.position == 1


async def test_the_dispatcher_waits_briefly_for_the_rest_of_the_last_batch(span):
    pool = KVCachePool(1 << 24)
    sessions = [span.open_session(pool, batch=1, max_length=8) for _ in range(3)]
    # A long window, so that this test does not depend on the machine's speed.
    executor = Executor(gather_window=30.0, gather_fraction=1e9)
    one = rand(1, 1, H, seed=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        async with trio.open_nursery() as work:
            gate = await hold_worker(work, executor)
            for s in sessions:
                work.start_soon(executor.decode, s, one)
            await wait_queued(executor, 3)
            gate.set()
        assert (executor.stats.batches, executor.stats.largest_batch) == (1, 3)
        # Next round: the steps arrive one by one, yet they run as one batch.
        async with trio.open_nursery() as work:
            for s in sessions:
                work.start_soon(executor.decode, s, one)
                await trio.sleep(0.05)
        assert executor.stats.batches == 2 and executor.stats.batched_steps == 6
        # When the others do not come, the wait is bounded by the window.
        executor.gather_window = 0.05
        with trio.fail_after(10):
            await executor.decode(sessions[0], one)
        nursery.cancel_scope.cancel()
    assert [s.position for s in sessions] == [3, 2, 2]


async def test_a_bad_member_fails_alone_and_the_rest_of_its_batch_succeeds(span):
    pool = KVCachePool(1 << 24)
    sessions = [span.open_session(pool, batch=1, max_length=8) for _ in range(3)]
    reference = span.open_session(pool, batch=1, max_length=8)
    good = rand(1, 1, H, seed=1)
    outcomes: dict[int, object] = {}
    executor = Executor()

    async def decode(i: int, hidden: torch.Tensor) -> None:
        try:
            outcomes[i] = await executor.decode(sessions[i], hidden)
        except InvalidRequestError as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        async with trio.open_nursery() as work:
            gate = await hold_worker(work, executor)
            work.start_soon(decode, 0, good)
            work.start_soon(decode, 1, rand(2, 1, H, seed=2))  # wrong batch
            work.start_soon(decode, 2, good)
            await wait_queued(executor, 3)
            gate.set()
        nursery.cancel_scope.cancel()
    assert isinstance(outcomes[1], InvalidRequestError)
    expected = reference.step(good)
    torch.testing.assert_close(outcomes[0], expected, **FP32)
    torch.testing.assert_close(outcomes[2], expected, **FP32)
    assert [s.position for s in sessions] == [1, 0, 1]


async def test_device_out_of_memory_is_busy_and_the_queue_goes_on():
    def too_big() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    executor = Executor()
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        with pytest.raises(BusyError, match="out of device memory"):
            await executor.call(Priority.BULK, too_big)
        assert await executor.call(Priority.BULK, lambda: 42) == 42
        nursery.cancel_scope.cancel()


async def test_a_job_abandoned_while_queued_never_runs(span):
    pool = KVCachePool(1 << 24)
    session = span.open_session(pool, batch=1, max_length=8)
    executor = Executor()
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        gate = await hold_worker(nursery, executor)
        with trio.move_on_after(0.1):
            await executor.decode(session, rand(1, 1, H, seed=0))
        gate.set()
        await executor.call(Priority.BULK, lambda: None)  # the queue moved past it
        nursery.cancel_scope.cancel()
    assert session.position == 0


async def test_concurrent_sessions_over_rpc_batched_equal_unbatched(gqa, make_config):
    """Sessions on two sub-spans step concurrently; a batching server and a
    one-at-a-time server give the same outputs (fp32; see FP32 above). Each
    round holds the worker until every session's step is queued, so the
    batches form however fast this machine is."""
    n_sessions, n_steps = 6, 4
    configs = [make_config(gqa, (2, 6)), make_config(gqa, (2, 6), batching=False)]
    outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
    async with running_servers(configs) as (servers, pool), AsyncExitStack() as stack:
        streams: dict[tuple[int, int], tuple[Stream, int]] = {}
        for k, server in enumerate(servers):
            conn = await pool.get(server.address)
            for i in range(n_sessions):
                meta = {"start": 2 + i % 2, "end": 6, "batch": 1 + i % 2, "max_length": 32}
                stream = await stack.enter_async_context(conn.open_stream("inference", meta))
                await stream.receive()
                streams[k, i] = (stream, meta["batch"])
                outputs[k, i] = []

        async def step(k: int, i: int, position: int, x: torch.Tensor) -> None:
            stream, _ = streams[k, i]
            await stream.send({"position": position}, (x,))
            outputs[k, i].append((await stream.receive()).tensors[0])

        for round_ in range(n_steps + 1):
            for k, server in enumerate(servers):
                executor = server.serving.executor
                async with trio.open_nursery() as nursery:
                    gate = await hold_worker(nursery, executor)
                    for i in range(n_sessions):
                        rows = streams[k, i][1]
                        # round 0: a prompt of 2 + i positions; then one position each
                        t, position = (2 + i, 0) if round_ == 0 else (1, 1 + i + round_)
                        x = rand(rows, t, H, seed=100 * i + round_)
                        nursery.start_soon(step, k, i, position, x)
                    if round_ > 0:
                        await wait_queued(executor, n_sessions)
                    gate.set()
        for stream, _ in streams.values():
            await stream.close_send()
    stats = [s.serving.executor.stats for s in servers]
    assert stats[0].batches == 2 * n_steps  # one per sub-span per round
    assert stats[0].largest_batch == n_sessions // 2
    assert stats[1].batches == 0
    for i in range(n_sessions):
        for a, b in zip(outputs[0, i], outputs[1, i], strict=True):
            torch.testing.assert_close(a, b, **FP32)


async def test_an_8192_token_session_on_a_gqa_model(gqa, make_config):
    # One block keeps this affordable on 2 loaded cores; length is the point.
    span = load_span(gqa, 5, 6, progress=False)
    x = rand(1, 8192, H, seed=7)
    config = make_config(gqa, (5, 6), max_length=8192, cache_bytes=16 << 20)
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        meta = {"start": 5, "end": 6, "batch": 1, "max_length": 8192}
        async with conn.open_stream("inference", meta) as stream:
            await stream.receive()
            await stream.send({"position": 0}, (x[:, :8190],))
            prefill = (await stream.receive()).tensors[0]
            last = []
            for p in (8190, 8191):
                await stream.send({"position": p}, (x[:, p : p + 1],))
                reply = await stream.receive()
                assert reply.meta["position"] == p + 1
                last.append(reply.tensors[0])
            await stream.send({"position": 8192}, (x[:, :1],))
            with pytest.raises(InvalidRequestError, match="max_length 8192"):
                await stream.receive()
    with span.open_session(KVCachePool(16 << 20), batch=1, max_length=8192) as local:
        expected = local.step(x)
    # The server's last prefill chunk is 510 positions, the local one 512:
    # another kernel shape, so fp32 rounding rather than bit equality.
    torch.testing.assert_close(prefill, expected[:, :8190], **FP32)
    torch.testing.assert_close(torch.cat(last, dim=1), expected[:, 8190:], **FP32)


async def test_pings_and_info_answer_while_the_worker_computes(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        executor = servers[0].serving.executor
        async with trio.open_nursery() as nursery:
            gate = await hold_worker(nursery, executor)
            nursery.start_soon(
                conn.call, "forward", {"start": 2, "end": 6}, (rand(1, 4, H, seed=1),)
            )
            await wait_queued(executor, 1)
            with trio.fail_after(10):
                for _ in range(5):
                    await conn.call("ping")
                assert (await conn.call("info")).meta["state"] == "online"
            assert executor.queued == 1  # the forward still waits behind the blocker
            gate.set()


async def test_a_session_left_alone_on_its_sub_span_does_not_wait_for_a_batch(span):
    pool = KVCachePool(1 << 24)
    sessions = [span.open_session(pool, batch=1, max_length=8) for _ in range(3)]
    # A window far longer than the test's deadline: any wait would fail it.
    executor = Executor(gather_window=60.0, gather_fraction=1e9)
    one = rand(1, 1, H, seed=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        assert executor.gather_target(sessions[0]) == 1  # no batch seen yet
        async with trio.open_nursery() as work:
            gate = await hold_worker(work, executor)
            for s in sessions:
                work.start_soon(executor.decode, s, one)
            await wait_queued(executor, 3)
            gate.set()
        assert executor.gather_target(sessions[0]) == 3
        sessions[1].close()
        assert executor.gather_target(sessions[0]) == 2
        sessions[2].close()
        assert executor.gather_target(sessions[0]) == 1
        with trio.fail_after(30):
            await executor.decode(sessions[0], one)
        nursery.cancel_scope.cancel()
    assert sessions[0].position == 2


async def test_a_job_that_raises_in_the_compute_thread_fails_its_caller():
    thread = ComputeThread()
    thread.start()
    outcome: list[BaseException | None] = []
    done = trio.Event()

    def report(error: BaseException | None) -> None:
        outcome.append(error)
        done.set()

    def broken() -> None:
        raise RuntimeError("boom")

    thread.submit(broken, report)
    with trio.fail_after(30):
        await done.wait()
    done = trio.Event()
    thread.submit(lambda: None, report)  # the thread lives on
    with trio.fail_after(30):
        await done.wait()
    thread.stop()
    assert isinstance(outcome[0], RuntimeError) and outcome[1] is None


async def test_a_job_finding_the_thread_idle_and_no_queue_skips_the_dispatcher(span):
    pool = KVCachePool(1 << 24)
    sessions = [span.open_session(pool, batch=1, max_length=8) for _ in range(2)]
    executor = Executor(gather_window=0.05, gather_fraction=1e9)
    one = rand(1, 1, H, seed=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        await executor.decode(sessions[0], one)
        assert executor.stats.direct == 1
        async with trio.open_nursery() as work:
            gate = await hold_worker(work, executor)  # idle thread: direct too
            assert executor.stats.direct == 2
            for s in sessions:  # the thread is busy: both queue, then batch
                work.start_soon(executor.decode, s, one)
            await wait_queued(executor, 2)
            gate.set()
        assert executor.stats.direct == 2 and executor.stats.largest_batch == 2
        # Its partner is open, so this step goes through the dispatcher to wait for it.
        await executor.decode(sessions[0], one)
        assert executor.stats.direct == 2
        nursery.cancel_scope.cancel()
    assert [s.position for s in sessions] == [3, 1]


async def test_jobs_queued_when_the_executor_stops_fail_with_draining_error():
    executor = Executor()
    failures: list[DrainingError] = []

    async def queued() -> None:
        try:
            await executor.call(Priority.BULK, lambda: 1)
        except DrainingError as exc:
            failures.append(exc)

    async with trio.open_nursery() as callers:
        async with trio.open_nursery() as runner:
            await runner.start(executor.run)
            gate = await hold_worker(callers, executor)
            callers.start_soon(queued)
            await wait_queued(executor, 1)
            runner.cancel_scope.cancel()
            gate.set()  # the running job ends; the queued one never starts
    assert [str(e) for e in failures] == ["the server is stopping"]
    with pytest.raises(DrainingError, match="not running its compute queue"):
        await executor.call(Priority.BULK, lambda: 1)


async def test_a_lone_sessions_decode_steps_run_on_the_loop_thread_equal_to_the_thread(span):
    pool = KVCachePool(1 << 24)
    session = span.open_session(pool, batch=1, max_length=8)
    reference = span.open_session(pool, batch=1, max_length=8)
    steps = [rand(1, 1, H, seed=i) for i in range(3)]
    executor = Executor(inline_max=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        outs = [await executor.decode(session, h) for h in steps]
        nursery.cancel_scope.cancel()
    # The first step is timed on the compute thread; the next ones run inline.
    assert (executor.stats.direct, executor.stats.inline) == (1, 2)
    for out, h in zip(outs, steps, strict=True):
        torch.testing.assert_close(out, reference.step(h), **EXACT)


@pytest.mark.parametrize("inline_max", [0.0, 1e-9])
async def test_no_inline_step_when_turned_off_or_the_last_pass_was_too_long(span, inline_max):
    pool = KVCachePool(1 << 24)
    session = span.open_session(pool, batch=1, max_length=8)
    executor = Executor(inline_max=inline_max)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        for i in range(3):
            await executor.decode(session, rand(1, 1, H, seed=i))
        nursery.cancel_scope.cancel()
    assert (executor.stats.direct, executor.stats.inline) == (3, 0)


async def test_steps_arriving_during_an_inline_pass_run_as_one_batch_after_it(span):
    pool = KVCachePool(1 << 24)
    lone, *others = [span.open_session(pool, batch=1, max_length=8) for _ in range(3)]
    executor = Executor(inline_max=60.0)
    one = rand(1, 1, H, seed=0)
    arrived = trio.Event()

    async def decode_once_arrived(session) -> None:
        await arrived.wait()
        await executor.decode(session, one)

    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        await executor.decode(lone, one)
        async with trio.open_nursery() as work:
            for s in others:
                work.start_soon(decode_once_arrived, s)
            await trio.testing.wait_all_tasks_blocked()
            # Runnable from now on, but they run only once this task yields:
            # after the inline pass, as if their bytes came during it.
            arrived.set()
            await executor.decode(lone, one)
            assert executor.stats.inline == 1 and executor.stats.batches == 0
        assert (executor.stats.batches, executor.stats.largest_batch) == (1, 2)
        # With others open on its sub-span, the lone session is lone no more.
        await executor.decode(lone, one)
        nursery.cancel_scope.cancel()
    assert executor.stats.inline == 1
    assert [s.position for s in (lone, *others)] == [3, 1, 1]


async def test_a_failing_inline_step_fails_as_on_the_thread(span, monkeypatch):
    pool = KVCachePool(1 << 24)
    session = span.open_session(pool, batch=1, max_length=8)
    executor = Executor(inline_max=60.0)
    one = rand(1, 1, H, seed=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        await executor.decode(session, one)
        with pytest.raises(InvalidRequestError):
            await executor.decode(session, rand(2, 1, H, seed=1))  # wrong batch
        assert session.position == 1

        def out_of_memory(hidden: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

        monkeypatch.setattr(session, "step", out_of_memory)
        with pytest.raises(BusyError, match="out of device memory"):
            await executor.decode(session, one)
        monkeypatch.undo()
        await executor.decode(session, one)  # the session and the queue go on
        nursery.cancel_scope.cancel()
    assert executor.stats.inline == 3 and session.position == 2
