"""Routes for training requests: throughput-spread, and, for a request that
names a LoRA adapter, only over servers that loaded it.

Which adapters a server loaded is in its ``info`` reply (``adapters``),
not in gossip records, so the first request with an adapter asks every
routable server it has not asked yet, and remembers the answers by peer
id. A server that fails is forgotten with its ban and asked again once it
is routable. Routing itself is the client's (``plan_route``) over a view
narrowed to the servers with the adapter, so an adapter never changes how
a route is chosen, only among whom.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import trio

from ..errors import LibpipeError, NoRouteError
from ._context import SwarmContext
from ._failover import FailureLedger
from ._routing import PlannedHop, plan_route
from ._view import ServerEntry, SwarmView

logger = logging.getLogger("libpipe.client")


class AdapterDirectory:
    """Adapter names per server, learned from ``info`` on first need."""

    def __init__(self) -> None:
        self._loaded: dict[str, frozenset[str]] = {}

    def loaded(self, peer_id: str) -> frozenset[str] | None:
        return self._loaded.get(peer_id)

    def forget(self, peer_id: str) -> None:
        self._loaded.pop(peer_id, None)

    async def learn(self, ctx: SwarmContext) -> None:
        """Ask every routable server not asked yet (concurrently)."""
        unknown = [e for e in ctx.view.routable() if e.peer_id not in self._loaded]
        async with trio.open_nursery() as nursery:
            for entry in unknown:
                nursery.start_soon(self._ask, ctx, entry)

    async def _ask(self, ctx: SwarmContext, entry: ServerEntry) -> None:
        try:
            with trio.fail_after(ctx.policy.connect_timeout):
                connection = await ctx.connect(entry)
                reply = await connection.call("info")
        except (LibpipeError, OSError, trio.TooSlowError) as exc:
            # Banned like any failed hop, so routing does not wait on it again
            # until its ban is over and a probe finds it answering.
            ctx.view.ban(entry.peer_id, f"info failed: {exc or type(exc).__name__}")
            return
        names = reply.meta.get("adapters", [])
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            logger.warning("server %s sent malformed adapters %r", entry.peer_id[:12], names)
            names = []
        self._loaded[entry.peer_id] = frozenset(names)


class _AdapterView:
    """A swarm view whose routable servers are those with one adapter."""

    def __init__(self, view: SwarmView, directory: AdapterDirectory, adapter: str) -> None:
        self._view = view
        self._directory = directory
        self.adapter = adapter

    def routable(self, *, max_length: int | None = None) -> list[ServerEntry]:
        return [
            e
            for e in self._view.routable(max_length=max_length)
            if self.adapter in (self._directory.loaded(e.peer_id) or ())
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)


async def plan_training_route(
    ctx: SwarmContext,
    ledger: FailureLedger,
    directory: AdapterDirectory,
    *,
    start: int,
    end: int,
    adapter: str | None,
    tokens: int = 1,
    objective: Literal["latency", "throughput"] = "throughput",
    session_tokens: int = 0,
    batch: int = 1,
) -> list[PlannedHop]:
    """A throughput-spread route over ``[start, end)`` for requests of
    ``tokens`` tokens, through servers that have ``adapter`` (any server when
    None). Without a route, learns the swarm again and waits within the
    ledger's bound, like ``ctx.plan``. Inference sessions with an adapter
    route here too, with ``objective="latency"`` and their cache needs."""
    shape: dict[str, Any] = {
        "objective": objective,
        "tokens": tokens,
        "session_tokens": session_tokens,
        "batch": batch,
    }
    if adapter is None:
        return await ctx.plan(ledger, start=start, end=end, **shape)
    refreshed = False
    while True:
        await directory.learn(ctx)
        try:
            return plan_route(
                _AdapterView(ctx.view, directory, adapter),  # type: ignore[arg-type]
                start=start,
                end=end,
                load=ctx.load if objective == "throughput" else None,
                rng=ctx.rng if objective == "throughput" else None,
                forwarding=ctx.forwarding and objective == "latency",
                **shape,
            )
        except NoRouteError as exc:
            error = NoRouteError(
                f"{exc.message} with adapter {adapter!r}", **exc.details, adapter=adapter
            )
            if not refreshed:
                refreshed = True
            else:
                await ledger.wait_for_route(error)
            await ctx.refresh()
