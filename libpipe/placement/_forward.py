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
of sites that can be adjacent, and kept in a sites x sites matrix, so that a
swarm of 500 servers in 50 places asks at most 2,500 times.
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


def forwarded_hops(
    edges: Sequence[_Edges],
    rank: Mapping[str, int],
    start: int,
    end: int,
    forwarding: Forwarding,
) -> tuple[list[Hop], Trips]:
    """The cheapest chain of hops over [start, end) with forwarding (ties go
    to the lower ``rank``), and the trips asked on the way, for costing it.
    ``edges`` must cover every block of the range."""
    order = sorted(edges, key=lambda e: rank[e.view.peer_id])
    n = len(order)
    ids = [e.view.peer_id for e in order]
    size = end - start + 1
    per_block = np.array([e.per_block for e in order])
    dist = np.full((size, n), math.inf)
    came_from = np.full((size, n), -1, dtype=np.int64)  # previous server at entry
    entered = np.full((size, n), -1, dtype=np.int64)  # entry boundary of the last hop
    covering = [[] for _ in range(size - 1)]  # servers holding block b, in rank order
    for j, e in enumerate(order):
        for b in range(max(e.view.start, start), min(e.view.end, end)):
            covering[b - start].append(j)
    cover = [np.array(js, dtype=np.int64) for js in covering]
    first = np.array([forwarding.client_one_way(e.view) for e in order])
    site_names: dict[str, int] = {}
    site = np.array(
        [site_names.setdefault(forwarding.site_of(peer), len(site_names)) for peer in ids],
        dtype=np.int64,
    )
    trips = Trips(forwarding, site_names, site)

    # Servers without a penalty keep their best (key, entry); others every entry.
    best_key = np.full(n, math.inf)
    best_entry = np.full(n, -1, dtype=np.int64)
    entries: dict[int, list[tuple[int, float]]] = {}
    penalised = [e.penalty is not None for e in order]

    for i in range(start, end):
        takers = cover[i - start]
        if i == start:
            enter = first[takers]
            source = np.full(len(takers), -1, dtype=np.int64)
        else:
            givers = np.flatnonzero(np.isfinite(dist[i - start]))
            enter, source = _hand_over(givers, takers, dist[i - start], trips)
        came_from[i - start, takers] = source
        key = enter - i * per_block[takers]
        for t, j in enumerate(takers.tolist()):
            if penalised[j]:
                if enter[t] < math.inf:
                    entries.setdefault(j, []).append((i, float(enter[t])))
            elif key[t] < best_key[j]:
                best_key[j] = key[t]
                best_entry[j] = i
        k = i + 1
        dist[k - start, takers] = best_key[takers] + k * per_block[takers]
        entered[k - start, takers] = best_entry[takers]
        for j in takers.tolist():
            if penalised[j] and entries.get(j):
                cost, entry = min(
                    (value + order[j].cost(k - at, fixed=False), at) for at, value in entries[j]
                )
                dist[k - start, j] = cost
                entered[k - start, j] = entry

    last = np.array([forwarding.client_one_way(e.view) for e in order])
    total = dist[size - 1] + last
    j = int(np.argmin(total))
    hops: list[Hop] = []
    k = end
    while k != start:
        i = int(entered[k - start, j])
        hops.append(Hop(ids[j], i, k))
        j, k = int(came_from[i - start, j]), i
    hops.reverse()
    return hops, trips


class Trips:
    """One-way trip times between servers, asked of ``server_rtt`` once per
    pair of sites (NaN in ``by_site``: not asked yet)."""

    def __init__(self, forwarding: Forwarding, sites: dict[str, int], site: np.ndarray) -> None:
        self.forwarding = forwarding
        self.sites = sites
        self.names = list(sites)
        self.site = site
        self.by_site = np.full((len(sites), len(sites)), math.nan)

    def one_way(self, a: str, b: str) -> float:
        """Seconds for one message from server ``a`` to server ``b``."""
        s = self.sites[self.forwarding.site_of(a)]
        t = self.sites[self.forwarding.site_of(b)]
        return self._ask(s, t)

    def _ask(self, s: int, t: int) -> float:
        if math.isnan(self.by_site[s, t]):
            self.by_site[s, t] = self.forwarding.site_one_way(self.names[s], self.names[t])
        return float(self.by_site[s, t])

    def between(self, givers: np.ndarray, takers: np.ndarray) -> np.ndarray:
        """givers x takers one-way times; a server to itself is inf
        (consecutive hops on one server are one hop)."""
        a, b = self.site[givers], self.site[takers]
        trip = self.by_site[np.ix_(a, b)]
        for x, y in np.argwhere(np.isnan(trip)).tolist():
            trip[x, y] = self._ask(int(a[x]), int(b[y]))
        trip[givers[:, None] == takers[None, :]] = math.inf
        return trip


def _hand_over(
    givers: np.ndarray, takers: np.ndarray, dist_here: np.ndarray, trips: Trips
) -> tuple[np.ndarray, np.ndarray]:
    """For each taker j: the cheapest dist[p] + one_way(p, j) over givers p
    != j, and that p (-1 and inf when there is none)."""
    if len(givers) == 0:
        return np.full(len(takers), math.inf), np.full(len(takers), -1, dtype=np.int64)
    total = dist_here[givers][:, None] + trips.between(givers, takers)
    pick = np.argmin(total, axis=0)
    enter = total[pick, np.arange(len(takers))]
    source = np.where(np.isfinite(enter), givers[pick], -1)
    return enter, source


def forwarded_cost(hops: Sequence[Hop], edges: Mapping[str, _Edges], trips: Trips) -> float:
    """A route's expected per-token time with forwarding (see ``Forwarding``)."""
    fwd = trips.forwarding
    if not hops:
        return 0.0
    cost = fwd.client_one_way(edges[hops[0].peer_id].view)
    cost += fwd.client_one_way(edges[hops[-1].peer_id].view)
    for before, after in itertools.pairwise(hops):
        cost += trips.one_way(before.peer_id, after.peer_id)
    for hop in hops:
        cost += edges[hop.peer_id].cost(hop.end - hop.start, reported=True, fixed=False)
    return cost
