"""The block size a server sizes its span by (``block_weight_bytes``, a formula
over the config) is what a loaded block really holds, for every preset:
biases included (qwen2), GQA or not."""

from __future__ import annotations

import pytest
import torch

from libpipe.model import ModelConfig, load_span, write_random_checkpoint
from libpipe.server._rebalance import block_weight_bytes


@pytest.mark.parametrize("preset", ["llama", "llama-gqa", "llama3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_weight_bytes_equal_a_loaded_blocks_parameters(tmp_path, preset, dtype):
    model_dir = write_random_checkpoint(tmp_path / preset, preset, seed=3)
    span = load_span(model_dir, 0, 2, dtype=dtype, progress=False)
    loaded = sum(p.numel() * p.element_size() for p in span.parameters())
    expected = 2 * block_weight_bytes(ModelConfig.from_file(model_dir), dtype.itemsize)
    assert loaded == expected
