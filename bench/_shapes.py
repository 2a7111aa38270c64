"""The Llama shape the benchmarks share, so their figures compare: a
Llama-style MLP ratio, 64-dimensional heads, GQA with 4 query heads per
key-value head, and a small vocabulary (the head is not what they measure)."""

from __future__ import annotations


def llama_overrides(hidden: int, blocks: int) -> dict[str, int]:
    """``config.json`` overrides for a random checkpoint of this shape."""
    heads = max(1, hidden // 64)
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": 1000,
    }
