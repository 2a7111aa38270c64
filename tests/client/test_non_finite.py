"""A head that turns hidden states into NaN logits (here: a checkpoint
copy whose LM head holds a NaN) makes generation fail with
``NonFiniteError``, greedy or sampled, and bans no server: the servers did
nothing wrong."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import libpipe
from libpipe.errors import NonFiniteError


@pytest.fixture(scope="module")
def broken_head(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model (same model_id), its LM head's first row NaN."""
    copy = tmp_path_factory.mktemp("broken-head") / model_dir.name
    shutil.copytree(model_dir, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = math.nan
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.7, "seed": 3}], ids=["greedy", "sampled"]
)
async def test_nan_logits_from_the_head_are_non_finite_error(broken_head, chain, sampling):
    async with libpipe.Client(broken_head, chain, insecure=True) as c:
        with pytest.raises(NonFiniteError, match="1 NaN"):
            await c.generate([1, 2, 3], max_new_tokens=4, **sampling)
        assert not any(c.view.is_banned(peer) for peer in c.view.servers)
