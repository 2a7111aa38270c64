"""Cancels racing replies: frames cross on the wire, and neither end may
take the other's late frame for an error, log it, or lose track of a call.

The send path is held up deterministically: the client's stream is gated,
so a frame written while the gate is shut keeps the send lock, and frames
queued behind it wait exactly where the race lives."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
import trio
import trio.testing

from libpipe.errors import CacheFullError
from libpipe.net import CallContext, Connection, Message, Router
from libpipe.wire import (
    NEED_DATA,
    Cancel,
    Hello,
    Notify,
    Request,
    Response,
    Role,
    WireConnection,
)


class GatedStream(trio.abc.Stream):
    """A stream whose writes wait while the gate is shut."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self._gate = trio.Event()
        self._gate.set()

    def shut(self) -> None:
        self._gate = trio.Event()

    def open(self) -> None:
        self._gate.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._gate.wait()
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def gated_pair(router: Router) -> AsyncIterator[tuple[Connection, Connection, GatedStream]]:
    a, b = trio.testing.memory_stream_pair()
    gate = GatedStream(a)
    client = Connection(gate, role=Role.DIALER, local_peer_id="client", address="mem")
    server = Connection(b, role=Role.ACCEPTOR, local_peer_id="server", address="mem", router=router)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await nursery.start(client.run)
        yield client, server, gate
        nursery.cancel_scope.cancel()


async def test_an_abandoned_call_is_in_flight_until_its_cancel_is_written() -> None:
    started, cancelled = trio.Event(), trio.Event()
    router = Router()

    async def forever(ctx: CallContext, request: Message) -> Message:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    router.unary("forever", forever)
    async with gated_pair(router) as (client, server, gate):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def abandoned_call() -> None:
                with scope:
                    await client.call("forever")

            nursery.start_soon(abandoned_call)
            await started.wait()
            gate.shut()
            nursery.start_soon(client.notify, "held")  # takes the send lock, then waits
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            # The Cancel waits for the lock: the call is still ours.
            assert client.in_flight == 1
            gate.open()
        with trio.fail_after(5):
            await cancelled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert client.in_flight == 0 and server.in_flight == 0


def _hello(role: Role) -> Hello:
    return Hello(1, "raw-peer", role.value, "", frozenset(), {})


def _drain(wire: WireConnection, data: bytes) -> list[object]:
    wire.receive_data(data)
    events = []
    while (event := wire.next_event()) is not NEED_DATA:
        events.append(event)
    return events


async def test_a_reply_racing_the_cancel_is_dropped_and_the_cancel_not_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    gate = GatedStream(a)
    client = Connection(gate, role=Role.DIALER, local_peer_id="client", address="mem")
    peer = WireConnection(Role.ACCEPTOR, compression=False)
    await b.send_all(b"".join(peer.send(_hello(Role.ACCEPTOR))))
    with caplog.at_level(logging.INFO, logger="libpipe.net"):
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            scope = trio.CancelScope()

            async def abandoned_call() -> None:
                with scope:
                    await client.call("m")

            nursery.start_soon(abandoned_call)
            await trio.testing.wait_all_tasks_blocked()
            events = _drain(peer, await b.receive_some())
            assert isinstance(events[0], Hello) and isinstance(events[1], Request)
            sid = events[1].stream_id
            gate.shut()
            nursery.start_soon(client.notify, "held")
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            # The peer answers before it sees the Cancel (still unwritten).
            await b.send_all(b"".join(peer.send(Response(sid, {"late": True}))))
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
            await trio.testing.wait_all_tasks_blocked()
            assert client.in_flight == 0
            events = _drain(peer, await b.receive_some())
            assert events == [Notify("held", {})]  # and no Cancel for a call it answered
            assert not any(isinstance(e, Cancel) for e in events)
            # The connection goes on.
            nursery.start_soon(client.call, "m")
            await trio.testing.wait_all_tasks_blocked()
            (request,) = _drain(peer, await b.receive_some())
            await b.send_all(b"".join(peer.send(Response(request.stream_id))))
            await trio.testing.wait_all_tasks_blocked()
            assert client.in_flight == 0 and not client.is_closed
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("reply", ["plain", "large", "unencodable", "error"])
async def test_a_handler_reply_after_the_peer_cancelled_is_dropped_quietly(
    reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    release, started = trio.Event(), trio.Event()
    router = Router()

    async def stubborn(ctx: CallContext, request: Message) -> Message:
        started.set()
        # Work that does not stop when cancelled (a kernel, a thread).
        with trio.CancelScope(shield=True):
            await release.wait()
        if reply == "error":
            raise CacheFullError("no room")
        if reply == "unencodable":
            return Message({"x": object()})
        if reply == "large":
            return Message({}, (torch.randn(1, 256, 4096).to(torch.float16),))
        return Message({"ok": True})

    async def echo(ctx: CallContext, request: Message) -> Message:
        return request

    router.unary("stubborn", stubborn)
    router.unary("echo", echo)
    with caplog.at_level(logging.INFO, logger="libpipe.net"):
        async with gated_pair(router) as (client, server, _):
            with trio.move_on_after(5) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.call, "stubborn")
                    await started.wait()
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
            await trio.testing.wait_all_tasks_blocked()
            assert server.in_flight == 1  # the handler runs on, its stream ended
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert server.in_flight == 0 and not server.is_closed
            assert (await client.call("echo", {"after": 1})).meta == {"after": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
