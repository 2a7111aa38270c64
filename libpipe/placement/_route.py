"""Shortest-path routing over the block graph.

Theory of operation
-------------------
Nodes are block boundaries ``start..end``; server j with span [s, e) gives an
edge i -> k for every s <= i < k <= e (a route may use part of a span), of
cost ``f_j + (k - i) * c_j + penalty_j(k - i)``. For "latency" f_j is the RTT
and c_j the per-block decode time; for "throughput" c_j is the per-block
forward time scaled by the server's in-flight load.

Every edge points forward, so the graph is a DAG in block order and Dijkstra's
answer is the same as a dynamic programme over boundaries in increasing
order, which is what runs here. Without a penalty the best way to reach k on
server j is ``min_i (dist[i] - i * c_j) + f_j + k * c_j``: one running minimum
per server, so a route costs O(sum of span lengths) instead of O(sum of span
lengths squared) — 500 servers x 80 blocks route in milliseconds. Servers
whose free cache cannot hold the session on their whole span (the only ones
with a penalty) keep their entry points and are scanned in full.

The WS-RR waiting penalty (Sun et al.) is the time until the server has freed
enough cache for ``session_tokens * batch`` tokens on the blocks used, spread
over the session's tokens so that it is in the same unit as the rest of the
cost (seconds per token).

A route never visits a server twice (``_merge_revisits``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Literal

from ..errors import ConfigError
from ._blocks import check_covered, is_int, is_number
from ._forward import forwarded_cost, forwarded_hops
from ._view import Forwarding, Hop, Route, ServerView

Objective = Literal["latency", "throughput"]
CachePenalty = Literal["wait", "petals"]

# A server whose free cache is short and that announces no release schedule
# (the live system) is assumed to keep a session waiting this long: about
# the life of a typical interactive session, so such a server is used only
# when every alternative is worse by more than that.
UNSCHEDULED_WAIT_S = 30.0
# PETALS' client (sequence_manager.py, ``alloc_delay``) adds this many seconds
# to a server whose announced free cache cannot hold the session on its whole
# span (a deliberately pessimistic check), instead of estimating a wait.
PETALS_ALLOC_DELAY_S = 10.0


def route(
    servers: Sequence[ServerView],
    num_blocks: int,
    *,
    start: int = 0,
    end: int | None = None,
    session_tokens: int = 0,
    batch: int = 1,
    objective: Objective = "latency",
    load: Mapping[str, float] | None = None,
    rng: random.Random | None = None,
    cache_penalty: CachePenalty = "wait",
    forwarding: Forwarding | None = None,
) -> Route:
    """The cheapest chain of hops through blocks [start, end) (end defaults to
    ``num_blocks``).

    ``session_tokens`` and ``batch`` size the KV cache the session will hold
    on each block it uses (0 tokens: no cache modelled, no waiting penalty).
    ``load`` maps peer ids to in-flight work (requests queued), used by the
    "throughput" objective. ``rng`` randomises: ties for "latency"; for
    "throughput" each server's compute cost is scaled by an Exp(1) draw, which
    sends work to equal-span replicas in proportion to their throughput (the
    minimum of exponentials with rates T_j is j's with probability
    T_j / sum T). Without ``rng`` the answer depends only on the inputs, ties
    going to the smaller peer id.

    ``cache_penalty`` says what a server short of cache costs: "wait" (WS-RR,
    the default) the wait until it has freed enough for the blocks used,
    spread over the session's tokens; "petals" PETALS' rule, a flat
    ``PETALS_ALLOC_DELAY_S`` on any hop of a server that cannot hold the
    session on its whole span (the baseline's router).

    ``forwarding`` (optional) costs the route as servers forwarding to each
    other (client -> s1 -> ... -> sk -> client, see ``Forwarding``) instead
    of the client calling each hop in turn; None keeps the client-centric
    cost, where each hop pays its view's ``rtt``.

    Raises ``NoRouteError`` naming the uncovered block ranges
    (``details["missing_blocks"]``, a list of [a, b)) and ``ConfigError`` for
    arguments that make no sense.
    """
    end = num_blocks if end is None else end
    _check_arguments(num_blocks, start, end, session_tokens, batch, objective, load)
    if cache_penalty not in ("wait", "petals"):
        raise ConfigError(f"cache_penalty must be 'wait' or 'petals', got {cache_penalty!r}")
    if forwarding is not None and not isinstance(forwarding, Forwarding):
        raise ConfigError(f"forwarding must be a Forwarding or None, got {forwarding!r}")
    if start == end:
        return Route((), 0.0)
    views = _usable_views(servers, num_blocks, start, end)
    check_covered(((v.start, v.end) for v in views), start, end, "no server holds blocks")

    load = load or {}
    need_per_block = session_tokens * batch
    edges = [
        _Edges.build(v, objective, load, rng, need_per_block, session_tokens, cache_penalty)
        for v in views
    ]
    if rng is None:
        rank = {v.peer_id: n for n, v in enumerate(views)}
    else:
        order = list(range(len(views)))
        rng.shuffle(order)
        rank = {v.peer_id: order[n] for n, v in enumerate(views)}
    by_id = {e.view.peer_id: e for e in edges}
    if forwarding is not None:
        found, trip, row = forwarded_hops(edges, rank, start, end, forwarding)
        hops = _merge_revisits(found)
        cost = forwarded_cost(hops, by_id, forwarding, trip, row)
        return Route(tuple(hops), cost, forwarded=True)
    hops = _merge_revisits(_shortest_hops(edges, rank, start, end))
    cost = sum(by_id[h.peer_id].cost(h.end - h.start, reported=True) for h in hops)
    return Route(tuple(hops), cost)


class _Edges:
    """The edges of one server: cost(n) = fixed + n * per_block + penalty(n).

    ``per_block`` is what the search uses (randomised when spreading load);
    ``reported_per_block`` is the expected value that ``Route.cost`` reports.
    """

    __slots__ = ("fixed", "penalty", "per_block", "reported_per_block", "view")

    def __init__(
        self,
        view: ServerView,
        fixed: float,
        per_block: float,
        reported_per_block: float,
        penalty: list[float] | None,
    ) -> None:
        self.view = view
        self.fixed = fixed
        self.per_block = per_block
        self.reported_per_block = reported_per_block
        # penalty[n] for n blocks used, or None when it is zero for every n.
        self.penalty = penalty

    @classmethod
    def build(
        cls,
        view: ServerView,
        objective: Objective,
        load: Mapping[str, float],
        rng: random.Random | None,
        tokens: int,
        session_tokens: int,
        cache_penalty: CachePenalty,
    ) -> _Edges:
        if objective == "latency":
            reported = per_block = view.tau_decode
        else:
            reported = per_block = view.tau_forward * (1.0 + load.get(view.peer_id, 0.0))
            if rng is not None:
                per_block *= rng.expovariate(1.0)
        penalty = _penalties(view, tokens, session_tokens, cache_penalty)
        return cls(view, view.rtt, per_block, reported, penalty)

    def cost(self, n: int, *, reported: bool = False, fixed: bool = True) -> float:
        """n blocks on this server; ``fixed=False`` leaves out the per-hop
        RTT (forwarding costs the trips between hops itself)."""
        extra = self.penalty[n] if self.penalty is not None else 0.0
        rate = self.reported_per_block if reported else self.per_block
        return (self.fixed if fixed else 0.0) + n * rate + extra


def _penalties(
    view: ServerView, tokens: int, session_tokens: int, cache_penalty: CachePenalty
) -> list[float] | None:
    """penalty[n]: what using n blocks of ``view`` adds to the per-token cost
    when its free cache is short (``tokens``: session tokens x batch)."""
    per_block = tokens * view.cache_bytes_per_token_block
    if per_block == 0 or view.free_cache_bytes >= per_block * view.num_blocks:
        return None
    if cache_penalty == "petals":
        return [0.0] + [PETALS_ALLOC_DELAY_S] * view.num_blocks
    releases = sorted(view.cache_release)
    out = [0.0] * (view.num_blocks + 1)
    for n in range(1, view.num_blocks + 1):
        out[n] = _wait(view.free_cache_bytes, releases, n * per_block) / session_tokens
    return out


def _wait(free: int, releases: list[tuple[float, int]], need: int) -> float:
    """Seconds until ``need`` bytes are free, given the release schedule."""
    if free >= need:
        return 0.0
    for at, freed in releases:
        free += freed
        if free >= need:
            return at
    last = releases[-1][0] if releases else 0.0
    return max(UNSCHEDULED_WAIT_S, last)


def _shortest_hops(edges: list[_Edges], rank: Mapping[str, int], start: int, end: int) -> list[Hop]:
    """The DP described at the top of the module.

    Consecutive hops must be on different servers: two hops on one server are
    one hop with an extra RTT, or a way to dodge its cache penalty that the
    server would not honour. So each boundary keeps its best two labels whose
    last hops are on different servers, and a server extends the best label
    that does not already end on it.
    """
    size = end - start + 1
    # labels[b - start]: up to two (cost, rank, edge, entry) ways to reach b,
    # cheapest first, ending on different servers; the start's edge is -1.
    labels: list[list[_Label]] = [[] for _ in range(size)]
    labels[0] = [(0.0, -1, -1, start)]
    covering: list[list[int]] = [[] for _ in range(size - 1)]  # edges holding block b
    for n, e in enumerate(edges):
        for b in range(max(e.view.start, start), min(e.view.end, end)):
            covering[b - start].append(n)
    # Per edge: its best entry (dist - entry * per_block, entry) when it has no
    # penalty; otherwise every entry, scanned in full.
    best: list[tuple[float, int] | None] = [None] * len(edges)
    entries: list[list[int]] = [[] for _ in edges]

    for k in range(start + 1, end + 1):
        entry = k - 1
        reach_entry = labels[entry - start]
        candidates: list[_Label] = []
        for n in covering[entry - start]:
            e = edges[n]
            d = _cost_avoiding(reach_entry, n)
            if e.penalty is None:
                if d < math.inf:
                    key = d - entry * e.per_block
                    held = best[n]
                    if held is None or key < held[0]:
                        best[n] = (key, entry)
                held = best[n]
                if held is None:
                    continue
                i = held[1]
                cost = _cost_avoiding(labels[i - start], n) + e.fixed + (k - i) * e.per_block
            else:
                if d < math.inf:
                    entries[n].append(entry)
                if not entries[n]:
                    continue
                cost, i = min(
                    (_cost_avoiding(labels[i - start], n) + e.cost(k - i), i) for i in entries[n]
                )
            candidates.append((cost, rank[e.view.peer_id], n, i))
        candidates.sort()
        labels[k - start] = candidates[:2]

    hops: list[Hop] = []
    k, avoid = end, -1
    while k != start:
        _, _, n, i = next(label for label in labels[k - start] if label[2] != avoid)
        hops.append(Hop(edges[n].view.peer_id, i, k))
        k, avoid = i, n
    hops.reverse()
    return hops


_Label = tuple[float, int, int, int]


def _cost_avoiding(labels: list[_Label], edge: int) -> float:
    """Cost of the best label that does not end on ``edge``."""
    for label in labels:
        if label[2] != edge:
            return label[0]
    return math.inf


def _merge_revisits(hops: list[Hop]) -> list[Hop]:
    """Replace every stretch that leaves a server and comes back to it by one
    hop on that server (its span is contiguous, so it holds the stretch).

    A route holds one session per server: a server visited twice would have
    to hold both sessions' cache, which the per-hop penalty cannot see (two
    hops that each fit can together overflow it), and the client, the
    server and the simulator all expect one hop per server. The DP rarely
    returns such a route (only when a cache penalty or a much faster server
    in the middle makes it cheapest); the merged route is valid and is
    costed honestly, penalty included.
    """
    while True:
        first: dict[str, int] = {}
        for n, hop in enumerate(hops):
            if hop.peer_id in first:
                p = first[hop.peer_id]
                merged = Hop(hop.peer_id, hops[p].start, hop.end)
                hops = [*hops[:p], merged, *hops[n + 1 :]]
                break
            first[hop.peer_id] = n
        else:
            return hops


def _check_arguments(
    num_blocks: int,
    start: int,
    end: int,
    session_tokens: int,
    batch: int,
    objective: str,
    load: Mapping[str, float] | None,
) -> None:
    if not (is_int(num_blocks) and num_blocks >= 1):
        raise ConfigError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    if not (is_int(start) and is_int(end) and 0 <= start <= end <= num_blocks):
        raise ConfigError(f"blocks [{start}, {end}) are not a range of the model's {num_blocks}")
    if not (is_int(session_tokens) and session_tokens >= 0):
        raise ConfigError(f"session_tokens must be an int >= 0, got {session_tokens!r}")
    if not (is_int(batch) and batch >= 1):
        raise ConfigError(f"batch must be an int >= 1, got {batch!r}")
    if objective not in ("latency", "throughput"):
        raise ConfigError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    for peer, value in (load or {}).items():
        if not (is_number(value) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"load of {peer} must be a finite number >= 0, got {value!r}")


def _usable_views(
    servers: Sequence[ServerView], num_blocks: int, start: int, end: int
) -> list[ServerView]:
    """Servers holding at least one block of [start, end), sorted by peer id."""
    seen: set[str] = set()
    usable = []
    for view in servers:
        if view.peer_id in seen:
            raise ConfigError(
                f"server {view.peer_id} appears twice in the view", peer_id=view.peer_id
            )
        seen.add(view.peer_id)
        if view.end > num_blocks:
            raise ConfigError(
                f"server {view.peer_id} holds [{view.start}, {view.end}), beyond the"
                f" model's {num_blocks} blocks",
                peer_id=view.peer_id,
            )
        if view.start < end and view.end > start and view.start < view.end:
            usable.append(view)
    usable.sort(key=lambda v: v.peer_id)
    return usable
