"""CG-BP, the conservative greedy block placement of Sun et al. (arXiv 2512.21884).

Every server provisions cache for R concurrent sessions on each block it
holds, so its block count is m_j = min(floor(M_j / (s_m + s_c * R)), L)
(and its class cap). Servers go fastest first (smallest tau_decode) and each
takes the window that is most under-served: the largest shortfall against R
sessions per block, counting R for every server already holding a block.
"Conservative" because a server reserves cache for all R sessions although
replicas share them.

R, the design concurrency, is the load the placement is built for. Unless
given, it is ``design_sessions(problem)``: the open sessions the offered
load implies at the ideal per-token time, plus a Poisson margin, capped at
the largest R for which the servers still cover the model (beyond it the
formula leaves blocks without any server, and no load can be served).
"""

from __future__ import annotations

from ._blocks import covers
from ._load import design_sessions
from ._model import Placement, PlacementProblem, block_capacity
from ._windows import most_under_served_window


def place_cg_bp(problem: PlacementProblem, design_concurrency: int | None = None) -> Placement:
    if design_concurrency is not None:
        return _greedy(problem, design_concurrency)
    r = design_sessions(problem)
    placement = _greedy(problem, r)
    if covers(placement.values(), problem.model.num_blocks):
        return placement
    return _greedy(problem, largest_covering_r(problem, below=r))


def largest_covering_r(problem: PlacementProblem, below: int | None = None) -> int:
    """The largest R (under ``below``, if given) whose placement still covers
    the model; at least 1.

    Coverage is monotone in R (more reserved cache, fewer blocks), so a
    binary search over R finds it.
    """
    lo = 1
    if below is None:
        hi = 2
        while covers(_greedy(problem, hi).values(), problem.model.num_blocks) and hi < 2**30:
            hi *= 2
    else:
        hi = below
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (
            (mid, hi)
            if covers(_greedy(problem, mid).values(), problem.model.num_blocks)
            else (lo, mid)
        )
    return lo


def _greedy(problem: PlacementProblem, r: int) -> Placement:
    model = problem.model
    reserve = model.session_cache_bytes(problem.workload) * r
    capacity = [0.0] * model.num_blocks
    placement: Placement = {}
    for spec in sorted(problem.servers, key=lambda s: (s.tau_decode, s.name)):
        blocks = block_capacity(spec, model, reserve)
        if blocks == 0:
            placement[spec.name] = (0, 0)
            continue
        start = most_under_served_window(capacity, r, blocks)
        placement[spec.name] = (start, start + blocks)
        for b in range(start, start + blocks):
            capacity[b] += r
    return placement
