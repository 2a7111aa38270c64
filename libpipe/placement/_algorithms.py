"""Every placement algorithm behind one interface, by name.

An ``Algorithm`` pairs a placement function (problem in, {server: span}
out) with its routing policy; the simulator runs each by name and the live
system uses ``libpipe``. Routing is always ``route``: the policies differ
in what a server short of cache costs, WS-RR's estimated wait (CG-BP and
ours) or PETALS' flat allocation delay, and in the data path: ``libpipe``
forwards from server to server, the baselines (as their papers define
them) and ``libpipe-direct`` (ours without forwarding, to compare with the
MILP, which models the client-centric path) have the client call each hop.
"""

from __future__ import annotations

import functools
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
from ._view import Forwarding, Route, ServerView


@dataclass(frozen=True)
class Algorithm:
    """``place(problem)`` -> placement; ``route(...)`` -> a session's route."""

    name: str
    description: str
    placer: Callable[[PlacementProblem], Placement]
    cache_penalty: CachePenalty
    forwards: bool = False

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
        forwarding: Forwarding | None = None,
    ) -> Route:
        """A generation session's route under this algorithm's policy.

        ``forwarding`` says how the servers can forward to each other; an
        algorithm that forwards routes (and costs) with it, the others
        ignore it and route client-centric.
        """
        return route(
            views,
            num_blocks,
            start=start,
            end=end,
            session_tokens=session_tokens,
            batch=batch,
            rng=rng,
            cache_penalty=self.cache_penalty,
            forwarding=forwarding if self.forwards else None,
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
            " by the WS-RR steady state with forwarding, local search; waiting-penalised"
            " routing with server-to-server forwarding",
            functools.partial(place_libpipe, forwarding=True),
            cache_penalty="wait",
            forwards=True,
        ),
        Algorithm(
            "libpipe-direct",
            "ours without forwarding: the client calls each hop (the MILP's model)",
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
