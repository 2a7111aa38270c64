"""Where connections come from: ``serve`` accepts them, ``connect`` dials
one, ``ConnectionPool`` keeps one per peer for callers that talk to many."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import ConfigError, ConnectionClosedError, LibpipeError, sole_error
from ..wire import Role
from ._connection import Connection, ConnectionConfig
from ._rpc import Router
from ._tls import Security, accept, accept_socket, dial, open_listener

logger = logging.getLogger("libpipe.net")


@dataclass(frozen=True)
class HelloInfo:
    """What this node announces in its hello: the model it serves (empty for
    a node that serves none) and free-form, msgpack-able facts."""

    model_id: str = ""
    info: Mapping[str, Any] | None = None


class ServeHandle:
    """Control over a running ``serve`` from outside it: a server that
    drains stops accepting, lets its connections finish, and only then stops.

    Make one, pass it as ``serve(..., handle=handle)``; ``stop_accepting()``
    closes the listening socket (new dials are refused by the kernel) while
    live connections go on; ``aclose()`` also closes every live connection
    gracefully (GoAway, in-flight calls finish within the connection's
    ``close_grace``). ``serve`` returns once it has stopped accepting and its
    last connection has ended."""

    def __init__(self) -> None:
        self._stop = trio.Event()
        self._closing: str | None = None  # the reason, once ``aclose`` began
        self._connections: set[Connection] = set()

    @property
    def accepting(self) -> bool:
        return not self._stop.is_set()

    @property
    def connections(self) -> list[Connection]:
        """The connections this server holds now (after their hello)."""
        return list(self._connections)

    def stop_accepting(self) -> None:
        self._stop.set()

    async def aclose(self, reason: str = "server stopping") -> None:
        """Stop accepting, then close every connection gracefully (concurrently)."""
        self.stop_accepting()
        self._closing = reason
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as closer:
                for connection in list(self._connections):
                    closer.start_soon(connection.aclose, reason)


async def serve(
    router: Router,
    *,
    host: str,
    port: int,
    security: Security,
    hello: HelloInfo = HelloInfo(),
    config: ConnectionConfig | None = None,
    handle: ServeHandle | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections and serve ``router`` on each until cancelled, or
    until ``handle`` stops it and the connections it holds have ended.

    ``nursery.start(serve, ...)`` returns the bound ``(host, port)`` (port 0
    picks a free one). A connection that fails admission or breaks the
    protocol is dropped and logged; the others are unaffected."""
    handle = handle if handle is not None else ServeHandle()
    listener = await open_listener(host, port, security)
    with listener:
        bound = listener.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started((bound[0], bound[1]))
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    _accept_loop, listener, nursery, router, security, hello, config, handle
                )
                await handle._stop.wait()
                accepting.cancel_scope.cancel()
            # From here the kernel refuses new dials; the nursery waits for
            # the connections already accepted.
            listener.close()


async def _accept_loop(
    listener: Any,
    nursery: trio.Nursery,
    router: Router,
    security: Security,
    hello: HelloInfo,
    config: ConnectionConfig | None,
    handle: ServeHandle,
) -> None:
    while True:
        try:
            sock, address = await accept_socket(listener)
        except OSError as exc:
            # EMFILE and friends: back off instead of spinning.
            logger.warning("accept failed: %s", exc)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(_serve_one, sock, address, router, security, hello, config, handle)


async def _serve_one(
    sock: Any,
    address: str,
    router: Router,
    security: Security,
    hello: HelloInfo,
    config: ConnectionConfig | None,
    handle: ServeHandle,
) -> None:
    connection: Connection | None = None
    try:
        channel = await accept(sock, security, address)
        connection = Connection(
            channel.stream,
            role=Role.ACCEPTOR,
            local_peer_id=security.peer_id,
            address=address,
            verified_peer_id=channel.peer_id,
            router=router,
            config=config,
            model_id=hello.model_id,
            info=hello.info,
            handshake_timeout=security.handshake_timeout,
        )
        with single_errors():
            async with trio.open_nursery() as nursery:
                await nursery.start(connection.run)
                handle._connections.add(connection)
                if handle._closing is not None:
                    # Admitted while ``aclose`` was closing the others.
                    nursery.start_soon(connection.aclose, handle._closing)
    except LibpipeError as exc:
        logger.info("refused %s: %s", address, exc)
    except Exception:
        # One connection's failure must never stop the server.
        logger.exception("connection from %s failed", address)
    finally:
        if connection is not None:
            handle._connections.discard(connection)


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    security: Security,
    expected_peer_id: str | None = None,
    router: Router | None = None,
    hello: HelloInfo = HelloInfo(),
    config: ConnectionConfig | None = None,
) -> AsyncIterator[Connection]:
    """One connection to ``host:port``, closed gracefully on exit.

    ``expected_peer_id`` pins the peer (from gossip); anything else is
    refused with ``AuthenticationError``. ``router`` lets the peer call us
    back over the same connection."""
    with single_errors():
        async with trio.open_nursery() as nursery:
            connection = await nursery.start(
                _dial_and_run, host, port, security, expected_peer_id, router, hello, config
            )
            try:
                yield connection
            finally:
                await connection.aclose()


@contextmanager
def single_errors() -> Iterator[None]:
    """Raise a lone error out of a nursery as itself, not as a group of one:
    callers of ``connect`` catch ``AuthenticationError``, not groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        sole = sole_error(group)
        if sole is not group:
            raise sole from None
        raise


async def _dial_and_run(
    host: str,
    port: int,
    security: Security,
    expected_peer_id: str | None,
    router: Router | None,
    hello: HelloInfo,
    config: ConnectionConfig | None,
    task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED,
) -> None:
    channel = await dial(host, port, security, expected_peer_id=expected_peer_id)
    connection = Connection(
        channel.stream,
        role=Role.DIALER,
        local_peer_id=security.peer_id,
        address=f"{host}:{port}",
        verified_peer_id=channel.peer_id,
        expected_peer_id=expected_peer_id,
        router=router,
        config=config,
        model_id=hello.model_id,
        info=hello.info,
        handshake_timeout=security.handshake_timeout,
    )
    await connection.run(task_status=task_status)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass
class _Slot:
    """A pool entry: a usable connection, or a dial in progress."""

    connection: Connection | None = None
    dialing: trio.Event | None = None
    error: BaseException | None = None


def _pool_decision(slot: _Slot | None) -> str:
    """What ``get`` must do for this entry; kept apart from the I/O.

    ``reuse`` a usable connection, ``wait`` for a dial in progress, or
    ``dial`` (nothing there, or what is there is closed or closing)."""
    if slot is None:
        return "dial"
    if slot.dialing is not None:
        return "wait"
    if slot.connection is not None and slot.connection.is_usable:
        return "reuse"
    return "dial"


class ConnectionPool:
    """One connection per peer, reused by every caller; a broken or closing
    connection is dropped and the next ``get`` dials again.

    ``async with ConnectionPool(security) as pool: conn = await pool.get(...)``;
    leaving the block closes every connection gracefully."""

    def __init__(
        self,
        security: Security,
        *,
        router: Router | None = None,
        hello: HelloInfo = HelloInfo(),
        config: ConnectionConfig | None = None,
    ) -> None:
        self._security = security
        self._router = router
        self._hello = hello
        self._config = config
        self._slots: dict[tuple[str, str | None], _Slot] = {}
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> ConnectionPool:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as closer:
                for slot in self._slots.values():
                    if slot.connection is not None:
                        closer.start_soon(slot.connection.aclose)
        self._slots.clear()
        self._nursery = None
        with single_errors():
            return await self._nursery_manager.__aexit__(*exc_info)

    @property
    def connections(self) -> list[Connection]:
        return [s.connection for s in self._slots.values() if s.connection is not None]

    async def get(self, address: str, expected_peer_id: str | None = None) -> Connection:
        """The connection to ``address`` (``host:port``), dialing if needed."""
        if self._nursery is None:
            raise ConnectionClosedError("the pool is not open (use `async with`)")
        key = (address, expected_peer_id)
        while True:
            slot = self._slots.get(key)
            decision = _pool_decision(slot)
            if decision == "reuse":
                assert slot is not None and slot.connection is not None
                return slot.connection
            if decision == "wait":
                assert slot is not None and slot.dialing is not None
                await slot.dialing.wait()
                if slot.error is not None:
                    raise slot.error
                continue
            return await self._dial(key, address, expected_peer_id)

    async def _dial(
        self, key: tuple[str, str | None], address: str, expected: str | None
    ) -> Connection:
        assert self._nursery is not None
        host, port = parse_address(address)
        slot = _Slot(dialing=trio.Event())
        self._slots[key] = slot
        try:
            connection = await self._nursery.start(
                _dial_and_run,
                host,
                port,
                self._security,
                expected,
                self._router,
                self._hello,
                self._config,
            )
        except BaseException as exc:
            slot.error = exc
            del self._slots[key]
            raise
        finally:
            dialing, slot.dialing = slot.dialing, None
            dialing.set()
        slot.connection = connection
        return connection
