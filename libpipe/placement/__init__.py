"""placement layer: the performance model, block placement and routing.

Pure functions over a swarm view (no I/O, no torch, no trio); the client,
the server, the swarm and the simulator all call the same code (see
../shared/DESIGN.md, 'Layers', and docs/placement.md).

- ``route(views, num_blocks, ...)`` -> ``Route``: the cheapest chain of hops.
- ``ServerView``: one server as routing sees it (span, speeds, RTT, cache).
- ``ModelSpec``, ``ServerSpec``, ``Workload``, ``Network``,
  ``PlacementProblem``: a scenario's inputs to the performance model.
"""

from ._model import ModelSpec as ModelSpec
from ._model import Network as Network
from ._model import Placement as Placement
from ._model import PlacementProblem as PlacementProblem
from ._model import ServerSpec as ServerSpec
from ._model import Workload as Workload
from ._model import block_capacity as block_capacity
from ._route import UNSCHEDULED_WAIT_S as UNSCHEDULED_WAIT_S
from ._route import route as route
from ._view import Hop as Hop
from ._view import Route as Route
from ._view import ServerView as ServerView
