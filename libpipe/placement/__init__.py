"""placement layer: the performance model, block placement and routing.

Pure functions over a swarm view (no I/O, no torch, no trio); the client,
the server, the swarm and the simulator all call the same code (see
../shared/DESIGN.md, 'Layers', and docs/placement.md).

- ``route(views, num_blocks, ...)`` -> ``Route``: the cheapest chain of hops.
- ``ServerView``: one server as routing sees it (span, speeds, RTT, cache).
- ``Forwarding``: route costed as servers forwarding to each other
  (``route(..., forwarding=...)``); None keeps the client-centric cost.
- ``ModelSpec``, ``ServerSpec``, ``Workload``, ``Network``,
  ``PlacementProblem``: a scenario's inputs to the performance model.
- ``get_algorithm(name)`` / ``ALGORITHMS``: petals, cg-bp, libpipe (with
  forwarding), libpipe-direct (without), milp, each an ``Algorithm`` with
  ``place(problem)`` and ``route(...)``.
- ``predict`` (libpipe's objective, waiting included), ``evaluate`` (the
  MILP's objective), ``solve_milp`` (the yardstick with its bound).
- ``span_blocks``, ``choose_span``, ``should_move``: a live server's span.
"""

from ._algorithms import (
    ALGORITHMS as ALGORITHMS,
    Algorithm as Algorithm,
    get_algorithm as get_algorithm,
)
from ._blocks import uncovered_ranges as uncovered_ranges
from ._cgbp import place_cg_bp as place_cg_bp
from ._evaluate import Evaluation as Evaluation, evaluate as evaluate
from ._libpipe import place_libpipe as place_libpipe
from ._load import design_sessions as design_sessions
from ._milp import MilpSolution as MilpSolution, solve_milp as solve_milp
from ._model import (
    ModelSpec as ModelSpec,
    Network as Network,
    Placement as Placement,
    PlacementProblem as PlacementProblem,
    ServerSpec as ServerSpec,
    Workload as Workload,
    block_capacity as block_capacity,
)
from ._petals import place_petals as place_petals
from ._predict import Prediction as Prediction, predict as predict
from ._route import UNSCHEDULED_WAIT_S as UNSCHEDULED_WAIT_S, route as route
from ._span import (
    DEFAULT_MOVE_MARGIN as DEFAULT_MOVE_MARGIN,
    SwarmScore as SwarmScore,
    choose_span as choose_span,
    should_move as should_move,
    span_blocks as span_blocks,
    swarm_score as swarm_score,
)
from ._view import (
    Forwarding as Forwarding,
    Hop as Hop,
    Route as Route,
    ServerView as ServerView,
)
