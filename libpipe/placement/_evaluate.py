"""The objective placements are compared by: a steady state routed by WS-RR.

``evaluate`` opens ``sessions`` concurrent sessions on a placement, one
client location after another in proportion to its share of arrivals,
each routed by the same ``route`` the live client uses (waiting penalty
on), each taking its KV cache on the blocks it uses. The result is the
mean predicted per-token time over those sessions: it rewards fewer, faster
hops, and punishes placements whose cache runs out under the offered load
(the last sessions then pay the waiting penalty). Sessions that fit on the
same route are opened together, so an evaluation costs about one route per
client location plus one per cache that fills, not one per session.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ._load import design_sessions
from ._model import PlacementProblem
from ._route import route
from ._view import ServerView


@dataclass(frozen=True)
class Evaluation:
    """``token_time``: mean predicted seconds per token over ``sessions``
    open sessions; ``waiting``: how many of them found a hop without cache."""

    token_time: float
    sessions: int
    waiting: int


def evaluate(
    problem: PlacementProblem,
    placement: Mapping[str, tuple[int, int]],
    sessions: int | None = None,
) -> Evaluation:
    """Mean per-token time of ``sessions`` open sessions (default: what the
    offered load implies, ``design_sessions``). Raises ``NoRouteError`` when
    the placement leaves blocks uncovered."""
    n = design_sessions(problem) if sessions is None else sessions
    model, workload = problem.model, problem.workload
    tokens = workload.session_tokens
    per_block = model.session_cache_bytes(workload)
    demand = _split(n, workload.client_shares())
    views = {client: _placed(problem.views(placement, client)) for client, _ in demand}
    free = {v.peer_id: v.free_cache_bytes for vs in views.values() for v in vs}

    total = 0.0
    waiting = 0
    for client, count in demand:
        left = count
        while left > 0:
            current = [
                dataclasses.replace(v, free_cache_bytes=free[v.peer_id]) for v in views[client]
            ]
            r = route(current, model.num_blocks, session_tokens=tokens)
            fit = min(free[h.peer_id] // ((h.end - h.start) * per_block) for h in r.hops)
            batch = left if fit == 0 else min(left, fit)
            if fit == 0:
                waiting += batch
            total += batch * r.cost
            for h in r.hops:
                free[h.peer_id] = max(0, free[h.peer_id] - batch * (h.end - h.start) * per_block)
            left -= batch
    return Evaluation(total / n, n, waiting)


def _placed(views: list[ServerView]) -> list[ServerView]:
    return [v for v in views if v.start < v.end]


def _split(n: int, shares: list[tuple[str, float]]) -> list[tuple[str, int]]:
    """n sessions over client locations by largest remainder (sums to n)."""
    exact = [(client, n * share) for client, share in shares]
    counts = {client: math.floor(x) for client, x in exact}
    rest = n - sum(counts.values())
    by_remainder = sorted(exact, key=lambda cx: (-(cx[1] - math.floor(cx[1])), cx[0]))
    for client, _ in by_remainder[:rest]:
        counts[client] += 1
    return [(client, counts[client]) for client, _ in shares if counts[client] > 0]
