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

from collections.abc import Mapping
from dataclasses import dataclass

from ._ledger import SessionLedger
from ._load import design_sessions, split_count
from ._model import PlacementProblem


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
    *,
    forwarding: bool = False,
) -> Evaluation:
    """Mean per-token time of ``sessions`` open sessions (default: what the
    offered load implies, ``design_sessions``), routed and costed with
    server-to-server forwarding when ``forwarding``. Raises ``NoRouteError``
    when the placement leaves blocks uncovered."""
    n = design_sessions(problem) if sessions is None else sessions
    ledger = SessionLedger(problem, placement, forwarding=forwarding)
    total = 0.0
    waiting = 0
    for client, count in split_count(n, problem.workload.client_shares()):
        left = count
        while left > 0:
            r = ledger.route(client)
            fit = min(ledger.room(r).values())
            batch = left if fit == 0 else min(left, fit)
            if fit == 0:
                waiting += batch
            total += batch * r.cost
            ledger.take(r, batch)
            left -= batch
    return Evaluation(total / n, n, waiting)
