"""A stream's inbox on its own: what the connection's reader hands in and
what ``receive`` gives back, in order, with backpressure, cancellation and
the two ways an inbox ends (the connection fails it, the receiver leaves)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from libpipe.errors import CacheFullError
from libpipe.net import Message, Stream
from libpipe.net._rpc import END_OF_STREAM


def inbox(buffer: int = 2) -> Stream:
    # The connection is needed only to send, which these tests do not.
    return Stream(cast(Any, None), 1, "m", Message(), buffer)


def msg(i: int) -> Message:
    return Message({"i": i})


async def test_a_waiting_receiver_gets_the_message_in_order() -> None:
    stream = inbox()
    got: list[int] = []

    async def receive_three() -> None:
        for _ in range(3):
            got.append((await stream.receive()).meta["i"])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_three)
            await trio.testing.wait_all_tasks_blocked()
            assert stream.deliver_nowait(msg(0))  # handed to the parked task
            assert stream.deliver_nowait(msg(1))  # queued behind it
            assert stream.deliver_nowait(msg(2))
    assert got == [0, 1, 2]


async def test_a_full_inbox_holds_the_deliverer_until_there_is_room() -> None:
    stream = inbox(buffer=2)
    assert stream.deliver_nowait(msg(0)) and stream.deliver_nowait(msg(1))
    assert not stream.deliver_nowait(msg(2))  # full: nothing taken
    delivered = trio.Event()

    async def deliver() -> None:
        await stream.deliver(msg(2))
        delivered.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            await trio.testing.wait_all_tasks_blocked()
            assert not delivered.is_set()
            assert (await stream.receive()).meta["i"] == 0
            await delivered.wait()
    with trio.fail_after(5):
        assert [(await stream.receive()).meta["i"] for _ in range(2)] == [1, 2]


async def test_a_cancelled_receive_loses_no_message() -> None:
    stream = inbox()
    with trio.move_on_after(0.01):
        await stream.receive()
    assert stream.deliver_nowait(msg(7))
    assert (await stream.receive()).meta["i"] == 7


async def test_receive_is_a_checkpoint_even_with_a_message_waiting() -> None:
    stream = inbox()
    assert stream.deliver_nowait(msg(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await stream.receive()
    # The message stays for the next receive.
    assert (await stream.receive()).meta["i"] == 1


async def test_end_of_stream_ends_iteration_and_later_receives() -> None:
    stream = inbox()
    assert stream.deliver_nowait(msg(0)) and stream.deliver_nowait(END_OF_STREAM)
    assert [m.meta["i"] async for m in stream] == [0]
    assert stream.receive_closed
    with pytest.raises(trio.EndOfChannel):
        await stream.receive()
    assert stream.deliver_nowait(msg(1))  # dropped: nobody listens
    with pytest.raises(trio.EndOfChannel):
        await stream.receive()


async def test_fail_keeps_what_is_queued_then_raises_for_every_receiver() -> None:
    stream = inbox()
    assert stream.deliver_nowait(msg(0))
    stream.fail(CacheFullError("gone", requested=1, free=0))
    assert (await stream.receive()).meta["i"] == 0
    for _ in range(2):
        with pytest.raises(CacheFullError):
            await stream.receive()


async def test_fail_wakes_parked_receivers_and_the_held_deliverer() -> None:
    stream = inbox(buffer=1)
    assert stream.deliver_nowait(msg(0))
    raised: list[type[BaseException]] = []

    async def deliver() -> None:
        await stream.deliver(msg(1))  # waits for room, then is dropped

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            await trio.testing.wait_all_tasks_blocked()
            stream.fail(CacheFullError("gone", requested=1, free=0))
    assert (await stream.receive()).meta["i"] == 0

    empty = inbox()

    async def receive() -> None:
        try:
            await empty.receive()
        except CacheFullError as exc:
            raised.append(type(exc))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            empty.fail(CacheFullError("gone", requested=1, free=0))
    assert raised == [CacheFullError, CacheFullError]


async def test_discard_drops_the_queue_and_releases_the_deliverer() -> None:
    stream = inbox(buffer=1)
    assert stream.deliver_nowait(msg(0))
    delivered = trio.Event()

    async def deliver() -> None:
        await stream.deliver(msg(1))
        delivered.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            await trio.testing.wait_all_tasks_blocked()
            stream.discard()
            await delivered.wait()
    with pytest.raises(trio.EndOfChannel):
        await stream.receive()
