"""PETALS' placement rule, the baseline (PETALS, arXiv 2209.01188 / 2312.08361).

Servers arrive in join order. Each takes as many blocks as fit in its memory
once every hosted block has its fixed cache reservation (2 * hidden * 4096
tokens * 2 bytes, whatever the workload), and puts them on the window whose
per-block throughput is weakest (``weakest_window``). A block's throughput
is the sum over its servers of their per-block decode rate 1 / tau_decode.
Routing is PETALS' min-latency Dijkstra (``route`` with
``cache_penalty="petals"``): a server whose announced free cache cannot
hold the session on its whole span costs a flat 10 s more, whatever it
would really take to free it.
"""

from __future__ import annotations

from ._model import Placement, PlacementProblem, block_capacity
from ._windows import weakest_window

# A server that reports zero decode time still counts as finite throughput.
_MIN_TAU = 1e-9


def place_petals(problem: PlacementProblem) -> Placement:
    model = problem.model
    reserve = model.petals_cache_reservation()
    per_block = [0.0] * model.num_blocks
    placement: Placement = {}
    for spec in problem.servers:
        blocks = block_capacity(spec, model, reserve)
        if blocks == 0:
            placement[spec.name] = (0, 0)
            continue
        start = weakest_window(per_block, blocks)
        placement[spec.name] = (start, start + blocks)
        rate = 1.0 / max(spec.tau_decode, _MIN_TAU)
        for b in range(start, start + blocks):
            per_block[b] += rate
    return placement
