"""The live monitor page: the swarm's coverage map, servers and recent events.

``libpipe monitor --peers ...`` (or ``libpipe-server --monitor PORT``) runs
a ``Monitor``: it polls ``libpipe.swarm.survey`` and serves, on 127.0.0.1,
a page that redraws from ``/api/swarm``. Layer: above swarm and net, below
cli; nothing imports it but the command line.
"""

from ._events import SwarmEvent as SwarmEvent, diff as diff
from ._http import bound_address as bound_address, open_http_listeners as open_http_listeners
from ._monitor import Monitor as Monitor
