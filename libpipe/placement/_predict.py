"""Predicted mean per-token time of a placement under its offered load,
waiting for cache included: what libpipe's placement minimises.

Theory of operation
-------------------
1. Slots. Sessions are opened on the placement one client location after
   another (in proportion to their shares), each routed by the live
   ``route`` (waiting penalty on) and holding its KV cache, until every
   client location finds no route with room or there are clearly more
   slots than the load can use. Each slot is a place for one session and
   has the per-token time t_i of its route. Sessions that share a route
   are opened together, so this costs about one route per cache that fills.
2. Load. Sessions live D = l_max * t seconds, so with a client location's
   cheapest k slots in use its open sessions average A = lambda * share *
   l_max * mean(t_1..t_k) (Little's law); k is the smallest count that
   carries that load. The decode time is the share-weighted mean over
   client locations (a session uses routes from its own client).
3. Waiting. With c slots and A sessions offered, a new session waits for
   cache with the Erlang C probability and, when it does, D / (c - A) on
   average (M/M/c with the slots as servers): W = C(c, A) * D / (c - A),
   spread over its l_max tokens.
4. Overload. When even every slot of a client location cannot carry its
   arrivals (lambda * share above its slots' total rate sum 1 / (l_max *
   t_i)), queues grow without bound; such placements are ranked by the
   worst such ratio, far above any stable one.

This is what CG-BP's single design concurrency guesses at: more blocks per
server mean fewer hops but fewer slots, and the prediction weighs the two
with the routing the system really runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import NoRouteError
from ._blocks import check_covered
from ._ledger import SessionLedger
from ._load import design_sessions
from ._model import PlacementProblem

# Seconds per token charged per unit of overload (lambda over the slots'
# total rate): any overloaded placement ranks behind every stable one.
OVERLOAD_S_PER_TOKEN = 100.0
# Sessions opened per client location per round of filling (times its share
# of arrivals): the larger of ROUND_SESSIONS and the cap over ROUNDS, small
# enough that locations take turns, large enough that filling stays a few
# dozen routes.
ROUND_SESSIONS = 8
ROUNDS = 16


@dataclass(frozen=True)
class Prediction:
    """``token_time``: predicted mean seconds per token, waiting included;
    ``decode_time``: mean per-token time of the routes the load uses;
    ``wait``: predicted mean seconds a session waits for cache; ``slots``:
    sessions the placement holds at once (up to the cap filling stops at);
    ``load``: mean sessions open (Little's law); ``overload``: the load over
    what all slots can serve (>= 1 means queues grow without bound)."""

    token_time: float
    decode_time: float
    wait: float
    slots: int
    load: float
    overload: float


def predict(
    problem: PlacementProblem,
    placement: Mapping[str, tuple[int, int]],
    *,
    forwarding: bool = False,
) -> Prediction:
    """``forwarding``: sessions are routed and costed with server-to-server
    forwarding (``PlacementProblem.forwarding``). Raises ``NoRouteError``
    when the placement leaves blocks uncovered."""
    w = problem.workload
    check_covered(placement.values(), 0, problem.model.num_blocks, "the placement leaves uncovered")
    slots = _fill_slots(problem, placement, 4 * design_sessions(problem) + 16, forwarding)
    decode = load = mean_all = overload = 0.0
    for client, share in w.client_shares():
        # Each client location's sessions use its own routes: its load is
        # carried by its cheapest slots, and its share weighs its times.
        times = sorted(slots[client])
        rate = sum(1.0 / (w.l_max * t) if t > 0 else math.inf for t in times)
        arrivals = w.arrival_rate * share
        overload = max(overload, arrivals / rate if rate > 0 else math.inf)
        if not times:
            continue
        total = 0.0
        for k, t in enumerate(times, 1):
            total += t
            if k >= arrivals * w.l_max * total / k:
                break
        decode += share * total / k
        load += arrivals * w.l_max * total / k
        mean_all += share * sum(times) / len(times)
    c = sum(len(times) for times in slots.values())
    if overload >= 1 or load >= c:
        return Prediction(
            mean_all + OVERLOAD_S_PER_TOKEN * min(max(overload, 1.0), 1e6),
            mean_all,
            math.inf,
            c,
            load,
            overload,
        )
    service = w.l_max * decode
    wait = erlang_c(c, load) * service / (c - load)
    return Prediction(decode + wait / w.l_max, decode, wait, c, load, overload)


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``servers``
    servers and offered load ``load`` < servers (Erlang C, computed through
    the Erlang B recursion, which stays stable for hundreds of servers)."""
    if load <= 0:
        return 0.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


def _fill_slots(
    problem: PlacementProblem,
    placement: Mapping[str, tuple[int, int]],
    cap: int,
    forwarding: bool,
) -> dict[str, list[float]]:
    """Per client location, the per-token times of the slots opened for it."""
    ledger = SessionLedger(problem, placement, forwarding=forwarding)
    shares = problem.workload.client_shares()
    # Per client location: servers found without room for the hop it was
    # routed over; they are left out of its later routes.
    full: dict[str, set[str]] = {client: set() for client, _ in shares}
    active = list(shares)
    slots: dict[str, list[float]] = {client: [] for client, _ in shares}
    opened = 0
    while active and opened < cap:
        for client, share in list(active):
            try:
                r = ledger.route(client, skip=full[client], need_room=True)
            except NoRouteError:  # no room left along any chain
                active.remove((client, share))
                continue
            fits = ledger.room(r)
            room = min(fits.values())
            if room == 0:
                full[client].update(peer for peer, n in fits.items() if n == 0)
                continue
            quota = max(1, round(share * max(ROUND_SESSIONS, cap / ROUNDS)))
            batch = min(room, quota, cap - opened)
            slots[client] += [r.cost] * batch
            opened += batch
            ledger.take(r, batch)
            if opened >= cap:
                break
    return slots
