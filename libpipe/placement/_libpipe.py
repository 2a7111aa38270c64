"""libpipe's own placement: greedy candidates, scored by a queueing
prediction, then polished by local search.

Theory of operation
-------------------
CG-BP fixes one design concurrency R and makes every server reserve cache
for all R sessions, although replicas of a block share them; it orders
servers by speed alone, although a fast server far from every client costs
its RTT on each token. We keep its greedy shape and fix both:

1. Candidates. For a grid of per-server design concurrencies r (1, 2, 4...
   up to four times the open sessions the offered load implies, that
   number, and the largest r that still covers the model), a greedy pass
   gives each server m_j = min(floor(M_j / (s_m + s_c * r)), L, cap)
   blocks, orders servers by the per-block time they add
   to a client's token (tau_j + hop time / m_j, averaged over clients), and
   puts each on the window with the largest shortfall against the sessions
   the load needs, counting what each server's cache can really hold
   there. CG-BP's and PETALS' own placements are candidates too, so we
   never start behind either. Identical candidates are scored once.
2. Scoring. Every candidate is scored by ``predict``: the mean per-token
   time under the offered load, waiting for cache included, with sessions
   routed by the same WS-RR ``route`` the live system runs. This trades
   blocks (fewer hops) against cache (fewer waits) instead of guessing R.
3. Local search. From the best candidate, each server in turn tries other
   windows (aligned to its neighbours' boundaries or the model's ends) and
   other block counts (one more or fewer, or none), keeping a change only
   when the score drops. The number of predictions is bounded by a budget
   that shrinks with the instance (``search_budget``).
4. Scale. Above ``MAX_SCORED_SIZE`` servers x blocks, scoring every
   candidate would take seconds; the greedy pass runs once, each server
   provisioning its share of the load's sessions (the load over the number
   of copies of the model the swarm holds), so 500 servers x 80 blocks
   place in tens of milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from ._blocks import covers
from ._cgbp import largest_covering_r, place_cg_bp
from ._load import design_sessions
from ._model import Placement, PlacementProblem, ServerSpec, block_capacity
from ._petals import place_petals
from ._predict import predict
from ._windows import most_under_served_window

# Evaluations of local search allowed for an instance of one server and one
# block; the budget is this divided by servers x blocks (capped below).
SEARCH_WORK = 40_000
MAX_SEARCH_EVALUATIONS = 60
# Above this many servers x blocks the candidates are not scored one by one
# (each score routes every client location): the RTT-aware greedy pass at the
# load's own design concurrency is used directly.
MAX_SCORED_SIZE = 20_000


def place_libpipe(problem: PlacementProblem, *, forwarding: bool = False) -> Placement:
    """``forwarding``: sessions will be routed with server-to-server
    forwarding, so candidates are scored that way."""
    sessions = design_sessions(problem)
    size = len(problem.servers) * problem.model.num_blocks
    if size > MAX_SCORED_SIZE:
        return greedy(problem, _share_of(problem, sessions), sessions)

    best: Placement | None = None
    best_score = math.inf
    seen: set[tuple[tuple[str, tuple[int, int]], ...]] = set()
    for candidate in _candidates(problem, sessions):
        key = tuple(sorted(candidate.items()))
        if key in seen or not covers(candidate.values(), problem.model.num_blocks):
            continue
        seen.add(key)
        score = predict(problem, candidate, forwarding=forwarding).token_time
        if score < best_score:
            best, best_score = candidate, score
    if best is None:
        # No candidate covers the model; CG-BP's placement shows the gap.
        return place_cg_bp(problem, sessions)
    return _local_search(problem, best, best_score, search_budget(problem), forwarding)


def search_budget(problem: PlacementProblem) -> int:
    size = len(problem.servers) * problem.model.num_blocks
    return min(MAX_SEARCH_EVALUATIONS, SEARCH_WORK // size)


def greedy(problem: PlacementProblem, r: int, sessions: int) -> Placement:
    """One greedy pass: r sessions of cache per server, ``sessions`` needed
    per block, servers by the per-block time they add to a token."""
    model = problem.model
    per_session_block = model.session_cache_bytes(problem.workload)
    reserve = per_session_block * r
    counts = {s.name: block_capacity(s, model, reserve) for s in problem.servers}
    order = sorted(
        problem.servers, key=lambda s: (_per_block_time(problem, s, counts[s.name]), s.name)
    )
    capacity = [0.0] * model.num_blocks
    placement: Placement = {}
    for spec in order:
        blocks = counts[spec.name]
        if blocks == 0:
            placement[spec.name] = (0, 0)
            continue
        start = most_under_served_window(capacity, sessions, blocks)
        placement[spec.name] = (start, start + blocks)
        held = _sessions_held(spec, blocks, model.block_bytes, per_session_block)
        for b in range(start, start + blocks):
            capacity[b] += held
    return {s.name: placement[s.name] for s in problem.servers}


def _candidates(problem: PlacementProblem, sessions: int) -> Iterator[Placement]:
    yield place_cg_bp(problem)
    yield place_petals(problem)
    for r in _design_grid(sessions, largest_covering_r(problem)):
        yield greedy(problem, r, sessions)


def _design_grid(sessions: int, largest: int) -> list[int]:
    """1, 2, 4... up to four times the load's design concurrency (more cache
    than that only costs blocks), that concurrency itself, and the largest R
    that still covers the model (the most cache, for overload)."""
    top = min(largest, 4 * sessions)
    grid = {min(sessions, largest), largest}
    r = 1
    while r < top:
        grid.add(r)
        r *= 2
    return sorted(grid)


def _share_of(problem: PlacementProblem, sessions: int) -> int:
    """Sessions one server must hold if the replicas of a block share them:
    the load over the number of times the model fits in the swarm."""
    model = problem.model
    per_session = model.session_cache_bytes(problem.workload)
    copies = sum(block_capacity(s, model, per_session) for s in problem.servers) / model.num_blocks
    return max(1, math.ceil(sessions / max(1.0, copies)))


def _per_block_time(problem: PlacementProblem, spec: ServerSpec, blocks: int) -> float:
    if blocks == 0:
        return math.inf
    hop = sum(
        share * problem.network.hop_time(client, spec.location)
        for client, share in problem.workload.client_shares()
    )
    return spec.tau_decode + hop / blocks


def _sessions_held(spec: ServerSpec, blocks: int, block_bytes: int, per_session_block: int) -> int:
    """Sessions a server's cache holds on its whole span."""
    return max(0, spec.memory_bytes - blocks * block_bytes) // (blocks * per_session_block)


def _local_search(
    problem: PlacementProblem, placement: Placement, score: float, budget: int, forwarding: bool
) -> Placement:
    """First-improvement hill climbing over one server's span at a time."""
    model = problem.model
    placement = dict(placement)
    improved = True
    while improved and budget > 0:
        improved = False
        for spec in problem.servers:
            for span in _moves(problem, placement, spec):
                if budget == 0:
                    return placement
                trial = {**placement, spec.name: span}
                if not covers(trial.values(), model.num_blocks):
                    continue
                budget -= 1
                trial_score = predict(problem, trial, forwarding=forwarding).token_time
                if trial_score < score * (1 - 1e-9):
                    placement, score, improved = trial, trial_score, True
                    break
    return placement


def _moves(
    problem: PlacementProblem, placement: Placement, spec: ServerSpec
) -> list[tuple[int, int]]:
    """Other spans for one server: same size at its neighbours' boundaries,
    one block more or fewer (at either end), or none."""
    num_blocks = problem.model.num_blocks
    start, end = placement[spec.name]
    blocks = end - start
    most = block_capacity(spec, problem.model, 0)
    edges = {0, num_blocks}
    for name, (s, e) in placement.items():
        if name != spec.name and s < e:
            edges.update((s, e))
    spans: list[tuple[int, int]] = []
    if blocks > 0:
        for edge in sorted(edges):
            for s in (edge, edge - blocks):
                if 0 <= s <= num_blocks - blocks and s != start:
                    spans.append((s, s + blocks))
        if blocks < most:
            spans += [
                (s, e)
                for s, e in ((start - 1, end), (start, end + 1))
                if 0 <= s and e <= num_blocks
            ]
        if blocks > 1:
            spans += [(start + 1, end), (start, end - 1)]
        spans.append((0, 0))
    return list(dict.fromkeys(spans))
