"""Shared generated checkpoints and adapters for the fine-tuning tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from libpipe.model import ModelConfig, write_random_checkpoint, write_random_lora_adapter


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ft") / "llama", "llama", seed=3)


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ft") / "gqa", "llama-gqa", seed=4)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Path]:
    """Two adapters of the llama checkpoint: attention only, and everything."""
    root = tmp_path_factory.mktemp("adapters")
    config = ModelConfig.from_file(checkpoint)
    return {
        "attn": write_random_lora_adapter(root / "attn", config, rank=4, alpha=8.0, seed=1),
        "all": write_random_lora_adapter(
            root / "all",
            config,
            rank=2,
            alpha=3.0,
            target_modules=(
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
            seed=2,
        ),
    }
