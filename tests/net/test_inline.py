"""Unary methods answered inline, on the connection's reader task
(``Router.unary_inline``): the same answers and errors as a handler task,
and a reader that never waits for the send turn."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
import trio

from libpipe.errors import CacheFullError, ConfigError, RemoteError
from libpipe.net import CallContext, Connection, ConnectionConfig, Message, Router, Stream
from libpipe.net._transport import SocketStream
from libpipe.wire import Role

SOCKET_BUFFER = 64 * 1024
FLOOD_FRAMES = 8


@asynccontextmanager
async def socket_pair(
    router: Router, client_config: ConnectionConfig | None = None
) -> AsyncIterator[tuple[Connection, Connection]]:
    """A dialer and an acceptor over loopback TCP (inline answers need a
    socket: they are written without waiting). Small kernel buffers, fixed
    (loopback autotuning here lets tens of MiB sit in them), so that a
    peer that stops reading soon stops the writer."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.socket()
        for sock in (a, listener):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    client = Connection(
        SocketStream(a),
        role=Role.DIALER,
        local_peer_id="client",
        address="pair",
        config=client_config,
    )
    server = Connection(
        SocketStream(b), role=Role.ACCEPTOR, local_peer_id="server", address="pair", router=router
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await nursery.start(client.run)
        yield client, server
        nursery.cancel_scope.cancel()


def inline_router() -> Router:
    router = Router()

    def echo(ctx: CallContext, request: Message) -> Message:
        return Message({**request.meta, "peer": ctx.peer_id}, request.tensors)

    def full(ctx: CallContext, request: Message) -> Message:
        raise CacheFullError("no room", requested=10, free=3)

    def crash(ctx: CallContext, request: Message) -> Message:
        raise RuntimeError("boom")

    def not_a_message(ctx: CallContext, request: Message) -> Message:
        return {"x": 1}  # type: ignore[return-value]

    def unencodable(ctx: CallContext, request: Message) -> Message:
        return Message({"x": object()})

    router.unary_inline("echo", echo)
    router.unary_inline("full", full)
    router.unary_inline("crash", crash)
    router.unary_inline("not_a_message", not_a_message)
    router.unary_inline("unencodable", unencodable)
    return router


async def test_inline_answers_and_errors_match_handler_tasks() -> None:
    tensor = torch.arange(6, dtype=torch.float16).reshape(1, 2, 3)
    async with socket_pair(inline_router()) as (client, server):
        reply = await client.call("echo", {"x": 1}, (tensor,))
        assert reply.meta == {"x": 1, "peer": "client"}
        assert torch.equal(reply.tensors[0], tensor)
        with pytest.raises(CacheFullError) as caught:
            await client.call("full")
        assert caught.value.remote and caught.value.details == {"requested": 10, "free": 3}
        with pytest.raises(RemoteError, match="RuntimeError: boom"):
            await client.call("crash")
        with pytest.raises(RemoteError, match="not Message"):
            await client.call("not_a_message")
        with pytest.raises(RemoteError, match="unencodable reply"):
            await client.call("unencodable")
        assert (await client.call("echo", {"still": "ok"})).meta["still"] == "ok"
        assert server.in_flight == 0 and not server._turn.busy


async def test_inline_call_while_a_frame_is_stuck_does_not_hold_the_reader() -> None:
    """The server is mid-write of a big frame the client does not read: an
    inline call goes to a handler task, and the reader goes on reading (a
    later call is handled) instead of waiting for the turn."""
    router = inline_router()
    big = torch.zeros(1024 * 1024, dtype=torch.float16)  # 2 MiB: >> SOCKET_BUFFER
    marked = trio.Event()

    async def flood(ctx: CallContext, stream: Stream) -> None:
        for _ in range(FLOOD_FRAMES):
            await stream.send({}, (big,))

    async def mark(ctx: CallContext, request: Message) -> Message:
        marked.set()
        return Message()

    router.stream("flood", flood)
    router.unary("mark", mark)
    replies: list[Message] = []
    # A full inbox (one message) stalls the client's reader, so a later
    # frame cannot be written whole (uncompressed: zeros shrink to nothing).
    async with socket_pair(router, ConnectionConfig(stream_buffer=1, compression=False)) as (
        client,
        server,
    ):
        async with client.open_stream("flood") as stream:
            with trio.fail_after(30):
                while not (server._turn.busy and client._stalled):
                    await trio.sleep(0.01)
            async with trio.open_nursery() as nursery:

                async def call(method: str) -> None:
                    replies.append(await client.call(method, {"m": method}))

                nursery.start_soon(call, "echo")
                nursery.start_soon(call, "mark")
                with trio.fail_after(30):
                    await marked.wait()
                assert server._turn.busy and replies == []
                received = [message async for message in stream]
            assert len(received) == FLOOD_FRAMES
        assert sorted(r.meta.get("m", "") for r in replies) == ["", "echo"]


def test_inline_method_names_are_checked() -> None:
    router = Router()
    router.unary_inline("info", lambda ctx, request: request)
    with pytest.raises(ConfigError):
        router.unary_inline("info", lambda ctx, request: request)
    with pytest.raises(ConfigError):
        router.unary_inline("", lambda ctx, request: request)
