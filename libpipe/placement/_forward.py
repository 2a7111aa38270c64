"""Shortest-path routing when servers forward to each other (``Forwarding``).

Theory of operation
-------------------
With forwarding, what a hop costs on the wire depends on the hop before it
(server-to-server RTT), so the dynamic programme of ``_route.py`` gains the
last server in its state: ``dist[b, j]`` is the cheapest way to have
computed blocks [start, b) with the last hop on server j (which holds block
b - 1). A hop on j entering at boundary i pays

    enter[i, j] = min over p != j of dist[i, p] + one_way(p, j)

(``one_way(client, j)`` at the start), and then, as without forwarding,
``(k - i) * c_j + penalty_j(k - i)`` to reach boundary k. The route ends
with the trip back to the client from its last server.

Cost: at each boundary, the servers that can hand over (those ending a hop
there) times those that can take over (those holding the next block), done
as one numpy minimum; within a server the running minimum of
``enter[i, j] - i * c_j`` (no penalty) keeps the rest linear, as in
``_route.py``. 500 servers x 80 blocks route in tens of milliseconds.

Server-to-server RTTs are asked of ``Forwarding.server_rtt`` once per pair
of sites for the life of the ``Forwarding`` and kept in a sites x sites
matrix (``trip_matrix``): a swarm of 500 servers in 50 places asks 2,500
times, once, and every later route indexes the matrix.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._view import Forwarding, Hop

if TYPE_CHECKING:
    from ._route import _Edges


# Hand-overs at one boundary (servers that can hand over x servers that can
# take over) above which numpy's vector minimum beats a Python loop; below
# it numpy's per-call cost dominates (small swarms, route after route in
# the simulator).
VECTOR_PAIRS = 256


def forwarded_hops(
    edges: Sequence[_Edges],
    rank: Mapping[str, int],
    start: int,
    end: int,
    forwarding: Forwarding,
) -> tuple[list[Hop], np.ndarray, dict[str, int]]:
    """The cheapest chain of hops over [start, end) with forwarding (ties go
    to the lower ``rank``); with the one-way trip matrix and each peer's row
    in it, for costing the route. ``edges`` must cover every block of the
    range."""
    order = sorted(edges, key=lambda e: rank[e.view.peer_id])
    n = len(order)
    ids = [e.view.peer_id for e in order]
    size = end - start + 1
    per_block = [e.per_block for e in order]
    dist = [[math.inf] * n for _ in range(size)]
    came_from = [[-1] * n for _ in range(size)]  # previous server at entry
    entered = [[-1] * n for _ in range(size)]  # entry boundary of the last hop
    covering: list[list[int]] = [[] for _ in range(size - 1)]  # holders of block b, by rank
    for j, e in enumerate(order):
        for b in range(max(e.view.start, start), min(e.view.end, end)):
            covering[b - start].append(j)
    client = [forwarding.client_one_way(e.view) for e in order]
    trip = trip_matrix(forwarding, ids)
    trip_rows = trip.tolist()

    # Servers without a penalty keep their best (key, entry); others every entry.
    best_key = [math.inf] * n
    best_entry = [-1] * n
    entries: dict[int, list[tuple[int, float]]] = {}

    for i in range(start, end):
        takers = covering[i - start]
        if i == start:
            enter = [client[j] for j in takers]
        else:
            givers = covering[i - 1 - start]
            enter, source = _hand_over(dist[i - start], givers, takers, trip, trip_rows)
            for j, p in zip(takers, source, strict=True):
                came_from[i - start][j] = p
        k = i + 1
        reach = dist[k - start]
        reach_entry = entered[k - start]
        for j, value in zip(takers, enter, strict=True):
            edge = order[j]
            if edge.penalty is None:
                key = value - i * per_block[j]
                if key < best_key[j]:
                    best_key[j], best_entry[j] = key, i
                reach[j] = best_key[j] + k * per_block[j]
                reach_entry[j] = best_entry[j]
                continue
            # Its penalty is not linear in the blocks used: every entry counts.
            if value < math.inf:
                entries.setdefault(j, []).append((i, value))
            reach[j], reach_entry[j] = min(
                ((v + edge.cost(k - at, fixed=False), at) for at, v in entries.get(j, ())),
                default=(math.inf, -1),
            )

    last = dist[size - 1]
    j = min(range(n), key=lambda m: (last[m] + client[m], m))
    hops: list[Hop] = []
    k = end
    while k != start:
        i = entered[k - start][j]
        hops.append(Hop(ids[j], i, k))
        j, k = came_from[i - start][j], i
    hops.reverse()
    return hops, trip, {peer: n for n, peer in enumerate(ids)}


def _hand_over(
    dist_here: list[float],
    givers: list[int],
    takers: list[int],
    trip: np.ndarray,
    trip_rows: list[list[float]],
) -> tuple[list[float], list[int]]:
    """For each taker j: min over givers p of dist[p] + one_way(p, j) (inf
    on p == j), and the first p reaching it."""
    if len(givers) * len(takers) > VECTOR_PAIRS:
        g = np.array(givers, dtype=np.int64)
        t = np.array(takers, dtype=np.int64)
        total = np.array([dist_here[p] for p in givers])[:, None] + trip[g[:, None], t]
        pick = total.argmin(axis=0)
        return total[pick, np.arange(len(takers))].tolist(), g[pick].tolist()
    enter, source = [], []
    for j in takers:
        best, best_p = math.inf, givers[0]
        for p in givers:
            value = dist_here[p] + trip_rows[p][j]
            if value < best:
                best, best_p = value, p
        enter.append(best)
        source.append(best_p)
    return enter, source


def trip_matrix(forwarding: Forwarding, ids: Sequence[str]) -> np.ndarray:
    """One-way seconds from server ids[a] to ids[b] (inf on the diagonal:
    consecutive hops on one server are one hop).

    Answers of ``server_rtt`` are kept in the ``Forwarding`` (a sites x
    sites matrix that grows as new sites appear), so each pair of sites is
    asked once for the life of that ``Forwarding``."""
    memo = forwarding._memo
    names: dict[str, int] = memo.setdefault("names", {})
    site_names = [forwarding.site_of(peer) for peer in ids]
    new = [name for name in dict.fromkeys(site_names) if name not in names]
    if new:
        old = len(names)
        listed = [*names, *new]
        grown = np.empty((len(listed), len(listed)))
        if old:
            grown[:old, :old] = memo["matrix"]
        shared = set(forwarding.site.values())  # sites that may hold several servers
        for a, name_a in enumerate(listed):
            for b, name_b in enumerate(listed):
                if a < old and b < old:
                    continue
                if a == b and name_a not in shared:
                    grown[a, b] = math.inf  # a server's own site: never a hand-over
                else:
                    grown[a, b] = forwarding.site_one_way(name_a, name_b)
        # Only once every answer is in: a bad one leaves the memo as it was.
        names.update((name, old + n) for n, name in enumerate(new))
        memo["matrix"] = grown
    site = np.array([names[name] for name in site_names], dtype=np.int64)
    trip = memo["matrix"][site[:, None], site]
    np.fill_diagonal(trip, math.inf)
    return trip


def forwarded_cost(
    hops: Sequence[Hop],
    edges: Mapping[str, _Edges],
    forwarding: Forwarding,
    trip: np.ndarray,
    row: Mapping[str, int],
) -> float:
    """A route's expected per-token time with forwarding (see ``Forwarding``)."""
    if not hops:
        return 0.0
    cost = forwarding.client_one_way(edges[hops[0].peer_id].view)
    cost += forwarding.client_one_way(edges[hops[-1].peer_id].view)
    for before, after in itertools.pairwise(hops):
        cost += float(trip[row[before.peer_id], row[after.peer_id]])
    for hop in hops:
        cost += edges[hop.peer_id].cost(hop.end - hop.start, reported=True, fixed=False)
    return cost
