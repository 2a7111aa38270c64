"""DelayProxy: a relay that adds latency, keeps bytes and order, passes TLS
through, propagates closes and resets, and can kill or blackhole a link.

Timing claims are lower bounds (a loaded machine only adds time), except
one loose upper bound that tells a concurrent delay from a serialised one
(half the serialised time)."""

from __future__ import annotations

import functools
import random
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
import trio

from libpipe.errors import (
    ConfigError,
    ConnectionBrokenError,
    ConnectionClosedError,
    DeadlineExceededError,
)
from libpipe.net import (
    CallContext,
    ConnectionConfig,
    DelayProxy,
    Message,
    Router,
    Security,
    connect,
    serve,
)


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """A raw TCP server that echoes every byte and closes when its peer does."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def dial(proxy: DelayProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(proxy.host, proxy.port)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "early EOF"
        data += chunk
    return bytes(data)


async def round_trip(stream: trio.SocketStream) -> float:
    start = trio.current_time()
    await stream.send_all(b"ping")
    assert await receive_exactly(stream, 4) == b"ping"
    return trio.current_time() - start


async def test_round_trip_grows_by_twice_the_delay() -> None:
    delay = 0.02
    async with echo_server() as target:
        async with DelayProxy(target) as direct, DelayProxy(target, delay=delay) as slow:
            fast_stream, slow_stream = await dial(direct), await dial(slow)
            fast = statistics.median([await round_trip(fast_stream) for _ in range(5)])
            delayed = statistics.median([await round_trip(slow_stream) for _ in range(5)])
            await fast_stream.aclose()
            await slow_stream.aclose()
    assert delayed >= 2 * delay * 0.95
    assert delayed > fast


async def test_delay_is_concurrent_not_per_chunk() -> None:
    delay, chunks = 0.05, 20
    async with echo_server() as target, DelayProxy(target, delay=delay) as proxy:
        stream = await dial(proxy)
        start = trio.current_time()
        for i in range(chunks):
            await stream.send_all(bytes([i]) * 10)
            await trio.sleep(0.002)
        received = await receive_exactly(stream, 10 * chunks)
        elapsed = trio.current_time() - start
        await stream.aclose()
    assert received == b"".join(bytes([i]) * 10 for i in range(chunks))
    assert elapsed >= 2 * delay * 0.95
    # Serialised, the chunks would take chunks x 2 x delay = 2 s; concurrent,
    # about 2 x delay. Half the serialised time leaves room for a loaded box.
    assert elapsed < chunks * 2 * delay / 2


async def test_bytes_and_order_survive_and_are_counted() -> None:
    rng = random.Random(7)
    payload = rng.randbytes(3 * 1024 * 1024)
    async with echo_server() as target, DelayProxy(target, delay=0.002) as proxy:
        stream = await dial(proxy)
        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                view = memoryview(payload)
                while view:
                    n = rng.randrange(1, 200_000)
                    await stream.send_all(view[:n])
                    view = view[n:]

            nursery.start_soon(writer)
            echoed = await receive_exactly(stream, len(payload))
        await stream.aclose()
        assert echoed == payload
        assert proxy.bytes_to_target == proxy.bytes_to_client == len(payload)
        assert proxy.connections_accepted == 1


async def test_small_buffer_still_relays_everything() -> None:
    # The reader waits for room instead of queueing without bound.
    payload = random.Random(1).randbytes(1024 * 1024)
    async with (
        echo_server() as target,
        DelayProxy(target, delay=0.001, buffer_bytes=64 * 1024) as proxy,
    ):
        stream = await dial(proxy)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, payload)
            assert await receive_exactly(stream, len(payload)) == payload
        await stream.aclose()


async def test_bandwidth_cap_slows_a_transfer() -> None:
    size, bandwidth = 200_000, 1_000_000
    async with echo_server() as target, DelayProxy(target, bandwidth=bandwidth) as proxy:
        stream = await dial(proxy)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, bytes(size))
            await receive_exactly(stream, size)
        elapsed = trio.current_time() - start
        await stream.aclose()
    # Each direction serialises the bytes at the cap; the two overlap.
    assert elapsed >= size / bandwidth * 0.95


async def test_closing_the_client_closes_the_target_side() -> None:
    seen_eof = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(10) == b""
        seen_eof.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        async with DelayProxy(listeners[0].socket.getsockname()[:2], delay=0.005) as proxy:
            stream = await dial(proxy)
            await stream.aclose()
            with trio.fail_after(5):
                await seen_eof.wait()
            with trio.fail_after(5):
                while proxy.live_connections:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_closing_the_target_closes_the_client_side() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        async with DelayProxy(listeners[0].socket.getsockname()[:2], delay=0.005) as proxy:
            stream = await dial(proxy)
            with trio.fail_after(5):
                assert await receive_exactly(stream, 3) == b"bye"
                assert await stream.receive_some(10) == b""
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_unreachable_target_resets_the_client() -> None:
    with trio.socket.socket() as placeholder:
        await placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: refused
        async with DelayProxy(f"127.0.0.1:{port}") as proxy:
            stream = await dial(proxy)
            with trio.fail_after(5):
                try:
                    assert await stream.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass
            await stream.aclose()


def echo_router() -> Router:
    router = Router()

    async def echo(ctx: CallContext, request: Message) -> Message:
        return Message({**request.meta, "peer": ctx.peer_id}, request.tensors)

    router.unary("echo", echo)
    return router


@asynccontextmanager
async def served(security: Security) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve(
                echo_router(), host="127.0.0.1", port=0, security=security, task_status=task_status
            )
        )
        yield address
        nursery.cancel_scope.cancel()


async def test_tls_passes_through_intact(
    server_security: Security, client_security: Security
) -> None:
    tensor = torch.randn(1, 4, 64, dtype=torch.float16)
    async with served(server_security) as target, DelayProxy(target, delay=0.002) as proxy:
        async with connect(
            proxy.host,
            proxy.port,
            security=client_security,
            expected_peer_id=server_security.peer_id,
        ) as connection:
            reply = await connection.call("echo", {"n": 1}, [tensor], timeout=10)
        assert reply.meta == {"n": 1, "peer": client_security.peer_id}
        assert torch.equal(reply.tensors[0], tensor)
        assert proxy.bytes_to_target > tensor.numel() * 2
        assert proxy.bytes_to_client > tensor.numel() * 2


async def test_kill_resets_live_connections_and_keeps_relaying() -> None:
    security = Security.insecure()
    async with served(security) as target, DelayProxy(target) as proxy:
        async with connect(proxy.host, proxy.port, security=security) as connection:
            await connection.call("echo", {}, timeout=10)
            proxy.kill()
            with pytest.raises((ConnectionBrokenError, ConnectionClosedError)):
                with trio.fail_after(5):
                    while True:
                        await connection.call("echo", {}, timeout=10)
                        await trio.sleep(0.01)
        async with connect(proxy.host, proxy.port, security=security) as connection:
            assert (await connection.call("echo", {"again": True}, timeout=10)).meta["again"]


async def test_blackhole_drops_silently_until_lifted() -> None:
    async with echo_server() as target, DelayProxy(target) as proxy:
        stream = await dial(proxy)
        proxy.blackhole = True
        await stream.send_all(b"lost")
        with trio.move_on_after(0.1) as scope:
            await stream.receive_some(10)
        assert scope.cancelled_caught
        assert proxy.bytes_dropped >= 4
        proxy.blackhole = False
        assert await round_trip(stream) >= 0
        await stream.aclose()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": -0.01},
        {"delay": float("nan")},
        {"delay": 0.01, "reverse_delay": float("inf")},
        {"bandwidth": 0},
        {"buffer_bytes": 10},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        DelayProxy(("127.0.0.1", 1), **kwargs)


def test_bad_target_is_refused() -> None:
    with pytest.raises(ConfigError):
        DelayProxy("localhost")


async def test_set_delay_validates_and_keeps_old_values() -> None:
    proxy = DelayProxy(("127.0.0.1", 1), delay=0.01)
    with pytest.raises(ConfigError):
        proxy.set_delay(-1)
    assert (proxy.delay, proxy.reverse_delay) == (0.01, 0.01)
    proxy.set_delay(0.02, 0.03)
    assert (proxy.delay, proxy.reverse_delay) == (0.02, 0.03)
    with pytest.raises(ConnectionClosedError):
        _ = proxy.address


async def test_a_call_cancelled_mid_frame_leaves_the_connection_whole() -> None:
    """A 16 MiB request through a slow link is cut by its caller's timeout
    mid-write; the message is finished behind the caller's back (half a
    frame would break every stream), the peer is told to cancel, and the
    same connection serves the next call."""
    security = Security.insecure()
    big = torch.randn(8 * 1024 * 1024).to(torch.float16)
    async with (
        served(security) as target,
        DelayProxy(target, bandwidth=40e6, buffer_bytes=256 * 1024) as proxy,
        connect(
            proxy.host, proxy.port, security=security, config=ConnectionConfig(compression=False)
        ) as connection,
    ):
        with pytest.raises(DeadlineExceededError):
            await connection.call("echo", {}, [big], timeout=0.05)
        assert not connection.is_closed
        reply = await connection.call("echo", {"after": 1}, timeout=20)
        assert reply.meta["after"] == 1
        # The frame goes whole (its slices, between which the small call
        # above may have gone).
        with trio.fail_after(20):
            while proxy.bytes_to_target <= big.numel() * 2:
                await trio.sleep(0.01)
        assert not connection.is_closed


async def test_keepalive_finds_a_link_that_went_silent() -> None:
    """A black-holed link neither closes nor resets: only keepalive can tell."""
    security = Security.insecure()
    config = ConnectionConfig(keepalive_interval=0.1, idle_timeout=0.4)
    async with served(security) as target, DelayProxy(target) as proxy:
        async with connect(proxy.host, proxy.port, security=security, config=config) as conn:
            await conn.call("echo", {}, timeout=10)
            proxy.blackhole = True
            with trio.fail_after(10):
                await conn.wait_closed()
            assert isinstance(conn.error, ConnectionBrokenError)
            assert "silent" in str(conn.error)


async def test_a_black_hole_swallows_the_close_until_killed() -> None:
    ended = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(10)
        except trio.BrokenResourceError:
            pass
        ended.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        async with DelayProxy(listeners[0].socket.getsockname()[:2]) as proxy:
            stream = await dial(proxy)
            proxy.blackhole = True
            await stream.aclose()
            with trio.move_on_after(0.1):
                await ended.wait()
            assert not ended.is_set()
            proxy.kill()
            with trio.fail_after(5):
                await ended.wait()
        nursery.cancel_scope.cancel()
