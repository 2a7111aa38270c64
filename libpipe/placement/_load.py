"""How many sessions run at once, from the offered load (Little's law).

A session lives for about l_max tokens times its per-token time (plus a
prefill, small next to it), and sessions arrive at rate lambda, so on
average lambda * l_max * t sessions are open at once. Placement sizes its
cache for that number plus a Poisson margin: the count of open sessions is
Poisson-distributed, so mean + 2 standard deviations covers ~97% of the time.
"""

from __future__ import annotations

import math

from ._model import PlacementProblem, block_capacity

# Standard deviations of the Poisson count of open sessions that placement
# provisions cache for beyond the mean.
CONCURRENCY_MARGIN_SD = 2.0


def ideal_token_time(problem: PlacementProblem) -> float:
    """A lower-bound-like per-token time, before any placement exists: the
    fastest server's per-block time on every block, and as many hops (each at
    the shortest client-server hop time) as the largest weight-only capacity
    requires."""
    model = problem.model
    fastest = min(s.tau_decode for s in problem.servers)
    biggest = max(block_capacity(s, model, 0) for s in problem.servers)
    hops = math.ceil(model.num_blocks / max(1, biggest))
    shortest_hop = min(
        problem.network.hop_time(client, s.location)
        for client, _ in problem.workload.client_shares()
        for s in problem.servers
    )
    return model.num_blocks * fastest + hops * shortest_hop


def mean_open_sessions(problem: PlacementProblem, token_time: float) -> float:
    """Little's law: lambda * l_max * per-token time."""
    w = problem.workload
    return w.arrival_rate * w.l_max * token_time


def design_sessions(problem: PlacementProblem, token_time: float | None = None) -> int:
    """Open sessions to provision cache for: the mean plus the Poisson margin
    (at least 1)."""
    t = ideal_token_time(problem) if token_time is None else token_time
    mean = mean_open_sessions(problem, t)
    return max(1, math.ceil(mean + CONCURRENCY_MARGIN_SD * math.sqrt(mean)))


def split_count(n: int, shares: list[tuple[str, float]]) -> list[tuple[str, int]]:
    """n sessions over client locations by largest remainder (sums to n);
    locations that get none are left out."""
    exact = [(client, n * share) for client, share in shares]
    counts = {client: math.floor(x) for client, x in exact}
    rest = n - sum(counts.values())
    by_remainder = sorted(exact, key=lambda cx: (-(cx[1] - math.floor(cx[1])), cx[0]))
    for client, _ in by_remainder[:rest]:
        counts[client] += 1
    return [(client, counts[client]) for client, _ in shares if counts[client] > 0]
