"""SendTurn: small frames overtake queued bulk ones, never their own
stream's earlier frames, and stream 0 keeps its place."""

from __future__ import annotations

import torch
import trio
import trio.testing

from libpipe.net import Connection, Message, Router
from libpipe.net._send_turn import MAX_OVERTAKES, SendTurn
from libpipe.wire import (
    NEED_DATA,
    Hello,
    Request,
    Response,
    Role,
    StreamData,
    StreamOpen,
    WireConnection,
)


async def _order(waiters: list[tuple[int, bool]]) -> list[int]:
    """Queue ``(stream_id, bulk)`` waiters behind a held turn; the order
    (indexes) in which they get it."""
    turn = SendTurn()
    assert turn.take_now()
    order: list[int] = []

    async def wait(i: int, stream_id: int, bulk: bool) -> None:
        await turn.wait(stream_id, bulk)
        order.append(i)
        turn.release()

    async with trio.open_nursery() as nursery:
        for i, (stream_id, bulk) in enumerate(waiters):
            nursery.start_soon(wait, i, stream_id, bulk)
            await trio.testing.wait_all_tasks_blocked()
        turn.release()
    return order


async def test_small_frames_overtake_bulk_frames_of_other_streams() -> None:
    assert await _order([(1, True), (3, True), (5, False), (7, False)]) == [2, 3, 0, 1]


async def test_a_stream_keeps_its_own_order() -> None:
    # stream 1's small frame (its StreamClose, say) waits for its bulk data
    assert await _order([(1, True), (1, False), (3, False)]) == [2, 0, 1]


async def test_stream_zero_passes_nothing_and_is_passed_by_nothing() -> None:
    assert await _order([(1, True), (0, False), (3, False)]) == [0, 1, 2]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    turn = SendTurn()
    assert turn.take_now()
    got: list[str] = []

    async def wait(name: str, scope: trio.CancelScope) -> None:
        with scope:
            await turn.wait(1, False)
            got.append(name)
            turn.release()

    async with trio.open_nursery() as nursery:
        first, second = trio.CancelScope(), trio.CancelScope()
        nursery.start_soon(wait, "first", first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, "second", second)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        turn.release()
    assert got == ["second"]
    assert turn.take_now()


class GatedStream(trio.abc.Stream):
    """Writes wait while the gate is shut (the socket buffer is full)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self.gate = trio.Event()
        self.gate.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.gate.wait()
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_call_overtakes_queued_bulk_stream_data_on_the_wire() -> None:
    a, b = trio.testing.memory_stream_pair()
    gated = GatedStream(a)
    client = Connection(
        gated, role=Role.DIALER, local_peer_id="client", address="mem", router=Router()
    )
    peer = WireConnection(Role.ACCEPTOR, compression=False)
    await b.send_all(b"".join(peer.send(Hello(1, "peer", "acceptor", "", frozenset(), {}))))
    bulk = torch.randn(1, 128, 4096).to(torch.float16)  # 1 MiB
    received: list[object] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        # Held open (entered, never left) for the test's length.
        openers = [client.open_stream(name) for name in ("a", "b", "c")]
        streams = [await opener.__aenter__() for opener in openers]
        gated.gate = trio.Event()  # the first bulk frame will block mid-write
        for stream in streams:
            nursery.start_soon(stream.send, {}, (bulk,))
            await trio.testing.wait_all_tasks_blocked()

        async def small_call() -> None:
            received.append(await client.call("m"))

        nursery.start_soon(small_call)
        await trio.testing.wait_all_tasks_blocked()
        gated.gate.set()
        events: list[object] = []
        with trio.fail_after(10):
            while len([e for e in events if not isinstance(e, Hello | StreamOpen)]) < 4:
                peer.receive_data(await b.receive_some())
                while (event := peer.next_event()) is not NEED_DATA:
                    events.append(event)
        kinds = [type(e) for e in events if not isinstance(e, Hello | StreamOpen)]
        # The bulk frame in progress finishes; the call goes before the others.
        assert kinds == [StreamData, Request, StreamData, StreamData]
        request = next(e for e in events if isinstance(e, Request))
        await b.send_all(b"".join(peer.send(Response(request.stream_id, {"ok": 1}))))
        with trio.fail_after(10):
            while not received:
                await trio.sleep(0.001)
        assert received == [Message({"ok": 1})]
        nursery.cancel_scope.cancel()


async def test_small_frames_overtake_a_bulk_frame_a_bounded_number_of_times() -> None:
    # a steady flow of small frames on other streams: the bulk frame goes
    # after MAX_OVERTAKES of them, not after all of them
    small = [(3 + 2 * i, False) for i in range(MAX_OVERTAKES + 5)]
    order = await _order([(1, True), *small])
    assert order == [*range(1, MAX_OVERTAKES + 1), 0, *range(MAX_OVERTAKES + 1, len(small) + 1)]


async def test_the_overtake_count_restarts_when_the_oldest_goes() -> None:
    # two bulk frames, each passed by up to MAX_OVERTAKES small ones
    small = [(5 + 2 * i, False) for i in range(2 * MAX_OVERTAKES + 1)]
    order = await _order([(1, True), (3, True), *small])
    n = MAX_OVERTAKES
    assert order == [*range(2, n + 2), 0, *range(n + 2, 2 * n + 2), 1, 2 * n + 2]


async def test_pause_lets_waiting_small_frames_go_then_resumes_before_bulk_ones() -> None:
    turn = SendTurn()
    assert turn.take_now()
    order: list[str] = []

    async def wait(name: str, stream_id: int, bulk: bool) -> None:
        await turn.wait(stream_id, bulk)
        order.append(name)
        turn.release()

    async with trio.open_nursery() as nursery:
        for name, stream_id, bulk in (
            ("bulk3", 3, True),
            ("small5", 5, False),
            ("small1", 1, False),
        ):
            nursery.start_soon(wait, name, stream_id, bulk)
            await trio.testing.wait_all_tasks_blocked()
        # the holder is between two slices of a message on stream 1
        await turn.pause(1)
        order.append("slice")
        turn.release()
    # stream 1's own small frame keeps its place behind the message
    assert order == ["small5", "slice", "small1", "bulk3"]


async def test_pause_without_waiters_keeps_the_turn() -> None:
    turn = SendTurn()
    assert turn.take_now()
    await turn.pause(1)
    assert turn.busy
    turn.release()
    assert not turn.busy


async def test_a_cancelled_pause_still_resumes_the_message() -> None:
    turn = SendTurn()
    assert turn.take_now()
    resumed: list[bool] = []

    async def small() -> None:
        await turn.wait(3, False)
        await trio.testing.wait_all_tasks_blocked()
        turn.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(small)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await turn.pause(1)
            resumed.append(True)
            await trio.sleep(0)  # the cancel lands here
            resumed.append(False)
        turn.release()
    assert resumed == [True]
    assert not turn.busy
