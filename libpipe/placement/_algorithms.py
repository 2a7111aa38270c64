"""Every placement algorithm behind one interface, by name.

An ``Algorithm`` pairs a placement function (problem in, {server: span}
out) with its routing policy; the simulator runs each by name and the live
system uses ``libpipe``. Routing is always ``route``: the policies differ
only in what a server short of cache costs, WS-RR's estimated wait (CG-BP
and ours) or PETALS' flat allocation delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ._blocks import check_covered
from ._cgbp import place_cg_bp
from ._libpipe import place_libpipe
from ._milp import place_milp
from ._model import Placement, PlacementProblem
from ._petals import place_petals
from ._route import CachePenalty, route
from ._view import Route, ServerView


@dataclass(frozen=True)
class Algorithm:
    """``place(problem)`` -> placement; ``route(...)`` -> a session's route."""

    name: str
    description: str
    placer: Callable[[PlacementProblem], Placement]
    cache_penalty: CachePenalty

    def place(self, problem: PlacementProblem) -> Placement:
        """The placement, in the problem's server order; raises
        ``NoRouteError`` naming the blocks no server could take."""
        placement = self.placer(problem)
        ordered = {s.name: placement.get(s.name, (0, 0)) for s in problem.servers}
        check_covered(
            ordered.values(),
            0,
            problem.model.num_blocks,
            f"{self.name}: the servers' memory leaves uncovered",
        )
        return ordered

    def route(
        self,
        views: Sequence[ServerView],
        num_blocks: int,
        *,
        session_tokens: int,
        batch: int = 1,
        start: int = 0,
        end: int | None = None,
        rng: random.Random | None = None,
    ) -> Route:
        """A generation session's route under this algorithm's policy."""
        return route(
            views,
            num_blocks,
            start=start,
            end=end,
            session_tokens=session_tokens,
            batch=batch,
            rng=rng,
            cache_penalty=self.cache_penalty,
        )


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "petals",
            "PETALS: join order, weakest window, fixed cache reservation; min-latency"
            " routing with its flat penalty for servers short of cache",
            place_petals,
            cache_penalty="petals",
        ),
        Algorithm(
            "cg-bp",
            "CG-BP + WS-RR (Sun et al.): R sessions of cache per server, fastest first,"
            " most under-served window; waiting-penalised routing",
            place_cg_bp,
            cache_penalty="wait",
        ),
        Algorithm(
            "libpipe",
            "ours: greedy candidates over design concurrencies, RTT-aware order, scored"
            " by the WS-RR steady state, local search; waiting-penalised routing",
            place_libpipe,
            cache_penalty="wait",
        ),
        Algorithm(
            "milp",
            "exact joint placement and routing (HiGHS via scipy), small instances only",
            place_milp,
            cache_penalty="wait",
        ),
    )
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ConfigError(f"unknown placement algorithm {name!r} (known: {known})") from None
