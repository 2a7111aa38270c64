"""Gossip over libpipe's own RPC: the production ``Transport``.

Requests (``swarm.ping``, ``swarm.ping_req``, ``swarm.push_pull``,
``swarm.view``) are unary calls; news (``swarm.gossip``) goes as a Notify,
which needs no stream and no reply. The embedding server owns the listener
(``libpipe.net.serve`` with its ``Router``) and the ``ConnectionPool``;
this adapter only registers the swarm methods on that router and sends
through that pool, so gossip shares the connections (and the TLS
admission) of everything else the server does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..errors import ConfigError, ConnectionClosedError
from ..net import CallContext, ConnectionPool, Message, Router
from ._transport import Handler, Transport

REQUEST_METHODS = ("swarm.ping", "swarm.ping_req", "swarm.push_pull", "swarm.view")
NOTIFY_METHODS = ("swarm.gossip",)

logger = logging.getLogger("libpipe.swarm")


class RpcTransport(Transport):
    """One node's gossip endpoint on ``router`` (incoming) and ``pool`` (outgoing).

    ``address`` is the ``host:port`` this node's ``serve`` listens on, as
    other nodes should dial it."""

    def __init__(self, router: Router, pool: ConnectionPool, address: str) -> None:
        self._pool = pool
        self._address = address
        self._handler: Handler | None = None
        for method in REQUEST_METHODS:
            router.unary(method, self._unary(method))
        for method in NOTIFY_METHODS:
            router.notify(method, self._notified(method))

    @property
    def address(self) -> str:
        return self._address

    async def request(self, address: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        connection = await self._pool.get(address)
        reply = await connection.call(method, body)
        return reply.meta

    async def notify(self, address: str, method: str, body: dict[str, Any]) -> None:
        connection = await self._pool.get(address)
        await connection.notify(method, body)

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._handler is not None:
            raise ConfigError("this gossip transport is already serving")
        self._handler = handler
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._handler = None

    def _current(self) -> Handler:
        if self._handler is None:
            # The router outlives the gossip node (e.g. while a server drains).
            raise ConnectionClosedError("gossip is not running on this node")
        return self._handler

    def _unary(self, method: str) -> Callable[[CallContext, Message], Awaitable[Message]]:
        async def handle(context: CallContext, message: Message) -> Message:
            reply = await self._current()(method, message.meta)
            return Message(reply or {})

        return handle

    def _notified(self, method: str) -> Callable[[CallContext, dict[str, Any]], Awaitable[None]]:
        async def handle(context: CallContext, meta: dict[str, Any]) -> None:
            handler = self._handler
            if handler is None:
                # News for a node that stopped (or not yet started): peers
                # keep gossiping until they learn it left. Nobody waits for
                # an answer, so there is no one to tell, and nothing wrong.
                logger.debug("dropped %s: gossip is not running on this node", method)
                return
            await handler(method, meta)

        return handle
