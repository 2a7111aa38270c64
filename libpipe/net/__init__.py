"""Authenticated transport and multiplexed RPC on trio (the only layer that
touches sockets). See DESIGN.md, 'Layers'.

Servers: ``serve`` (pass a ``ServeHandle`` to stop accepting and drain).
Clients: ``connect``, ``ConnectionPool``. Tests and benchmarks: ``DelayProxy``
puts latency, a bandwidth cap, dead links or black holes between the two."""

from ._ca import NodeCredentials as NodeCredentials
from ._ca import SwarmCA as SwarmCA
from ._ca import peer_id_from_certificate as peer_id_from_certificate
from ._connection import Connection as Connection
from ._connection import ConnectionConfig as ConnectionConfig
from ._delay_proxy import DelayProxy as DelayProxy
from ._endpoint import ConnectionPool as ConnectionPool
from ._endpoint import HelloInfo as HelloInfo
from ._endpoint import ServeHandle as ServeHandle
from ._endpoint import connect as connect
from ._endpoint import parse_address as parse_address
from ._endpoint import serve as serve
from ._identity import Identity as Identity
from ._identity import peer_id_from_public_key as peer_id_from_public_key
from ._identity import short_peer_id as short_peer_id
from ._identity import verify_signature as verify_signature
from ._rpc import CallContext as CallContext
from ._rpc import Message as Message
from ._rpc import Router as Router
from ._rpc import Stream as Stream
from ._tls import Security as Security
