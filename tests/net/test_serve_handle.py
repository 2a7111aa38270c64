"""ServeHandle: a server stops accepting while its connections finish."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from libpipe.errors import ConnectionBrokenError, ConnectionClosedError
from libpipe.net import CallContext, Message, Router, Security, ServeHandle, connect, serve


def slow_router(gate: trio.Event, started: trio.Event | None = None) -> Router:
    router = Router()

    async def echo(ctx: CallContext, request: Message) -> Message:
        return request

    async def slow(ctx: CallContext, request: Message) -> Message:
        if started is not None:
            started.set()
        await gate.wait()
        return Message({"done": True})

    router.unary("echo", echo)
    router.unary("slow", slow)
    return router


async def test_stop_accepting_refuses_new_dials_and_keeps_live_connections() -> None:
    security = Security.insecure()
    handle = ServeHandle()
    stopped = trio.Event()

    async def run_server(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        await serve(
            slow_router(trio.Event()),
            host="127.0.0.1",
            port=0,
            security=security,
            handle=handle,
            task_status=task_status,
        )
        stopped.set()

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(run_server)
        async with connect(host, port, security=security) as live:
            with trio.fail_after(5):
                while not handle.connections:
                    await trio.sleep(0.01)
            handle.stop_accepting()
            await trio.testing.wait_all_tasks_blocked()
            assert not handle.accepting
            with pytest.raises(ConnectionBrokenError):
                async with connect(host, port, security=security):
                    pass
            assert (await live.call("echo", {"still": 1})).meta == {"still": 1}
            assert not stopped.is_set()
        # The last connection ended: serve returns by itself.
        with trio.fail_after(5):
            await stopped.wait()
    assert handle.connections == []


async def test_aclose_lets_in_flight_calls_finish_then_serve_returns() -> None:
    security = Security.insecure()
    handle = ServeHandle()
    gate, started = trio.Event(), trio.Event()
    replies: list[Message] = []
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(
                serve,
                slow_router(gate, started),
                host="127.0.0.1",
                port=0,
                security=security,
                handle=handle,
            )
        )
        async with connect(host, port, security=security) as conn:

            async def call_slow() -> None:
                replies.append(await conn.call("slow", timeout=10))

            async with trio.open_nursery() as calls:
                calls.start_soon(call_slow)
                with trio.fail_after(5):
                    await started.wait()
                calls.start_soon(handle.aclose, "draining")
                with trio.fail_after(5):
                    while conn.is_usable:
                        await trio.sleep(0.01)
                # The peer's GoAway: no new call on this connection.
                with pytest.raises(ConnectionClosedError):
                    await conn.call("echo")
                gate.set()
            assert replies == [Message({"done": True})]
            await conn.wait_closed()
    # The nursery exited: serve returned without being cancelled.
    assert handle.connections == []
