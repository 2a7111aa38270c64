"""Sessions opened one route at a time on a placement, each holding its KV
cache: the shared loop of ``predict`` (slots until the cache runs out) and
``evaluate`` (a fixed count of sessions, the MILP's objective).

Each route is the live ``route`` (WS-RR waiting penalty on) from one client
location over the servers with the cache left so far, with server-to-server
forwarding when the caller asks for it (``PlacementProblem.forwarding``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from ._model import PlacementProblem
from ._route import route
from ._view import Forwarding, Route, ServerView


class SessionLedger:
    """Free cache per server as sessions are opened on a placement."""

    def __init__(
        self,
        problem: PlacementProblem,
        placement: Mapping[str, tuple[int, int]],
        *,
        forwarding: bool = False,
    ) -> None:
        self.problem = problem
        clients = [client for client, _ in problem.workload.client_shares()]
        self.views = {
            client: [v for v in problem.views(placement, client) if v.start < v.end]
            for client in clients
        }
        self.forwarding: dict[str, Forwarding | None] = {
            client: problem.forwarding(client) if forwarding else None for client in clients
        }
        self.free = {v.peer_id: v.free_cache_bytes for vs in self.views.values() for v in vs}
        self.per_block = problem.model.session_cache_bytes(problem.workload)

    def route(self, client: str, *, skip: Collection[str] = (), need_room: bool = False) -> Route:
        """The route a new session from ``client`` takes now, leaving out the
        servers in ``skip`` and, with ``need_room``, those without cache for
        one session on one block. Raises ``NoRouteError`` when none is left."""
        current = [
            _with_free(v, self.free[v.peer_id])
            for v in self.views[client]
            if v.peer_id not in skip and (not need_room or self.free[v.peer_id] >= self.per_block)
        ]
        return route(
            current,
            self.problem.model.num_blocks,
            session_tokens=self.problem.workload.session_tokens,
            forwarding=self.forwarding[client],
        )

    def room(self, r: Route) -> dict[str, int]:
        """Per server of the route: how many more sessions its hop fits."""
        return {
            h.peer_id: self.free[h.peer_id] // ((h.end - h.start) * self.per_block) for h in r.hops
        }

    def take(self, r: Route, sessions: int) -> None:
        """Open ``sessions`` sessions on the route (cache never below 0: a
        session that does not fit waits and holds nothing yet)."""
        for h in r.hops:
            used = sessions * (h.end - h.start) * self.per_block
            self.free[h.peer_id] = max(0, self.free[h.peer_id] - used)


def _with_free(view: ServerView, free: int) -> ServerView:
    if view.free_cache_bytes == free:
        return view
    return dataclasses.replace(view, free_cache_bytes=free)
