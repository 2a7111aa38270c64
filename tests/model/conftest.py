"""Shared checkpoints: generated once per test run, one per preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from libpipe.model import PRESETS, write_random_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_random_checkpoint(root / name, name, seed=7) for name in PRESETS}
