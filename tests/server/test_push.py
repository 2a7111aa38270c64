"""Server-to-server forwarding (RPC.md, "Forwarding") between two in-process
servers, [2:4) and [4:6): a step runs exactly once whichever of push and
client copy comes first, and every bad push gets its typed error and
leaves the session intact. And the session's reply deadline, which keeps
a client that stops reading from holding its cache."""

from __future__ import annotations

import functools

import pytest
import torch
import trio

from libpipe.errors import BusyError, InvalidRequestError, SessionError
from libpipe.net import ConnectionPool, Message, Stream
from libpipe.server import BlockServer
from libpipe.server._inference import InferenceHandler
from libpipe.server._push import MAX_QUEUED_PUSHES, KnownServers, PushTarget, StepInputs

from .conftest import running_servers

H = 64  # hidden size of the test presets
BATCH = 2


def x(t: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, t, H)


def opening(start: int, end: int) -> dict[str, int]:
    return {"start": start, "end": end, "batch": BATCH, "max_length": 16}


def push_to(server: BlockServer, token: str, step: int) -> dict[str, object]:
    return {"address": server.address, "peer_id": server.peer_id, "token": token, "step": step}


async def reference(
    pool: ConnectionPool, server: BlockServer, hidden: torch.Tensor
) -> torch.Tensor:
    reply = await (await pool.get(server.address)).call(
        "forward", {"start": server.serving.blocks[0], "end": server.serving.blocks[1]}, (hidden,)
    )
    return reply.tensors[0]


async def open_session(pool: ConnectionPool, server: BlockServer, stream: Stream) -> str:
    opened = await stream.receive()
    assert opened.meta["position"] == 0
    return opened.meta["push_token"]


async def test_a_pushed_step_runs_once_on_the_pushed_input(gqa, make_config):
    configs = [make_config(gqa, (2, 4)), make_config(gqa, (4, 6))]
    async with running_servers(configs) as ((first, second), pool):
        a, b = await pool.get(first.address), await pool.get(second.address)
        async with (
            a.open_stream("inference", opening(2, 4)) as hop1,
            b.open_stream("inference", opening(4, 6)) as hop2,
        ):
            await open_session(pool, first, hop1)
            token = await open_session(pool, second, hop2)
            prompt = x(3)
            await hop2.send({"position": 0, "step": 1, "pushed": True})
            await hop1.send(
                {"position": 0, "step": 0, "push_to": push_to(second, token, 1)}, (prompt,)
            )
            reply1 = await hop1.receive()
            assert reply1.meta == {"position": 3, "step": 0}
            reply2 = await hop2.receive()
            assert reply2.meta == {"position": 3, "step": 1}
            expected = await reference(pool, second, reply1.tensors[0])
            assert torch.allclose(reply2.tensors[0], expected, atol=1e-5)

            # The client's own copy after the push is a duplicate: dropped.
            await hop2.send({"position": 0, "step": 1}, (reply1.tensors[0],))
            # A push that comes before its announcement waits for it.
            token_call = {"token": token, "step": 2}
            step = x()
            await b.call("push", token_call, (step,))
            await hop2.send({"position": 3, "step": 2, "pushed": True})
            reply = await hop2.receive()
            assert reply.meta == {"position": 4, "step": 2}

            # A push that never comes: the client sends the input itself.
            await hop2.send({"position": 4, "step": 3, "pushed": True})
            await hop2.send({"position": 4, "step": 3}, (step,))
            assert (await hop2.receive()).meta == {"position": 5, "step": 3}
            await hop1.close_send()
            with pytest.raises(trio.EndOfChannel):  # the push went through: no notice
                await hop1.receive()
            await hop2.close_send()


async def test_a_push_racing_a_newer_client_step_runs_each_step_at_most_once(gqa, make_config):
    """The push for an announced step and the client's next step come
    together: whichever the server sees first, the announced step runs at
    most once, the newer one exactly once, and a push's wake that finds
    the handler already woken by the client runs nothing later."""
    async with running_servers([make_config(gqa, (4, 6))]) as ((server,), pool):
        conn = await pool.get(server.address)
        async with conn.open_stream("inference", opening(4, 6)) as stream:
            token = await open_session(pool, server, stream)
            await stream.send({"position": 0, "step": 0}, (x(3),))
            assert (await stream.receive()).meta == {"position": 3, "step": 0}
            await stream.send({"position": 3, "step": 1, "pushed": True})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send, {"position": 3, "step": 2}, (x(),))
                nursery.start_soon(conn.call, "push", {"token": token, "step": 1}, (x(),))
            answered = [(await stream.receive()).meta]
            if answered[0]["step"] == 1:
                answered.append((await stream.receive()).meta)
            assert answered[-1] == {"position": 4, "step": 2}
            await stream.send({"position": 4, "step": 3}, (x(),))
            assert (await stream.receive()).meta == {"position": 5, "step": 3}
            await stream.close_send()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()


def test_a_push_wakes_the_handler_only_for_the_announced_step() -> None:
    inputs = StepInputs(BATCH, H)
    wakes: list[None] = []
    inputs.wake = lambda: wakes.append(None)
    inputs.offer(1, x())  # before its announcement: queued, nobody to wake
    assert wakes == [] and inputs.arrive(Message({"step": 1, "pushed": True})) is not None
    assert inputs.arrive(Message({"step": 2, "pushed": True})) is None
    inputs.offer(2, x())
    assert len(wakes) == 1 and inputs.take_ready() is not None
    inputs.offer(2, x())  # a duplicate: dropped, no wake
    assert len(wakes) == 1 and inputs.take_ready() is None


async def test_bad_pushes_get_typed_errors_and_leave_the_session_intact(gqa, make_config):
    async with running_servers([make_config(gqa, (4, 6))]) as ((server,), pool):
        conn = await pool.get(server.address)
        async with conn.open_stream("inference", opening(4, 6)) as stream:
            token = await open_session(pool, server, stream)
            with pytest.raises(SessionError, match="push token"):
                await conn.call("push", {"token": "0" * 32, "step": 0}, (x(),))
            with pytest.raises(InvalidRequestError, match="shape"):
                await conn.call("push", {"token": token, "step": 0}, (torch.randn(BATCH, 1, 8),))
            with pytest.raises(InvalidRequestError, match="token"):
                await conn.call("push", {"step": 0}, (x(),))
            with pytest.raises(InvalidRequestError, match="tensor"):
                await conn.call("push", {"token": token, "step": 0})
            for step in range(MAX_QUEUED_PUSHES):  # a flood: pushes nobody announced
                await conn.call("push", {"token": token, "step": 10 + step}, (x(),))
            with pytest.raises(BusyError):
                await conn.call("push", {"token": token, "step": 99}, (x(),))
            # The session is intact: its next step runs.
            await stream.send({"position": 0, "step": 0}, (x(),))
            assert (await stream.receive()).meta == {"position": 1, "step": 0}
            await stream.close_send()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
        with pytest.raises(SessionError, match="push token"):  # a closed session's token
            await conn.call("push", {"token": token, "step": 1}, (x(),))


async def test_a_push_the_next_hop_refuses_falls_back_to_the_client(gqa, make_config):
    """A wrong token given by the client: the pusher answers, then says
    ``pushed: false``, and carries on; its own session is unharmed."""
    async with running_servers([make_config(gqa, (2, 4)), make_config(gqa, (4, 6))]) as (
        (first, second),
        pool,
    ):
        conn = await pool.get(first.address)
        async with conn.open_stream("inference", opening(2, 4)) as stream:
            await open_session(pool, first, stream)
            meta = {"position": 0, "step": 0, "push_to": push_to(second, "f" * 32, 1)}
            await stream.send(meta, (x(),))
            assert (await stream.receive()).meta == {"position": 1, "step": 0}
            assert (await stream.receive()).meta == {"step": 0, "pushed": False}
            bad_target = {"position": 1, "step": 1, "push_to": {"address": 5}}
            await stream.send(bad_target, (x(),))
            with pytest.raises(InvalidRequestError, match="push_to") as caught:
                await stream.receive()
            assert caught.value.details["step"] == 1  # the failed step, for the client


class _NeverRead:
    """A stream whose peer stopped reading: every send waits for ever."""

    async def send(self, meta: dict, tensors: tuple = ()) -> None:
        await trio.sleep_forever()


async def test_a_reply_the_client_never_takes_ends_the_session(gqa, make_config):
    """The handler's reply send is bounded by the idle timeout, and ends
    with ``SessionError`` (which frees the session's cache on the way out,
    as an idle session's does)."""
    async with running_servers([make_config(gqa, (2, 6), idle_timeout=0.2)]) as ((server,), _):
        handler = InferenceHandler(server.serving)
        with trio.fail_after(30), pytest.raises(SessionError, match=r"took no reply for 0\.2 s"):
            await handler._reply(_NeverRead(), Message({"position": 1}))  # type: ignore[arg-type]


class _AskThenNeverRead:
    """A client that sends one step, then neither reads nor sends again."""

    def __init__(self, step: Message) -> None:
        self._messages = [step]

    async def receive(self) -> Message:
        if self._messages:
            return self._messages.pop()
        await trio.sleep_forever()
        raise AssertionError

    async def send(self, meta: dict, tensors: tuple = ()) -> None:
        await trio.sleep_forever()


async def test_a_step_reply_the_client_never_takes_ends_the_session(gqa, make_config):
    """The same deadline on the replies of steps, inside the session's loop."""
    async with running_servers([make_config(gqa, (2, 6), idle_timeout=0.2)]) as ((server,), _):
        serving = server.serving
        handler = InferenceHandler(serving)
        session = serving.span.open_session(serving.pool, batch=BATCH, max_length=16)
        stream = _AskThenNeverRead(Message({"position": 0, "step": 0}, (x(),)))
        with trio.fail_after(30), pytest.raises(SessionError, match=r"took no reply for 0\.2 s"):
            await handler._serve(session, stream, StepInputs(BATCH, H))  # type: ignore[arg-type]
        assert session.position == 1  # the step ran; only its reply waited
        session.close()


async def test_a_step_waiting_for_a_push_that_never_comes_ends_as_idle(gqa, make_config):
    async with running_servers([make_config(gqa, (4, 6), idle_timeout=0.5)]) as ((server,), pool):
        conn = await pool.get(server.address)
        async with conn.open_stream("inference", opening(4, 6)) as stream:
            await open_session(pool, server, stream)
            await stream.send({"position": 0, "step": 0, "pushed": True})
            with trio.fail_after(30), pytest.raises(SessionError, match=r"idle for 0\.5 s"):
                await stream.receive()
        assert len(server.serving.sessions) == 0
        assert server.serving.pool.free_bytes == server.serving.pool.budget_bytes


async def test_with_a_gossip_view_a_server_pushes_only_to_known_servers_of_its_model(
    gqa, make_config
):
    """A target the view does not hold (unknown peer, or a known peer at
    another address) is refused before any dial: the step is answered and
    the notice says why; a known server at its address gets the push."""
    dials = 0

    async def count_dial(stream: trio.SocketStream) -> None:
        nonlocal dials
        dials += 1
        await stream.aclose()

    async with running_servers([make_config(gqa, (2, 4))]) as ((first,), pool):
        joined = make_config(gqa, (4, 6), peers=(first.address,))
        async with running_servers([joined]) as ((second,), _), trio.open_nursery() as nursery:
            with trio.fail_after(30):
                while second.peer_id not in {r.record.peer_id for r in first.node.view()}:
                    await trio.sleep(0.05)
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, count_dial, 0, host="127.0.0.1")
            )
            elsewhere = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            a, b = await pool.get(first.address), await pool.get(second.address)
            async with (
                a.open_stream("inference", opening(2, 4)) as hop1,
                b.open_stream("inference", opening(4, 6)) as hop2,
            ):
                await open_session(pool, first, hop1)
                token = await open_session(pool, second, hop2)
                targets = [
                    {"address": elsewhere, "peer_id": "f" * 52, "token": token, "step": 0},
                    {**push_to(second, token, 0), "address": elsewhere},
                ]
                reasons = []
                for i, target in enumerate(targets):
                    await hop1.send({"position": i, "step": i, "push_to": target}, (x(),))
                    assert (await hop1.receive()).meta == {"position": i + 1, "step": i}
                    notice = (await hop1.receive()).meta
                    assert notice["step"] == i and notice["pushed"] is False
                    assert notice["refused"] == "invalid_request"
                    reasons.append(notice["reason"])
                assert "not a live server in this server's gossip view" in reasons[0]
                assert f"which announces {second.address}" in reasons[1]
                elsewhere_model = KnownServers(first.node, "another model")
                refused = elsewhere_model.refusal(PushTarget(**push_to(second, token, 0)))
                assert refused is not None and "a server of another model" in str(refused)
                # The normal path: the next hop gets its input by push.
                await hop2.send({"position": 0, "step": 2, "pushed": True})
                await hop1.send(
                    {"position": 2, "step": 2, "push_to": push_to(second, token, 2)}, (x(),)
                )
                assert (await hop1.receive()).meta == {"position": 3, "step": 2}
                with trio.fail_after(30):
                    assert (await hop2.receive()).meta == {"position": 1, "step": 2}
                await hop1.close_send()
                with pytest.raises(trio.EndOfChannel):  # the push went through: no notice
                    await hop1.receive()
                await hop2.close_send()
            nursery.cancel_scope.cancel()
    assert dials == 0
