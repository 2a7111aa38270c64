"""Prompt tuning: the helper against a local model, and the example's
training through servers, whose loss must fall."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import trio

from libpipe.client import PromptTuning, SyncClient
from libpipe.errors import ConnectionClosedError, InvalidRequestError
from libpipe.model import load_client_head, load_span

from .conftest import running_swarm

EXAMPLE = Path(__file__).parents[2] / "examples" / "prompt_tuning.py"


def load_example():
    spec = importlib.util.spec_from_file_location("prompt_tuning_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("deep", [False, True])
async def test_example_loss_falls_through_servers(checkpoint, make_config, deep):
    example = load_example()
    async with running_swarm([make_config(checkpoint, b) for b in example.SPANS]) as (servers, _):
        peers = [s.address for s in servers]
        losses = await trio.to_thread.run_sync(
            lambda: example.train(checkpoint, peers, steps=8, deep=deep, lr=0.1, log=lambda _: None)
        )
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.2


def test_untrained_deep_prompts_compute_the_model_with_a_prefix(checkpoint):
    whole = load_span(checkpoint, 0, 8, progress=False)
    head = load_client_head(checkpoint, progress=False)
    gen = torch.Generator().manual_seed(0)
    tuner = PromptTuning(whole, head, prefix=3, deep=True, generator=gen)
    trainable = [n for n, p in tuner.named_parameters() if p.requires_grad]
    assert trainable == ["prompt", "deep_prompts"]
    ids = torch.randint(0, 256, (2, 5), generator=gen)
    x = torch.cat([tuner.prompt.detach().expand(2, -1, -1), head.embed(ids)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tuner(ids), head.logits(whole(x)[:, 3:]), atol=0, rtol=0)
    tuner.loss(ids).backward()
    assert tuner.prompt.grad is not None and tuner.deep_prompts.grad is not None
    assert tuner.deep_prompts.grad.abs().sum() > 0


def test_bad_arguments_are_typed(checkpoint):
    head = load_client_head(checkpoint, progress=False)
    with pytest.raises(InvalidRequestError, match="needs every block"):
        PromptTuning(load_span(checkpoint, 0, 4, progress=False), head, prefix=2)
    whole = load_span(checkpoint, 0, 8, progress=False)
    for prefix in (0, -1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="prefix"):
            PromptTuning(whole, head, prefix=prefix)
    tuner = PromptTuning(whole, head, prefix=2)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(InvalidRequestError, match="labels"):
        tuner.loss(ids, ids[:, :2])
    with pytest.raises(InvalidRequestError, match="token ids"):
        tuner(ids + 1000)
    with pytest.raises(InvalidRequestError, match="T >= 2"):
        tuner.loss(ids[:, :1])


async def test_remote_blocks_of_a_closed_client(checkpoint, make_config):
    async with running_swarm([make_config(checkpoint, (0, 8))]) as (servers, _):

        def use_after_close() -> None:
            with SyncClient(checkpoint, [servers[0].address], insecure=True) as client:
                blocks = client.remote_blocks(start=1, end=3)
                assert (blocks.start, blocks.end) == (1, 3)
            with pytest.raises(ConnectionClosedError, match="closed"):
                blocks(torch.zeros(1, 2, 64))

        await trio.to_thread.run_sync(use_after_close)
