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
load implies at the ideal per-token time, plus a Poisson margin.
"""

from __future__ import annotations

from ._load import design_sessions
from ._model import Placement, PlacementProblem, block_capacity
from ._windows import most_under_served_window


def place_cg_bp(problem: PlacementProblem, design_concurrency: int | None = None) -> Placement:
    model = problem.model
    r = design_sessions(problem) if design_concurrency is None else design_concurrency
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
