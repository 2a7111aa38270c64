"""server layer: a span of blocks served over the RPC layer (proto/RPC.md).

In a test or an embedding program::

    server = BlockServer(ServerConfig(model_dir, blocks=(0, 4)), Security.insecure())
    address = await nursery.start(server.run)
    ...
    await server.drain()

As a real process (tests, benchmarks, the demo): ``ServerProcess.start``.
"""

from ._config import ServerConfig as ServerConfig
from ._config import parse_blocks as parse_blocks
from ._executor import Executor as Executor
from ._executor import Priority as Priority
from ._process import ServerProcess as ServerProcess
from ._server import BlockServer as BlockServer
from ._throughput import Throughput as Throughput
from ._throughput import load_or_measure as load_or_measure
from ._throughput import measure as measure
