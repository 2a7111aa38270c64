"""Small scenarios whose numbers can be checked by hand."""

from __future__ import annotations

import copy

import pytest

# One block = 1 GB; a token of one sequence costs 1000 bytes of cache per
# block (kv_dim 250, fp16: 2 * 250 * 2); a session sizes its cache for
# l_in + l_max = 10 tokens, so 10_000 bytes per block it uses: the fast
# server holds all 4 blocks and the cache of exactly one session on them.
TINY = {
    "name": "tiny",
    "description": "two clusters, hand-checkable numbers",
    "model": {"name": "toy", "num_blocks": 4, "hidden_size": 250, "block_gb": 1.0},
    "server_classes": {
        "fast": {
            "decode_ms_per_block": 10.0,
            "prefill_ms_per_block": {"per_prompt_token": 1.0, "fixed": 5.0},
            "memory_gb": 4.00004,
        },
        "slow": {
            "decode_ms_per_block": 40.0,
            "prefill_ms_per_block": {"per_prompt_token": 2.0, "fixed": 10.0},
            "memory_gb": 8.0,
            "max_blocks": 2,
        },
    },
    "network": {
        "per_token_overhead_ms": 20.0,
        "prefill_overhead_ms": 30.0,
        "prefill_ms_per_prompt_token": 1.0,
        "session_open_ms": 70.0,
    },
    "workload": {"arrival_rate": 0.5, "prompt_tokens": 4, "max_new_tokens": 6, "duration_s": 60},
    "topology": {"kind": "clusters", "intra_rtt_ms": 5.0, "inter_rtt_ms": 100.0},
    "servers": [
        {"id": "fast", "class": "fast", "node": "dc"},
        {"id": "slow", "class": "slow", "node": "dc", "count": 2},
    ],
    "clients": [{"node": "home"}],
}


@pytest.fixture
def tiny() -> dict:
    """A fresh copy of TINY to modify."""
    return copy.deepcopy(TINY)
