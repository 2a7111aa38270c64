"""Small random checkpoints in the Hugging Face layout, for tests and the demo.

No weights can be downloaded where libpipe is developed and demonstrated,
so we write our own: ``config.json`` plus ``model.safetensors`` (or shards
and ``model.safetensors.index.json``) with the tensor names transformers
uses, so that both transformers and ``load_span`` read the very same files.
This module must not need transformers: the demo runs without it.

With a vocabulary of at least 256 a byte-level ``tokenizer.json`` comes
along (token id = UTF-8 byte value), so the demo can take and print text.

Weights are scaled so activations stay O(1) through every block (std
1/sqrt(fan_in), norms near 1): with transformers' tiny default init the
blocks would be near-identity maps and comparisons would prove little.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..errors import ConfigError
from ._config import ModelConfig
from ._llama import block_tensor_shapes, head_tensor_shapes

_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Multi-head attention, separate LM head.
    "llama": dict(_BASE),
    # GQA (4 query heads per kv head), explicit head_dim unequal to
    # hidden/heads, tied embeddings.
    "llama-gqa": _BASE
    | {
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
    },
    # Llama 3.1-style rope scaling, with a tiny original context so that all
    # three frequency bands (kept, interpolated, slowed) occur at head_dim 16.
    "llama3": _BASE
    | {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    # Qwen2: biases on q/k/v, GQA, a sliding window that is switched off.
    "qwen2": {k: v for k, v in _BASE.items() if k not in ("attention_bias", "mlp_bias")}
    | {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 8,
    },
}


def write_random_checkpoint(
    path: str | Path,
    config: str | dict[str, Any] = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    overrides: dict[str, Any] | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint to directory ``path`` and return it.

    ``config`` is a preset name (``PRESETS``) or a config.json dict;
    ``overrides`` are merged into it. With ``max_shard_bytes`` the tensors
    are split into shards of at most that size (one tensor per shard if a
    tensor alone is bigger) with an index, as transformers shards."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown preset {config!r} (known: {', '.join(PRESETS)})")
        raw = copy.deepcopy(PRESETS[config])
        name = f"libpipe-random-{config}-seed{seed}"
    else:
        raw = copy.deepcopy(config)
        name = f"libpipe-random-seed{seed}"
    raw |= overrides or {}
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    raw["_name_or_path"] = name
    parsed = ModelConfig.from_dict(raw, name=name)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _random_tensors(parsed, seed, dtype)
    (path / "config.json").write_text(
        json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    if max_shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        _write_shards(path, tensors, max_shard_bytes)
    if tokenizer and parsed.vocab_size >= 256:
        write_byte_tokenizer(path / "tokenizer.json")
    return path


def write_byte_tokenizer(path: str | Path) -> None:
    """A tokenizer whose token ids are the UTF-8 bytes of the text.

    Byte-level BPE with no merges: every byte is one token, the id is the
    byte's value, and decoding any id sequence gives back the bytes (ids
    >= 256 are unknown to it). Uses GPT-2's byte -> printable character
    table, which the byte-level pre-tokenizer and decoder expect."""
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in _byte_chars().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def _byte_chars() -> dict[int, str]:
    # Printable Latin-1 bytes stand for themselves; the others are shifted
    # past 255 in order, so no byte maps to whitespace or a control char.
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    }
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


def _random_tensors(config: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(head_tensor_shapes(config))
    block_shapes = block_tensor_shapes(config)
    for i in range(config.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in block_shapes.items()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:  # [out, in] projection
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        tensors[name] = t.to(dtype).contiguous()
    return tensors


def _write_shards(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file_name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )
