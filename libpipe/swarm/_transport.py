"""The seam between membership logic and the network.

Gossip needs only two things from a network: a request that awaits one
reply, and a one-way notification. Bodies are msgpack-able maps. Keeping
the seam this small is what lets the same node run over libpipe's RPC in
production and over ``MemoryNetwork`` (hundreds of nodes, virtual time) in
tests and benchmarks.

Timeouts are the caller's cancel scope: a lost request simply never
returns. Failures a transport can see (refused, broken, a typed error from
the peer's handler) raise ``LibpipeError`` subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

import trio

# (method, body) -> reply body for requests, ignored for notifications.
Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


class Transport(ABC):
    """One node's endpoint."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where other nodes reach this one ("host:port" on real networks)."""

    @abstractmethod
    async def request(self, address: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send ``body`` to ``method`` at ``address`` and return the reply."""

    @abstractmethod
    async def notify(self, address: str, method: str, body: dict[str, Any]) -> None:
        """Send without waiting for any answer; delivery is not guaranteed."""

    @abstractmethod
    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hand incoming requests and notifications to ``handler`` until cancelled."""
