"""Authenticated transport and multiplexed RPC on trio (the only layer that
touches sockets). See DESIGN.md, 'Layers'.

Servers: ``serve`` (pass a ``ServeHandle`` to stop accepting and drain).
Clients: ``connect``, ``ConnectionPool``. Servers that answer from memory
register ``Router.unary_inline`` methods (no task hand-off per call).

``DelayProxy`` is not API: a tool for tests and benchmarks (latency, a
bandwidth cap, dead links or black holes between the two), exported here so
that they need not import a private module."""

from ._ca import (
    NodeCredentials as NodeCredentials,
    SwarmCA as SwarmCA,
    peer_id_from_certificate as peer_id_from_certificate,
)
from ._connection import Connection as Connection, ConnectionConfig as ConnectionConfig
from ._delay_proxy import DelayProxy as DelayProxy
from ._endpoint import (
    ConnectionPool as ConnectionPool,
    HelloInfo as HelloInfo,
    ServeHandle as ServeHandle,
    connect as connect,
    parse_address as parse_address,
    serve as serve,
)
from ._identity import (
    Identity as Identity,
    peer_id_from_public_key as peer_id_from_public_key,
    short_peer_id as short_peer_id,
    verify_signature as verify_signature,
)
from ._rpc import CallContext as CallContext, Message as Message, Router as Router, Stream as Stream
from ._tls import Security as Security
