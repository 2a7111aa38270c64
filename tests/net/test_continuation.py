"""Bulk payloads go as continued messages: a small call overtakes the rest
of a large message already being written, not only queued ones."""

from __future__ import annotations

import functools

import torch
import trio

from libpipe.net import (
    CallContext,
    ConnectionConfig,
    DelayProxy,
    Message,
    Router,
    Security,
    Stream,
    connect,
    serve,
)
from libpipe.net._connection import SLICE_BYTES


async def test_a_small_call_goes_between_the_slices_of_a_large_message() -> None:
    security = Security.insecure()
    seen: list[str] = []
    received = trio.Event()
    router = Router()

    async def echo(ctx: CallContext, request: Message) -> Message:
        seen.append("call")
        return request

    async def sink(ctx: CallContext, stream: Stream) -> None:
        async for message in stream:
            seen.append(f"message of {message.tensors[0].nbytes} bytes")
            received.set()

    router.unary("echo", echo)
    router.stream("sink", sink)
    big = torch.randn(4 * SLICE_BYTES // 4)  # 4 slices
    config = ConnectionConfig(compression=False)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(serve, router, host="127.0.0.1", port=0, security=security)
        )
        # 4 MiB at 20 MB/s: the message takes ~0.2 s on the link.
        async with (
            DelayProxy((host, port), bandwidth=20e6, buffer_bytes=256 * 1024) as proxy,
            connect(proxy.host, proxy.port, security=security, config=config) as conn,
            conn.open_stream("sink") as stream,
        ):
            async with trio.open_nursery() as sending:
                sending.start_soon(stream.send, {}, (big,))
                with trio.fail_after(20):
                    while not conn._turn.busy:
                        await trio.sleep(0)
                    reply = await conn.call("echo", {"n": 1})
            assert reply.meta == {"n": 1}
            with trio.fail_after(20):
                await received.wait()
            await stream.close_send()
        nursery.cancel_scope.cancel()
    assert seen == ["call", f"message of {big.nbytes} bytes"]


async def test_a_peer_that_turns_continuation_off_gets_whole_frames() -> None:
    security = Security.insecure()
    router = Router()
    got: list[int] = []

    async def sink(ctx: CallContext, stream: Stream) -> None:
        async for message in stream:
            got.append(message.tensors[0].nbytes)

    router.stream("sink", sink)
    big = torch.randn(2 * SLICE_BYTES // 4)
    config = ConnectionConfig(compression=False, continuation=False)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(serve, router, host="127.0.0.1", port=0, security=security)
        )
        async with connect(host, port, security=security, config=config) as conn:
            assert conn._wire.local_hello is not None
            assert "continuation" not in conn._wire.local_hello.features
            assert "continuation" in conn.peer_hello.features  # the server's default
            assert not conn._wire._continue_out
            async with conn.open_stream("sink") as stream:
                await stream.send({}, (big,))
                await stream.close_send()
                with trio.fail_after(20):
                    while not got:
                        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == [big.nbytes]
