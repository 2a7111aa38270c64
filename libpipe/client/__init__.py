"""client layer: discovery, latency probing, routing, fault-tolerant
sessions, generation and bulk forward (see ../shared/DESIGN.md, 'Layers').

Applications use ``libpipe.Client`` (trio) or ``libpipe.SyncClient`` (plain
synchronous code, notebooks). Fine-tuning through the frozen remote model:
``client.remote_blocks()`` (a torch module), ``PromptTuning``."""

from ._blocking import SyncClient as SyncClient, SyncInferenceSession as SyncInferenceSession
from ._bulk import call_hop as call_hop, forward_span as forward_span
from ._client import Client as Client
from ._failover import RetryPolicy as RetryPolicy
from ._generate import InferenceSession as InferenceSession
from ._prompt_tuning import PromptTuning as PromptTuning
from ._remote_blocks import RemoteBlocks as RemoteBlocks
from ._routing import PlannedHop as PlannedHop
from ._sampling import SamplingConfig as SamplingConfig
from ._tokenizer import TextStream as TextStream
from ._train_chain import TrainChain as TrainChain
from ._view import ServerEntry as ServerEntry, SwarmView as SwarmView
