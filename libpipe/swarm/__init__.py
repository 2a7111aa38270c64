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
from ._memory import MemoryNetwork as MemoryNetwork, MemoryTransport as MemoryTransport
from ._node import GossipNode as GossipNode, GossipStats as GossipStats
from ._probe import ProbeOrder as ProbeOrder, ProbeResult as ProbeResult, probe_round as probe_round
from ._pushpull import push_pull_round as push_pull_round
from ._rebalance import (
    LocalServer as LocalServer,
    MoveCallback as MoveCallback,
    RebalanceConfig as RebalanceConfig,
    Rebalancer as Rebalancer,
    initial_span as initial_span,
    server_views as server_views,
)
from ._record import (
    MAX_BLOCKS as MAX_BLOCKS,
    PEER_RTT_PREFIX as PEER_RTT_PREFIX,
    RecordState as RecordState,
    ServerRecord as ServerRecord,
    SignedRecord as SignedRecord,
    Signer as Signer,
    check_model_size as check_model_size,
    decode_signed as decode_signed,
    peer_rtt as peer_rtt,
    sign_record as sign_record,
    verified_records as verified_records,
    verify_signed as verify_signed,
)
from ._rpc_transport import RpcTransport as RpcTransport
from ._state import Member as Member, MemberState as MemberState, supersedes as supersedes
from ._survey import (
    ModelCoverage as ModelCoverage,
    ServerStatus as ServerStatus,
    SwarmSnapshot as SwarmSnapshot,
    block_ranges as block_ranges,
    coverage as coverage,
    fetch_view as fetch_view,
    format_blocks as format_blocks,
    survey as survey,
)
from ._suspicion import Suspicion as Suspicion
from ._transport import Handler as Handler, Transport as Transport
