"""A server whose blocks answer NaN (here: a checkpoint copy with one NaN
weight in block 5) is a failed hop: the client bans it and routes around
it, and the tokens are those of the healthy model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import trio
from safetensors.torch import load_file, save_file

import libpipe
from libpipe.client import RetryPolicy
from libpipe.errors import RetriesExhaustedError

from .conftest import start_servers


@pytest.fixture(scope="module")
def broken_block(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("broken-block") / model_dir.name
    shutil.copytree(model_dir, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.5.mlp.down_proj.weight"][0, 0] = math.nan
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.fixture(scope="module")
def broken_server(broken_block: Path, cache_dir: Path):
    # One hop over [3:8) beats the healthy chain's two, so routing tries it first.
    (server,) = start_servers(broken_block, [((3, 8), ())], cache_dir)
    yield server
    server.close()


async def test_a_hop_answering_nan_is_banned_and_routed_around(
    model_dir, chain, broken_server, local_model
):
    prompt = [1, 2, 3]
    async with libpipe.Client(model_dir, [*chain, broken_server.address], insecure=True) as c:
        tokens = await c.generate(prompt, max_new_tokens=6, stop_tokens=())
        assert "non-finite" in (c.view.ban_reason(broken_server.peer_id) or "")
    assert tokens == local_model.greedy(prompt, 6)


async def test_only_a_nan_answering_hop_exhausts_retries(model_dir, chain, broken_server):
    async with libpipe.Client(
        model_dir,
        [chain[0], broken_server.address],
        insecure=True,
        retry=RetryPolicy(max_failures=2),
    ) as c:
        with pytest.raises(RetriesExhaustedError):
            await c.generate([1, 2, 3], max_new_tokens=2, stop_tokens=())


async def test_bulk_forward_never_returns_a_hop_s_nan(model_dir, chain, broken_server):
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    async with libpipe.Client(
        model_dir,
        [chain[0], broken_server.address],
        insecure=True,
        retry=RetryPolicy(max_failures=2),
    ) as c:
        with pytest.raises(RetriesExhaustedError):
            await c.forward(hidden)
        assert "non-finite" in (c.view.ban_reason(broken_server.peer_id) or "")


async def test_remote_blocks_never_return_a_hop_s_nan(model_dir, chain, broken_server):
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(3))
    async with libpipe.Client(
        model_dir,
        [chain[0], broken_server.address],
        insecure=True,
        retry=RetryPolicy(max_failures=2),
    ) as c:
        blocks = c.remote_blocks(start=3, end=8)
        with pytest.raises(RetriesExhaustedError):
            await trio.to_thread.run_sync(blocks, hidden)
        assert "non-finite" in (c.view.ban_reason(broken_server.peer_id) or "")
