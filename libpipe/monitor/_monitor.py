"""The monitor: polls the swarm, remembers what changed, serves the page.

One task polls ``survey`` every ``interval`` seconds and keeps the latest
snapshot, the error of the last failed poll, and a bounded list of events
from diffing successive snapshots. The page (``page.html``, package data)
fetches ``/api/swarm`` on the same period and redraws; it holds no state
the server does not, so a reload loses nothing.

Peers to ask are the ones given plus every server of the last snapshot,
so the monitor keeps working when the peer it started from dies.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import trio

from ..errors import ConfigError, LibpipeError
from ..net import ConnectionPool
from ..swarm import SwarmSnapshot, survey
from ._events import SwarmEvent, diff
from ._http import Response, bound_address, open_http_listeners, serve_http

logger = logging.getLogger("libpipe.monitor")

# Enough for an operator's coffee break of churn; older ones scroll away.
MAX_EVENTS = 200
DEFAULT_INTERVAL = 2.0


class Monitor:
    """``await nursery.start(monitor.serve, port)`` -> the page's ``(host, port)``."""

    def __init__(
        self,
        pool: ConnectionPool,
        peers: Sequence[str],
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not peers:
            raise ConfigError("the monitor needs at least one peer to ask")
        if not (interval > 0 and timeout > 0):
            raise ConfigError("monitor interval and timeout must be positive")
        self.pool = pool
        self.peers = list(peers)
        self.interval = interval
        self.timeout = timeout
        self.snapshot: SwarmSnapshot | None = None
        self.error: str | None = None
        self.events: deque[SwarmEvent] = deque(maxlen=MAX_EVENTS)
        self.polls = 0
        self._clock = clock
        self._page = resources.files(__package__).joinpath("page.html").read_bytes()

    async def poll(self) -> None:
        """Take one snapshot and record what changed (or why it failed)."""
        known = [s.record.addresses[0] for s in self.snapshot.servers] if self.snapshot else []
        peers = list(dict.fromkeys([*self.peers, *known]))
        try:
            snapshot = await survey(self.pool, peers, timeout=self.timeout, clock=self._clock)
        except LibpipeError as exc:
            if self.error is None:
                logger.warning("monitor: %s", exc)
            self.error = str(exc)
            return
        self.events.extend(diff(self.snapshot, snapshot))
        self.snapshot = snapshot
        self.error = None
        self.polls += 1

    async def run(self) -> None:
        """Poll every ``interval`` seconds until cancelled."""
        while True:
            start = trio.current_time()
            await self.poll()
            await trio.sleep_until(start + self.interval)

    def state(self) -> dict[str, Any]:
        """The document ``/api/swarm`` serves."""
        return {
            "now": self._clock(),
            "interval": self.interval,
            "polls": self.polls,
            "error": self.error,
            "snapshot": self.snapshot.to_json() if self.snapshot is not None else None,
            "events": [e.to_json() for e in reversed(self.events)],
        }

    async def respond(self, path: str) -> Response:
        if path in ("/", "/index.html"):
            return Response(200, self._page, "text/html; charset=utf-8")
        if path == "/api/swarm":
            body = json.dumps(self.state()).encode()
            return Response(200, body, "application/json")
        return Response(404, b"not found\n")

    async def serve(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the page's port, then poll and serve until cancelled."""
        listeners = await open_http_listeners(host, port)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll and serve the page on listeners bound by ``open_http_listeners``
        (binding first keeps a taken port a plain ``ConfigError``)."""
        bound = bound_address(listeners)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_http, self.respond, listeners)
            nursery.start_soon(self.run)
            logger.info("monitor page at http://%s:%d/", *bound)
            task_status.started(bound)
