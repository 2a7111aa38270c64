"""Every bad request gets its typed error, and the server is unaffected:
the next good request works and no cache or session is left behind."""

from __future__ import annotations

import threading

import pytest
import torch
import trio

from libpipe.errors import (
    BusyError,
    CacheFullError,
    ConnectionClosedError,
    DrainingError,
    InvalidRequestError,
    SessionError,
    TensorOverflowError,
)
from libpipe.net import Connection, ConnectionPool, Security

from .conftest import running_servers

H = 64  # hidden size of the test presets


def x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


async def assert_healthy(conn: Connection) -> None:
    reply = await conn.call("forward", {"start": 2, "end": 6}, (x(1, 3, H),))
    assert reply.tensors[0].shape == (1, 3, H)
    info = (await conn.call("info")).meta
    assert info["active_sessions"] == 0
    assert info["cache_bytes_free"] == info["cache_bytes_total"]


FORWARD_CASES = [
    ({"end": 6}, (x(1, 3, H),), "lacks 'start'"),
    ({"start": "2", "end": 6}, (x(1, 3, H),), "'start' must be an integer"),
    ({"start": True, "end": 6}, (x(1, 3, H),), "'start' must be an integer"),
    ({"start": 0, "end": 6}, (x(1, 3, H),), r"not within this server's span \[2, 6\)"),
    ({"start": 4, "end": 4}, (x(1, 3, H),), r"blocks \[4, 4\)"),
    ({"start": 2, "end": 7}, (x(1, 3, H),), "not within"),
    ({"start": 2, "end": 6}, (), "takes 1 or 2 tensor"),
    ({"start": 2, "end": 6}, (x(1, 3, H),) * 3, "takes 1 or 2 tensor"),
    ({"start": 2, "end": 6}, (x(1, 3, 32),), r"shape \[1, 3, 32\]"),
    ({"start": 2, "end": 6}, (x(3, H),), r"shape \[3, 64\]"),
    ({"start": 2, "end": 6}, (x(1, 0, H),), r"shape \[1, 0, 64\]"),
    ({"start": 2, "end": 6}, (x(1, 3, H, dtype=torch.float64),), "float64"),
    ({"start": 2, "end": 6}, (torch.ones(1, 3, H, dtype=torch.int32),), "int32"),
    ({"start": 2, "end": 6, "adapter": "nope"}, (x(1, 3, H),), "unknown adapter"),
    ({"start": 2, "end": 6}, (x(1, 3, H), x(4, 1, 4, H)), r"deep prompts have shape"),
    ({"start": 2, "end": 6}, (x(1, 3, H), x(3, 1, 2, H)), r"deep prompts have shape"),
    ({"start": 2, "end": 6}, (x(1, 40, H),), "more than this server's max_length 32"),
]


async def test_bad_forward_and_backward_requests(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6), max_length=32)]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        for meta, tensors, message in FORWARD_CASES:
            with pytest.raises(InvalidRequestError, match=message):
                await conn.call("forward", meta, tensors)
            with pytest.raises(InvalidRequestError):
                await conn.call("backward", meta, (*tensors[:1], x(1, 3, H), *tensors[1:]))
        with pytest.raises(InvalidRequestError, match=r"output gradients have shape \[1, 2, 64\]"):
            await conn.call("backward", {"start": 2, "end": 6}, (x(1, 3, H), x(1, 2, H)))
        with pytest.raises(InvalidRequestError, match="takes 2 or 3 tensor"):
            await conn.call("backward", {"start": 2, "end": 6}, (x(1, 3, H),))
        with pytest.raises(InvalidRequestError, match="unknown method"):
            await conn.call("no_such_method", {})
        await assert_healthy(conn)


async def test_a_reply_that_would_overflow_fp16_is_refused(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        hidden = x(1, 3, H, dtype=torch.float16)
        huge_prompt = torch.full((4, 1, 1, H), 1e6)  # fp32: fine; the fp16 reply is not
        with pytest.raises(TensorOverflowError, match="overflows"):
            await conn.call("forward", {"start": 2, "end": 6}, (hidden, huge_prompt))
        reply = await conn.call("forward", {"start": 2, "end": 6}, (hidden,))
        assert reply.tensors[0].dtype == torch.float16
        await assert_healthy(conn)


OPEN_CASES = [
    ({"start": 2, "end": 6, "max_length": 8}, "lacks 'batch'"),
    ({"start": 2, "end": 6, "batch": 0, "max_length": 8}, "'batch' must be >= 1"),
    ({"start": 2, "end": 6, "batch": 1}, "lacks 'max_length'"),
    ({"start": 2, "end": 6, "batch": 1, "max_length": 0}, "'max_length' must be >= 1"),
    ({"start": 2, "end": 6, "batch": 1, "max_length": 33}, "over this server's 32"),
    ({"start": 1, "end": 6, "batch": 1, "max_length": 8}, "not within"),
    ({"start": 2, "end": 6, "batch": 1, "max_length": 8, "adapter": 3}, "unknown adapter"),
]


async def test_bad_session_openings(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6), max_length=32)]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        for meta, message in OPEN_CASES:
            async with conn.open_stream("inference", meta) as stream:
                with pytest.raises(InvalidRequestError, match=message):
                    await stream.receive()
        await assert_healthy(conn)


GOOD = {"start": 2, "end": 6, "batch": 2, "max_length": 8}
STEP_CASES = [
    ({}, (x(2, 1, H),), "lacks 'position'"),
    ({"position": -1}, (x(2, 1, H),), "'position' must be >= 0"),
    ({"position": 4}, (x(2, 1, H),), "step at position 4 but the session is at 3"),
    ({"position": 3}, (x(2, 6, H),), "pass the session's max_length 8"),
    ({"position": 3}, (x(1, 1, H),), r"shape \[1, 1, 64\], expected \[2, "),
    ({"position": 3}, (x(2, 1, 16),), r"shape \[2, 1, 16\]"),
    ({"position": 3}, (x(2, 1, H, dtype=torch.float64),), "float64"),
    ({"position": 3}, (x(2, 1, H), x(2, 1, H)), "takes 1 tensor"),
    ({"position": 3}, (), "takes 1 tensor"),
    ({"position": 3, "step": "one"}, (x(2, 1, H),), "'step' must be an integer"),
    ({"position": 3, "step": True}, (x(2, 1, H),), "'step' must be an integer"),
]


async def test_a_bad_step_ends_only_its_own_session(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6), max_length=32)]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        async with conn.open_stream("inference", GOOD) as bystander:
            await bystander.receive()
            for meta, tensors, message in STEP_CASES:
                async with conn.open_stream("inference", GOOD) as stream:
                    await stream.receive()
                    await stream.send({"position": 0}, (x(2, 3, H),))
                    assert (await stream.receive()).meta == {"position": 3}
                    await stream.send(meta, tensors)
                    with pytest.raises(InvalidRequestError, match=message):
                        await stream.receive()
                # The other session carries on at its own position.
                await bystander.send({"position": 0}, (x(2, 1, H),))
                assert (await bystander.receive()).meta == {"position": 1}
            await bystander.close_send()
        await assert_healthy(conn)


async def test_session_used_after_close(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        async with conn.open_stream("inference", GOOD) as stream:
            await stream.receive()
            await stream.close_send()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()  # the server closed its side: cache freed
            with pytest.raises(ConnectionClosedError):
                await stream.send({"position": 0}, (x(2, 1, H),))
        await assert_healthy(conn)


async def test_idle_session_times_out_and_frees_its_cache(gqa, make_config):
    config = make_config(gqa, (2, 6), idle_timeout=1.5)  # long enough for the info call under load
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        async with conn.open_stream("inference", GOOD) as stream:
            await stream.receive()
            info = (await conn.call("info")).meta
            assert info["active_sessions"] == 1
            assert info["cache_bytes_free"] < info["cache_bytes_total"]
            with pytest.raises(SessionError, match=r"idle for 1\.5 s"):
                await stream.receive()
        await assert_healthy(conn)


async def test_cache_exhaustion_is_cache_full_with_sizes(gqa, make_config):
    # One session of batch 2 x 8 positions over 4 GQA blocks: 4*2*2*2*8*16*4 = 16 KiB.
    config = make_config(gqa, (2, 6), cache_bytes=20_000)
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        async with conn.open_stream("inference", GOOD) as first:
            await first.receive()
            async with conn.open_stream("inference", GOOD) as second:
                with pytest.raises(CacheFullError) as caught:
                    await second.receive()
            assert caught.value.details == {"requested": 16384, "free": 20_000 - 16384}
            await first.send({"position": 0}, (x(2, 2, H),))
            assert (await first.receive()).meta == {"position": 2}
            await first.close_send()
        await assert_healthy(conn)


async def test_draining_server_refuses_new_work_but_finishes_sessions(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6), drain_grace=30)]) as (servers, pool):
        server = servers[0]
        conn = await pool.get(server.address)
        async with trio.open_nursery() as nursery, conn.open_stream("inference", GOOD) as stream:
            await stream.receive()
            nursery.start_soon(server.drain)
            with trio.fail_after(10):
                while (await conn.call("info")).meta["state"] != "draining":
                    await trio.sleep(0.01)
            with pytest.raises(DrainingError):
                await conn.call("forward", {"start": 2, "end": 6}, (x(1, 1, H),))
            async with conn.open_stream("inference", GOOD) as refused:
                with pytest.raises(DrainingError):
                    await refused.receive()
            await stream.send({"position": 0}, (x(2, 1, H),))
            assert (await stream.receive()).meta == {"position": 1}
            await stream.close_send()


async def test_drain_grace_ends_open_sessions_with_draining_error(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6), drain_grace=0.2)]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        async with trio.open_nursery() as nursery, conn.open_stream("inference", GOOD) as stream:
            await stream.receive()
            nursery.start_soon(servers[0].drain)
            with trio.fail_after(15), pytest.raises(DrainingError, match="shut down before"):
                await stream.receive()


async def test_a_client_that_vanishes_mid_session_frees_its_cache(gqa, make_config):
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        async with ConnectionPool(Security.insecure()) as other:
            doomed = await other.get(servers[0].address)
            async with doomed.open_stream("inference", GOOD) as stream:
                await stream.receive()
                await stream.send({"position": 0}, (x(2, 3, H),))
                assert (await stream.receive()).meta == {"position": 3}
                assert (await conn.call("info")).meta["active_sessions"] == 1
                doomed.abort()  # the socket closes with no goodbye, as a crashed client's does
                # The server hears of it from the socket alone, not from this stream closing.
                with trio.fail_after(15):
                    while (await conn.call("info")).meta["active_sessions"]:
                        await trio.sleep(0.05)
        await assert_healthy(conn)


async def test_a_chunked_forward_that_finds_the_cache_full_is_cache_full(gqa, make_config):
    # 20 tokens > prefill_chunk 8: the forward takes a one-block cache of
    # 2*2*16*20*4 = 5120 bytes; the open session leaves 20_000 - 16384.
    config = make_config(gqa, (2, 6), cache_bytes=20_000, prefill_chunk=8)
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        long = x(1, 20, H)
        async with conn.open_stream("inference", GOOD) as session:
            await session.receive()
            with pytest.raises(CacheFullError):
                await conn.call("forward", {"start": 2, "end": 6}, (long,))
            await session.close_send()
        reply = await conn.call("forward", {"start": 2, "end": 6}, (long,))
        assert reply.tensors[0].shape == (1, 20, H)
        await assert_healthy(conn)


async def test_a_step_back_to_an_earlier_position_recomputes_from_there(gqa, make_config):
    prompt, first, second = x(2, 3, H), x(2, 1, H), x(2, 1, H)
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)

        async def run(steps: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
            async with conn.open_stream("inference", GOOD) as stream:
                await stream.receive()
                for position, hidden in steps:
                    await stream.send({"position": position}, (hidden,))
                    reply = await stream.receive()
                    assert reply.meta == {"position": position + hidden.shape[1]}
                await stream.close_send()
            return reply.tensors[0]

        rolled_back = await run([(0, prompt), (3, first), (3, second)])
        straight = await run([(0, prompt), (3, second)])
        differs = await run([(0, prompt), (3, first), (4, second)])
        torch.testing.assert_close(rolled_back, straight)
        assert not torch.allclose(differs, straight)  # position 3 matters: the check can fail
        await assert_healthy(conn)


async def test_nan_or_infinite_inputs_are_invalid_requests(gqa, make_config):
    """Checked on the worker before any block runs: a NaN would spread to
    every later position of its row and come back as noise."""
    async with running_servers([make_config(gqa, (2, 6))]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        fine, nan = x(2, 3, H), x(2, 3, H)
        nan[1, 2, 5] = float("nan")
        inf_prompts = x(4, 2, 2, H)
        inf_prompts[3, 0, 0, 0] = float("-inf")
        span = {"start": 2, "end": 6}
        cases = [
            ("forward", (nan,), "hidden states hold 1 NaN or infinite"),
            ("forward", (fine, inf_prompts), "deep prompts hold 1 NaN or infinite"),
            ("backward", (nan, fine), "hidden states hold 1 NaN"),
            ("backward", (fine, nan), "output gradients hold 1 NaN"),
            ("backward", (fine, fine, inf_prompts), "deep prompts hold 1 NaN"),
        ]
        for method, tensors, message in cases:
            with pytest.raises(InvalidRequestError, match=message):
                await conn.call(method, span, tensors)
        await assert_healthy(conn)


async def test_forward_backward_inputs_past_the_bulk_limit_are_busy(gqa, make_config):
    """Queued calls keep their inputs in memory: past bulk_bytes of them a
    new call is busy, a call alone is always taken, and the bytes are given
    back when calls end (also when they fail)."""
    async with running_servers([make_config(gqa, (2, 6), bulk_bytes=2000)]) as (servers, pool):
        serving = servers[0].serving
        conn = await pool.get(servers[0].address)
        span = {"start": 2, "end": 6}
        entered, gate = threading.Event(), threading.Event()
        forward = serving.span.forward

        def held_forward(*args, **kwargs):
            entered.set()
            gate.wait(30)
            return forward(*args, **kwargs)

        serving.span.forward = held_forward
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.call, "forward", span, (x(1, 3, H),))  # 768 bytes
            await trio.to_thread.run_sync(entered.wait, 30)
            assert serving.bulk_bytes == 768
            with pytest.raises(BusyError, match="limit of 2000"):
                await conn.call("forward", span, (x(1, 5, H),))  # 1280 more
            with pytest.raises(BusyError):
                await conn.call("backward", span, (x(1, 3, H), x(1, 3, H)))
            gate.set()
        del serving.span.forward
        assert serving.bulk_bytes == 0
        big = await conn.call("forward", span, (x(1, 9, H),))  # 2304 bytes, alone: taken
        assert big.tensors[0].shape == (1, 9, H)
        with pytest.raises(InvalidRequestError):
            await conn.call("forward", span, (torch.full((1, 3, H), float("nan")),))
        assert serving.bulk_bytes == 0
        await assert_healthy(conn)
