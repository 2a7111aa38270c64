"""placement layer: the performance model, block placement and routing.

Pure functions over a swarm view (no I/O, no torch, no trio); the client,
the server, the swarm and the simulator all call the same code (see
../shared/DESIGN.md, 'Layers', and docs/placement.md).

- ``route(views, num_blocks, ...)`` -> ``Route``: the cheapest chain of hops.
- ``ServerView``: one server as routing sees it (span, speeds, RTT, cache).
- ``ModelSpec``, ``ServerSpec``, ``Workload``, ``Network``,
  ``PlacementProblem``: a scenario's inputs to the performance model.
- ``get_algorithm(name)`` / ``ALGORITHMS``: petals, cg-bp, libpipe, milp,
  each an ``Algorithm`` with ``place(problem)`` and ``route(...)``.
- ``predict`` (libpipe's objective, waiting included), ``evaluate`` (the
  MILP's objective), ``solve_milp`` (the yardstick with its bound).
- ``span_blocks``, ``choose_span``, ``should_move``: a live server's span.
"""

from ._algorithms import ALGORITHMS as ALGORITHMS
from ._algorithms import Algorithm as Algorithm
from ._algorithms import get_algorithm as get_algorithm
from ._cgbp import place_cg_bp as place_cg_bp
from ._evaluate import Evaluation as Evaluation
from ._evaluate import evaluate as evaluate
from ._libpipe import place_libpipe as place_libpipe
from ._load import design_sessions as design_sessions
from ._milp import MilpSolution as MilpSolution
from ._milp import solve_milp as solve_milp
from ._model import ModelSpec as ModelSpec
from ._model import Network as Network
from ._model import Placement as Placement
from ._model import PlacementProblem as PlacementProblem
from ._model import ServerSpec as ServerSpec
from ._model import Workload as Workload
from ._model import block_capacity as block_capacity
from ._petals import place_petals as place_petals
from ._predict import Prediction as Prediction
from ._predict import predict as predict
from ._route import UNSCHEDULED_WAIT_S as UNSCHEDULED_WAIT_S
from ._route import route as route
from ._route import uncovered_ranges as uncovered_ranges
from ._span import DEFAULT_MOVE_MARGIN as DEFAULT_MOVE_MARGIN
from ._span import SwarmScore as SwarmScore
from ._span import choose_span as choose_span
from ._span import should_move as should_move
from ._span import span_blocks as span_blocks
from ._span import swarm_score as swarm_score
from ._view import Hop as Hop
from ._view import Route as Route
from ._view import ServerView as ServerView
