"""client layer: discovery, latency probing, routing, fault-tolerant
sessions, generation and bulk forward (see ../shared/DESIGN.md, 'Layers').

Applications use ``libpipe.Client`` (trio) or ``libpipe.SyncClient`` (plain
synchronous code, notebooks)."""

from ._blocking import SyncClient as SyncClient, SyncInferenceSession as SyncInferenceSession
from ._bulk import call_hop as call_hop, forward_span as forward_span
from ._client import Client as Client
from ._failover import RetryPolicy as RetryPolicy
from ._generate import InferenceSession as InferenceSession
from ._routing import PlannedHop as PlannedHop
from ._sampling import SamplingConfig as SamplingConfig
from ._view import ServerEntry as ServerEntry, SwarmView as SwarmView
