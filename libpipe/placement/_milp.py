"""The exact joint problem, as a MILP for small instances: the yardstick.

Same model as ``evaluate`` (the steady state the other algorithms are
scored by): ``sessions`` open sessions, split over client locations, each
routed over sub-spans of the servers' spans; a session holds s_c bytes of
cache per block it uses on a server, or waits there and pays the waiting
penalty P = UNSCHEDULED_WAIT_S / (l_in + l_max) seconds per token on that
hop. The MILP chooses the spans and the routes together:

- x[j, a, b] in {0, 1}: server j holds exactly [a, b) (at most one span,
  no longer than its weight-only capacity);
- y[c, j, i, k], z[c, j, i, k] >= 0 integer: sessions from client location
  c using server j for blocks [i, k), with cache (y) or waiting (z);
- flow conservation per client location from boundary 0 to L;
- memory: s_m * blocks(j) + s_c * sum (k - i) * y[., j, i, k] <= M_j;
- linking: y + z <= N_c * sum of x[j, a, b] over spans [a, b) holding
  [i, k). The flow is the product of a count (at most N_c) and a binary
  "j holds these blocks"; this is that product's McCormick envelope, which
  is exact here because the binary side is integral.

Objective: total per-token time, sum of (y + z) * (hop_cj + (k - i) *
tau_j) + z * P; divided by the number of sessions it is the mean per-token
time, directly comparable to ``evaluate(...).token_time``.

scipy is an optional dependency (``libpipe[sim]``), imported only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from ..errors import ConfigError
from ._load import design_sessions, split_count
from ._model import Placement, PlacementProblem, block_capacity
from ._route import UNSCHEDULED_WAIT_S

# Variables above this count are refused: HiGHS would not prove optimality
# in reasonable time, and the MILP is a yardstick for small instances.
MAX_VARIABLES = 20_000
DEFAULT_TIME_LIMIT_S = 60.0


@dataclass(frozen=True)
class MilpSolution:
    """``token_time``: the mean per-token time of the best placement found;
    ``optimal``: whether HiGHS proved it optimal; ``bound``: its proven lower
    bound on the mean per-token time."""

    placement: Placement
    token_time: float
    optimal: bool
    bound: float
    sessions: int


def place_milp(problem: PlacementProblem) -> Placement:
    return solve_milp(problem).placement


def solve_milp(
    problem: PlacementProblem,
    sessions: int | None = None,
    *,
    time_limit: float = DEFAULT_TIME_LIMIT_S,
) -> MilpSolution:
    """Solve the joint problem (see the module docstring). Raises
    ``ConfigError`` when scipy is missing, when the instance is too large,
    or when no feasible placement exists (not enough memory for the model)."""
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError as exc:  # pragma: no cover - scipy is in the test extras
        raise ConfigError("the milp algorithm needs scipy: pip install 'libpipe[sim]'") from exc

    model, workload, network = problem.model, problem.workload, problem.network
    n = design_sessions(problem) if sessions is None else sessions
    if n < 1:
        raise ConfigError(f"sessions must be >= 1, got {n}")
    num_blocks = model.num_blocks
    per_session_block = model.session_cache_bytes(workload)
    penalty = UNSCHEDULED_WAIT_S / workload.session_tokens
    demand = split_count(n, workload.client_shares())
    servers = problem.servers
    caps = [block_capacity(s, model, 0) for s in servers]
    # Counted before any is built: a large instance is refused at once, not
    # after millions of index entries (an x per span, a y and a z per span
    # and client location).
    span_count = sum(
        num_blocks - width + 1 for cap in caps for width in range(1, min(cap, num_blocks) + 1)
    )
    size = span_count * (1 + 2 * len(demand))
    if size > MAX_VARIABLES:
        raise ConfigError(
            f"milp: {size} variables for {len(servers)} servers x {num_blocks} blocks x"
            f" {len(demand)} client locations; the yardstick is for small instances"
            f" (at most {MAX_VARIABLES})",
            variables=size,
        )
    spans = [
        [(a, b) for a in range(num_blocks) for b in range(a + 1, min(num_blocks, a + cap) + 1)]
        for cap in caps
    ]

    index: dict[tuple, int] = {}
    for j, span_list in enumerate(spans):
        for a, b in span_list:
            index[("x", j, a, b)] = len(index)
    for c, j in product(range(len(demand)), range(len(servers))):
        for i, k in spans[j]:
            index[("y", c, j, i, k)] = len(index)
            index[("z", c, j, i, k)] = len(index)

    cost = np.zeros(size)
    for key, v in index.items():
        if key[0] == "x":
            continue
        _, c, j, i, k = key
        hop = network.hop_time(demand[c][0], servers[j].location)
        cost[v] = hop + (k - i) * servers[j].tau_decode + (penalty if key[0] == "z" else 0.0)

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def constraint(terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(lower)
        for col, val in terms:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        lower.append(lo)
        upper.append(hi)

    inf = np.inf
    for j, span_list in enumerate(spans):
        # One span per server at most.
        constraint([(index[("x", j, a, b)], 1.0) for a, b in span_list], 0.0, 1.0)
        # Memory: weights plus the cache of the sessions that hold it here.
        terms = [(index[("x", j, a, b)], float((b - a) * model.block_bytes)) for a, b in span_list]
        for c in range(len(demand)):
            terms += [
                (index[("y", c, j, i, k)], float((k - i) * per_session_block)) for i, k in span_list
            ]
        constraint(terms, -inf, float(servers[j].memory_bytes))
        # Linking (McCormick): flow on [i, k) only if a held span contains it.
        for c, (_, count) in enumerate(demand):
            for i, k in span_list:
                terms = [(index[("y", c, j, i, k)], 1.0), (index[("z", c, j, i, k)], 1.0)]
                terms += [
                    (index[("x", j, a, b)], -float(count))
                    for a, b in span_list
                    if a <= i and k <= b
                ]
                constraint(terms, -inf, 0.0)
    # Flow conservation per client location.
    for c, (_, count) in enumerate(demand):
        for t in range(num_blocks + 1):
            terms = []
            for j, span_list in enumerate(spans):
                for i, k in span_list:
                    for kind in ("y", "z"):
                        if k == t:
                            terms.append((index[(kind, c, j, i, k)], 1.0))
                        if i == t:
                            terms.append((index[(kind, c, j, i, k)], -1.0))
            net = -count if t == 0 else (count if t == num_blocks else 0)
            constraint(terms, float(net), float(net))

    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), size)).tocsr()
    upper_bounds = np.full(size, inf)
    for key, v in index.items():
        upper_bounds[v] = 1.0 if key[0] == "x" else float(demand[key[1]][1])
    result = milp(
        cost,
        integrality=np.ones(size),
        bounds=Bounds(np.zeros(size), upper_bounds),
        constraints=LinearConstraint(matrix, np.array(lower), np.array(upper)),
        options={"time_limit": time_limit},
    )
    if result.x is None:
        raise ConfigError(
            f"milp found no feasible placement ({result.message}): the servers cannot hold"
            " the model",
        )
    placement: Placement = {s.name: (0, 0) for s in servers}
    for key, v in index.items():
        if key[0] == "x" and result.x[v] > 0.5:
            placement[servers[key[1]].name] = (key[2], key[3])
    bound = getattr(result, "mip_dual_bound", None)
    if bound is None or not np.isfinite(bound):
        bound = result.fun
    return MilpSolution(
        placement=placement,
        token_time=float(result.fun) / n,
        optimal=result.status == 0,
        bound=float(bound) / n,
        sessions=n,
    )
