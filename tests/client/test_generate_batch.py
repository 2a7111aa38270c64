"""Batch generation: prompts of one length generated together in one
session give, row by row, the greedy tokens of each prompt alone; each row
stops on its own; bad batches are refused before any server is asked."""

from __future__ import annotations

import pytest
import torch

import libpipe
from libpipe.errors import ConfigError, InvalidRequestError

from .conftest import LocalModel

PROMPTS = [[7, 3, 9, 1], [4, 4, 2, 8], [1, 2, 3, 4]]
NEW_TOKENS = 10
NOWHERE = ["127.0.0.1:9"]


async def test_batch_rows_equal_each_prompt_alone(model_dir, chain, local_model: LocalModel):
    expected = [local_model.greedy(p, NEW_TOKENS) for p in PROMPTS]
    # A stop token that ends the first row early (and any other row holding it).
    stop = expected[0][3]
    stopped = [row[: row.index(stop) + 1] if stop in row else row for row in expected]
    async with libpipe.Client(model_dir, chain, insecure=True) as client:
        rows = await client.generate_batch(PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=())
        as_tensor = await client.generate_batch(
            torch.tensor(PROMPTS), max_new_tokens=NEW_TOKENS, stop_tokens=[stop]
        )
        alone = await client.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, stop_tokens=())
    assert rows == expected
    assert as_tensor == stopped and len(as_tensor[0]) < NEW_TOKENS
    assert alone == rows[1]


def test_the_blocking_client_generates_batches(model_dir, chain, local_model: LocalModel):
    with libpipe.SyncClient(model_dir, chain, insecure=True) as client:
        rows = client.generate_batch(PROMPTS[:2], max_new_tokens=4, stop_tokens=())
    assert rows == [local_model.greedy(p, 4) for p in PROMPTS[:2]]


@pytest.mark.parametrize(
    ("prompts", "error", "says"),
    [
        ([[1, 2, 3], [4, 5]], InvalidRequestError, r"same length in tokens, got \[3, 2\]"),
        ([], InvalidRequestError, "at least one prompt"),
        ([1, 2, 3], InvalidRequestError, "token ids must be a sequence"),
        (torch.tensor([1, 2, 3]), InvalidRequestError, r"\[batch, t\] tensor"),
        ([[1, 2], [3, 10**6]], InvalidRequestError, "token ids must be in"),
    ],
)
async def test_bad_batches_are_refused_before_any_server(model_dir, prompts, error, says):
    async with libpipe.Client(model_dir, NOWHERE, insecure=True) as client:
        with pytest.raises(error, match=says):
            await client.generate_batch(prompts, max_new_tokens=4)
        with pytest.raises(ConfigError, match="max_new_tokens"):
            await client.generate_batch([[1, 2]], max_new_tokens=0)
