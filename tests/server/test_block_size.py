"""What a server sizes its span by: the block size (``block_weight_bytes``, the
sum over ``block_tensor_shapes``, the shapes the loader checks) is what a loaded block really holds, for every
preset, biases included (qwen2), GQA or not; and a CPU host's budget is its
available memory, page cache included."""

from __future__ import annotations

import os

import pytest
import torch

from libpipe.model import ModelConfig, block_weight_bytes, load_span, write_random_checkpoint
from libpipe.server import _rebalance as rebalance


@pytest.mark.parametrize("preset", ["llama", "llama-gqa", "llama3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_weight_bytes_equal_a_loaded_blocks_parameters(tmp_path, preset, dtype):
    model_dir = write_random_checkpoint(tmp_path / preset, preset, seed=3)
    span = load_span(model_dir, 0, 2, dtype=dtype, progress=False)
    loaded = sum(p.numel() * p.element_size() for p in span.parameters())
    expected = 2 * block_weight_bytes(ModelConfig.from_file(model_dir), dtype.itemsize)
    assert loaded == expected


def test_a_cpu_server_budgets_from_available_memory_not_free_pages(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemFree: 1000 kB\nMemAvailable: 8000000 kB\n")
    monkeypatch.setattr(rebalance, "MEMINFO", str(meminfo))
    assert rebalance.available_host_memory() == 8000000 * 1024
    assert rebalance.free_memory(torch.device("cpu")) == int(
        8000000 * 1024 * rebalance.CPU_MEMORY_SHARE
    )


def test_without_meminfo_the_free_pages_are_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(rebalance, "MEMINFO", str(tmp_path / "absent"))
    assert (
        0
        < rebalance.available_host_memory()
        <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    )
