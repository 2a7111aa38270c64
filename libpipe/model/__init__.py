"""model layer: Llama-family blocks, checkpoint loading, KV caches, LoRA adapters.

Torch only; nothing here knows about networking (see DESIGN.md, 'Layers').
"""

from ._checkpoint import load_client_head as load_client_head, load_span as load_span
from ._config import ModelConfig as ModelConfig, RopeScaling as RopeScaling
from ._device import resolve_device as resolve_device, resolve_dtype as resolve_dtype
from ._kv_cache import KVCache as KVCache, KVCachePool as KVCachePool
from ._llama import ClientHead as ClientHead, block_weight_bytes as block_weight_bytes
from ._lora import (
    LoraAdapter as LoraAdapter,
    load_lora_adapter as load_lora_adapter,
    write_random_lora_adapter as write_random_lora_adapter,
)
from ._random_checkpoint import (
    PRESETS as PRESETS,
    write_random_checkpoint as write_random_checkpoint,
)
from ._span import BlockSpan as BlockSpan, InferenceSession as InferenceSession
