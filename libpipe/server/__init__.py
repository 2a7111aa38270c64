"""server layer: a span of blocks served over the RPC layer (proto/RPC.md).

In a test or an embedding program::

    server = BlockServer(ServerConfig(model_dir, blocks=(0, 4)), Security.insecure())
    address = await nursery.start(server.run)
    ...
    await server.drain()

As a real process (tests, benchmarks, the demo): ``ServerProcess.start``.

Modules: ``_config`` (ServerConfig, from flags), ``_serving`` (the state all
handlers share), ``_handlers`` (the unary RPCs: validation and
translation), ``_inference`` (the inference stream), ``_executor`` (the device's priority queue and
continuous batching), ``_compute`` (bulk forward/backward, host/device
moves), ``_sessions`` (open sessions, drain), ``_throughput`` (measured,
cached), ``_gossip`` (the node and the signed record), ``_rebalance``
(choosing and moving the span), ``_server`` (BlockServer, wiring it all),
``_process`` (the launcher).
"""

from ._config import ServerConfig as ServerConfig, parse_blocks as parse_blocks
from ._executor import Executor as Executor, Priority as Priority
from ._process import ServerProcess as ServerProcess
from ._server import BlockServer as BlockServer
from ._throughput import (
    Throughput as Throughput,
    load_or_measure as load_or_measure,
    measure as measure,
)
