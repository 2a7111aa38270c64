"""Gossip membership and signed server records (SWIM, shaped like memberlist).

A server embeds one ``GossipNode`` on its RPC router and connection pool::

    transport = RpcTransport(router, pool, "203.0.113.7:31337")
    node = GossipNode(identity, transport, model_id=..., span=(0, 8))
    await nursery.start(node.run, ["198.51.100.2:31337"])  # any one peer
    node.update_local_record(state=RecordState.ONLINE, throughput_decode=...)

A server without a fixed span runs a ``Rebalancer`` beside the node: it
chooses the span to start with and moves it when the swarm clearly gains.
A client asks any peer for ``swarm.view`` and keeps ``verified_records(...)``.
``survey`` is the same view for people (``libpipe swarm``, the monitor).
Tests and benchmarks run hundreds of nodes over ``MemoryNetwork`` in virtual
time. ``_node.py`` holds the theory of operation.
"""

from ._broadcast import BroadcastQueue as BroadcastQueue
from ._config import GossipConfig as GossipConfig
from ._gossip import gossip_round as gossip_round
from ._memory import MemoryNetwork as MemoryNetwork
from ._memory import MemoryTransport as MemoryTransport
from ._node import GossipNode as GossipNode
from ._node import GossipStats as GossipStats
from ._probe import ProbeOrder as ProbeOrder
from ._probe import ProbeResult as ProbeResult
from ._probe import probe_round as probe_round
from ._pushpull import push_pull_round as push_pull_round
from ._rebalance import LocalServer as LocalServer
from ._rebalance import MoveCallback as MoveCallback
from ._rebalance import RebalanceConfig as RebalanceConfig
from ._rebalance import Rebalancer as Rebalancer
from ._rebalance import initial_span as initial_span
from ._rebalance import server_views as server_views
from ._record import RecordState as RecordState
from ._record import ServerRecord as ServerRecord
from ._record import SignedRecord as SignedRecord
from ._record import Signer as Signer
from ._record import decode_signed as decode_signed
from ._record import sign_record as sign_record
from ._record import verified_records as verified_records
from ._record import verify_signed as verify_signed
from ._rpc_transport import RpcTransport as RpcTransport
from ._state import Member as Member
from ._state import MemberState as MemberState
from ._state import supersedes as supersedes
from ._survey import ModelCoverage as ModelCoverage
from ._survey import ServerStatus as ServerStatus
from ._survey import SwarmSnapshot as SwarmSnapshot
from ._survey import coverage as coverage
from ._survey import fetch_view as fetch_view
from ._survey import survey as survey
from ._suspicion import Suspicion as Suspicion
from ._transport import Handler as Handler
from ._transport import Transport as Transport
