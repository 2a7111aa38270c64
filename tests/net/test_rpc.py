"""The RPC layer: many calls and streams over one connection, their errors,
deadlines, cancellation, limits and the ways a connection ends."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
import trio
import trio.testing

from libpipe.errors import (
    AuthenticationError,
    BusyError,
    CacheFullError,
    ConfigError,
    ConnectionBrokenError,
    ConnectionClosedError,
    DeadlineExceededError,
    IncompatiblePeerError,
    InvalidRequestError,
    LibpipeError,
    ProtocolError,
    RemoteError,
)
from libpipe.net import (
    CallContext,
    Connection,
    ConnectionConfig,
    ConnectionPool,
    Message,
    Router,
    Security,
    Stream,
    connect,
    serve,
)
from libpipe.wire import PROTOCOL_VERSION, Hello, Limits, Request, Role, WireConnection


def echo_router() -> Router:
    router = Router()

    async def echo(ctx: CallContext, request: Message) -> Message:
        return Message({**request.meta, "peer": ctx.peer_id}, request.tensors)

    async def fail(ctx: CallContext, request: Message) -> Message:
        raise CacheFullError("no room", requested=10, free=3)

    async def crash(ctx: CallContext, request: Message) -> Message:
        raise RuntimeError("boom")

    async def forever(ctx: CallContext, request: Message) -> Message:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def echo_stream(ctx: CallContext, stream: Stream) -> None:
        async for message in stream:
            await stream.send({"n": message.meta["n"] * 2}, message.tensors)

    async def unencodable(ctx: CallContext, request: Message) -> Message:
        return Message({"x": object()})

    router.unary("echo", echo)
    router.unary("unencodable", unencodable)
    router.unary("fail", fail)
    router.unary("crash", crash)
    router.unary("forever", forever)
    router.stream("double", echo_stream)
    return router


async def wait_until(predicate, limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.01)


@asynccontextmanager
async def memory_pair(
    router: Router, config: ConnectionConfig | None = None
) -> AsyncIterator[tuple[Connection, Connection]]:
    """A dialer and an acceptor joined by an in-memory stream."""
    a, b = trio.testing.memory_stream_pair()
    client = Connection(a, role=Role.DIALER, local_peer_id="client", address="mem", config=config)
    server = Connection(
        b, role=Role.ACCEPTOR, local_peer_id="server", address="mem", router=router, config=config
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await nursery.start(client.run)
        yield client, server
        nursery.cancel_scope.cancel()


async def test_unary_call_carries_meta_tensors_and_peer_id() -> None:
    tensor = torch.arange(12, dtype=torch.float16).reshape(1, 3, 4)
    async with memory_pair(echo_router()) as (client, _):
        reply = await client.call("echo", {"x": 1}, (tensor,))
        assert reply.meta == {"x": 1, "peer": "client"}
        assert torch.equal(reply.tensors[0], tensor)
        assert client.peer_id == "server" and not client.peer_verified


async def test_remote_errors_come_back_as_their_class() -> None:
    async with memory_pair(echo_router()) as (client, _):
        with pytest.raises(CacheFullError) as caught:
            await client.call("fail")
        assert caught.value.remote and caught.value.details == {"requested": 10, "free": 3}
        with pytest.raises(RemoteError, match="RuntimeError: boom"):
            await client.call("crash")
        with pytest.raises(InvalidRequestError, match="unknown method"):
            await client.call("nope")
        with pytest.raises(RemoteError, match="unencodable reply"):
            await client.call("unencodable")
        assert (await client.call("echo", {"still": "ok"})).meta["still"] == "ok"


async def test_bidirectional_stream() -> None:
    async with memory_pair(echo_router()) as (client, _):
        async with client.open_stream("double") as stream:
            for n in range(3):
                await stream.send({"n": n}, (torch.ones(2),))
                reply = await stream.receive()
                assert reply.meta == {"n": 2 * n} and torch.equal(reply.tensors[0], torch.ones(2))
            await stream.close_send()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
        assert client.in_flight == 0


async def test_deadline_cancels_the_call_only(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair(echo_router()) as (client, server):
        with pytest.raises(DeadlineExceededError, match="forever"):
            await client.call("forever", timeout=1.0)
        await trio.sleep(0.1)
        assert server.in_flight == 0  # the handler was told to stop
        assert (await client.call("echo", {"a": 1})).meta["a"] == 1


async def test_thousand_concurrent_calls_and_half_cancelled() -> None:
    gate = trio.Event()
    started = 0
    router = echo_router()

    async def held(ctx: CallContext, request: Message) -> Message:
        nonlocal started
        started += 1
        await gate.wait()
        return Message({"i": request.meta["i"]})

    router.unary("held", held)
    config = ConnectionConfig(limits=Limits(max_open_streams=1024))
    results: dict[int, int] = {}
    async with memory_pair(router, config) as (client, server):

        async def one(i: int, scope: trio.CancelScope) -> None:
            with scope:
                results[i] = (await client.call("held", {"i": i})).meta["i"]

        scopes = [trio.CancelScope() for _ in range(1000)]
        async with trio.open_nursery() as nursery:
            for i, scope in enumerate(scopes):
                nursery.start_soon(one, i, scope)
            while started < 1000:
                await trio.sleep(0.01)
            for scope in scopes[::2]:
                scope.cancel()
            await wait_until(lambda: server.in_flight == 500)
            gate.set()
        assert sorted(results) == list(range(1, 1000, 2))
        assert all(results[i] == i for i in results)
        assert client.in_flight == 0 and not client.is_closed
        assert (await client.call("echo", {"after": True})).meta["after"]


async def test_stream_cap_gives_busy_to_the_caller() -> None:
    config = ConnectionConfig(limits=Limits(max_open_streams=4))
    async with memory_pair(echo_router(), config) as (client, _):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(client.call, "forever")
            await trio.sleep(0.05)
            with pytest.raises(BusyError):
                await client.call("echo")
            nursery.cancel_scope.cancel()
        assert (await client.call("echo", {"ok": 1})).meta["ok"] == 1


async def test_graceful_close_lets_in_flight_calls_finish() -> None:
    gate = trio.Event()
    router = echo_router()

    async def slow(ctx: CallContext, request: Message) -> Message:
        await gate.wait()
        return Message({"done": True})

    router.unary("slow", slow)
    async with memory_pair(router) as (client, server):
        async with trio.open_nursery() as nursery:
            replies: list[Message] = []

            async def call_slow() -> None:
                replies.append(await client.call("slow"))

            nursery.start_soon(call_slow)
            await trio.sleep(0.05)
            nursery.start_soon(server.aclose)
            await trio.sleep(0.05)
            with pytest.raises(ConnectionClosedError, match="closing"):
                await client.call("echo")
            gate.set()
        assert replies == [Message({"done": True})]
        await client.wait_closed()
        assert server.is_closed


async def test_keepalive_keeps_an_idle_connection_and_drops_a_silent_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ConnectionConfig(keepalive_interval=1.0, idle_timeout=3.0)
    async with memory_pair(echo_router(), config) as (client, _):
        await trio.sleep(30)
        assert not client.is_closed
        assert await client.ping() >= 0

    a, b = trio.testing.memory_stream_pair()
    client = Connection(a, role=Role.DIALER, local_peer_id="c", address="mem", config=config)
    silent = WireConnection(Role.ACCEPTOR)
    await b.send_all(b"".join(silent.send(_hello("s"))))
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_closed()
    assert isinstance(client.error, ConnectionBrokenError) and "silent" in str(client.error)


def _hello(peer_id: str, role: Role = Role.ACCEPTOR, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(
        version=version,
        peer_id=peer_id,
        role=role.value,
        model_id="",
        features=frozenset(),
        info={},
    )


async def test_version_mismatch_is_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    client = Connection(a, role=Role.DIALER, local_peer_id="c", address="mem")
    peer = WireConnection(Role.ACCEPTOR)
    try:
        frame = b"".join(peer.send(_hello("s", version=PROTOCOL_VERSION + 1)))
    except LibpipeError:
        pytest.skip("the codec refuses to even encode another version")
    await b.send_all(frame)
    with pytest.raises((IncompatiblePeerError, ProtocolError)):
        await client.run()


async def test_notify_reaches_its_handler() -> None:
    router = echo_router()
    got = trio.Event()
    seen: list[dict] = []

    async def on_news(ctx: CallContext, meta: dict) -> None:
        seen.append(meta)
        got.set()

    router.notify("news", on_news)
    async with memory_pair(router) as (client, _):
        await client.notify("news", {"v": 1})
        await got.wait()
    assert seen == [{"v": 1}]


def test_router_and_config_validation() -> None:
    router = Router()
    router.unary("a", echo_router().unary_handlers["echo"])
    with pytest.raises(ConfigError):
        router.stream("a", echo_router().stream_handlers["double"])
    with pytest.raises(ConfigError):
        ConnectionConfig(keepalive_interval=5, idle_timeout=5)
    with pytest.raises(ConfigError):
        ConnectionConfig(stream_buffer=0)


# --- over real sockets ---------------------------------------------------------------


@asynccontextmanager
async def running_server(
    security: Security, config: ConnectionConfig | None = None
) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(
                serve, echo_router(), host="127.0.0.1", port=0, security=security, config=config
            )
        )
        yield address
        nursery.cancel_scope.cancel()


async def test_rpc_over_mutual_tls(server_security: Security, client_security: Security) -> None:
    async with running_server(server_security) as (host, port):
        async with connect(
            host, port, security=client_security, expected_peer_id=server_security.peer_id
        ) as conn:
            assert conn.peer_verified and conn.peer_id == server_security.peer_id
            reply = await conn.call("echo", {}, (torch.ones(1, 1, 4096, dtype=torch.float16),))
            assert reply.meta["peer"] == client_security.peer_id
            assert reply.tensors[0].shape == (1, 1, 4096)


async def test_plaintext_client_to_tls_server_is_refused(server_security: Security) -> None:
    async with running_server(server_security) as (host, port):
        with pytest.raises((ConnectionBrokenError, AuthenticationError), match="require TLS"):
            async with connect(host, port, security=Security.insecure()):
                pass


async def test_insecure_pin_refuses_an_impostor() -> None:
    async with running_server(Security.insecure()) as (host, port):
        with pytest.raises(AuthenticationError, match="expected"):
            async with connect(host, port, security=Security.insecure(), expected_peer_id="x" * 32):
                pass


async def _raw_client(
    host: str, port: int, limits: Limits
) -> tuple[trio.SocketStream, WireConnection]:
    stream = await trio.open_tcp_stream(host, port)
    wire = WireConnection(Role.DIALER, limits)
    await stream.send_all(b"".join(wire.send(_hello("attacker", Role.DIALER))))
    return stream, wire


async def _is_dropped(stream: trio.SocketStream) -> bool:
    """True when the server closes the connection (whatever it says first)."""
    with trio.fail_after(5):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
    return True


@pytest.mark.parametrize("attack", ["garbage", "oversized", "silent", "flood"])
async def test_bad_peer_is_dropped_while_others_are_served(attack: str) -> None:
    config = ConnectionConfig(limits=Limits(max_metadata_bytes=4096, max_open_streams=8))
    security = Security.insecure(handshake_timeout=0.3)
    async with running_server(security, config) as (host, port):
        async with connect(host, port, security=Security.insecure(), config=config) as good:
            if attack == "silent":
                stream = await trio.open_tcp_stream(host, port)
            elif attack == "garbage":
                stream, _ = await _raw_client(host, port, Limits())
                await stream.send_all(b"\xde\xad\xbe\xef" * 64)
            elif attack == "oversized":
                stream, wire = await _raw_client(host, port, Limits())
                await stream.send_all(b"".join(wire.send(Request(1, "echo", {"pad": "x" * 10000}))))
            else:
                stream, wire = await _raw_client(host, port, Limits(max_open_streams=1024))
                frames = [
                    b"".join(wire.send(Request(sid, "forever", {}))) for sid in range(1, 40, 2)
                ]
                # The server may slam the door before the flood is over.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(b"".join(frames))
            assert await _is_dropped(stream)
            await stream.aclose()
            assert (await good.call("echo", {"fine": 1})).meta["fine"] == 1


async def test_pool_reuses_and_redials(
    server_security: Security, client_security: Security
) -> None:
    async with running_server(server_security) as (host, port):
        async with ConnectionPool(client_security) as pool:
            address = f"{host}:{port}"
            first = await pool.get(address, server_security.peer_id)
            assert await pool.get(address, server_security.peer_id) is first
            first.abort(ConnectionBrokenError("test"))
            second = await pool.get(address, server_security.peer_id)
            assert second is not first and not second.is_closed
            assert (await second.call("echo", {"k": 2})).meta["k"] == 2
        assert second.is_closed
    with pytest.raises(ConnectionClosedError):
        await pool.get(address)


async def test_pool_address_must_be_host_port(client_security: Security) -> None:
    async with ConnectionPool(client_security) as pool:
        with pytest.raises(ConfigError):
            await pool.get("no-port")


async def test_slow_reader_slows_the_sender() -> None:
    sent = 0
    total = 64
    router = Router()

    async def firehose(ctx: CallContext, stream: Stream) -> None:
        nonlocal sent
        # 1 MiB of noise: compression must not shrink it.
        chunk = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
        while sent < total:
            await stream.send({"i": sent}, (chunk,))
            sent += 1

    router.stream("firehose", firehose)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(serve, router, host="127.0.0.1", port=0, security=Security.insecure())
        )
        async with connect(host, port, security=Security.insecure()) as conn:
            async with conn.open_stream("firehose") as stream:
                await wait_until(lambda: sent > 0)
                await trio.sleep(0.3)
                # The inbox (8) and the kernel's socket buffers hold a bounded
                # number; the sender waits instead of piling up memory.
                assert sent < total
                received = [message.meta["i"] async for message in stream]
                assert received == list(range(total))
            assert (await conn.ping()) >= 0
        nursery.cancel_scope.cancel()


async def test_leaving_a_stream_early_cancels_the_peer_handler() -> None:
    cancelled = trio.Event()
    router = echo_router()

    async def ticker(ctx: CallContext, stream: Stream) -> None:
        try:
            for i in range(10**9):
                await stream.send({"i": i})
                await trio.sleep(0.001)
        except trio.Cancelled:
            cancelled.set()
            raise

    router.stream("ticker", ticker)
    async with memory_pair(router) as (client, server):
        async with client.open_stream("ticker") as stream:
            assert [(await stream.receive()).meta["i"] for _ in range(3)] == [0, 1, 2]
        with trio.fail_after(5):
            await cancelled.wait()
        await wait_until(lambda: server.in_flight == 0)
        assert (await client.call("echo", {"after": 1})).meta["after"] == 1


async def test_a_stream_left_unread_is_not_taken_for_a_silent_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = echo_router()

    async def burst(ctx: CallContext, stream: Stream) -> None:
        for i in range(20):
            await stream.send({"i": i})

    router.stream("burst", burst)
    config = ConnectionConfig(keepalive_interval=1.0, idle_timeout=3.0)
    async with memory_pair(router, config) as (client, _):
        async with client.open_stream("burst") as stream:
            # The inbox fills and the reader waits far past idle_timeout.
            await trio.sleep(30)
            assert not client.is_closed
            assert [m.meta["i"] async for m in stream] == list(range(20))


async def test_tls_client_to_plaintext_server_is_refused_on_both_sides(
    client_security: Security, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="libpipe.net"):
        async with running_server(Security.insecure()) as (host, port):
            with pytest.raises(AuthenticationError, match="does not speak TLS"):
                async with connect(host, port, security=client_security):
                    pass
            await wait_until(lambda: "speaks TLS and we are --insecure" in caplog.text)


async def test_sending_on_a_stream_the_peer_ended_raises_its_error() -> None:
    router = echo_router()

    async def refuse(ctx: CallContext, stream: Stream) -> None:
        await stream.receive()
        raise CacheFullError("no room", requested=1, free=0)

    router.stream("refuse", refuse)
    async with memory_pair(router) as (client, _):
        async with client.open_stream("refuse") as stream:
            await stream.send({"n": 1})
            with pytest.raises(CacheFullError):
                await stream.receive()
            with pytest.raises(CacheFullError):
                await stream.send({"n": 2})
            with pytest.raises(CacheFullError):
                await stream.close_send()
        assert (await client.call("echo", {"after": 1})).meta["after"] == 1


async def test_each_waiter_gets_its_own_copy_of_a_shared_failure() -> None:
    """Calls and streams failed by one connection end each raise a new
    error of the same class, message and details: one object raised in many
    tasks would carry all their tracebacks."""
    caught: list[BaseException] = []
    async with memory_pair(echo_router()) as (client, _):

        async def call() -> None:
            try:
                await client.call("forever")
            except ConnectionBrokenError as exc:
                caught.append(exc)

        async def receive() -> None:
            async with client.open_stream("double") as stream:
                for _ in range(2):
                    try:
                        await stream.receive()
                    except ConnectionBrokenError as exc:
                        caught.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call)
            nursery.start_soon(receive)
            await wait_until(lambda: client.in_flight == 4)
            client.abort(ConnectionBrokenError("link down", hop=2))
        for _ in range(2):
            with pytest.raises(ConnectionBrokenError) as again:
                await client.call("echo")
            caught.append(again.value)
    assert len(caught) == 7
    assert len({id(exc) for exc in caught}) == 7
    assert all(type(exc) is ConnectionBrokenError for exc in caught)
    assert all(str(exc) == "link down" and exc.details == {"hop": 2} for exc in caught)
