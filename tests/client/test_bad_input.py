"""Every wrong argument gets a typed error before anything is sent. No
server needed: an unreachable peer leaves the client open with an empty view."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import libpipe
from libpipe.client import RetryPolicy
from libpipe.client._generate import as_token_ids
from libpipe.errors import CheckpointError, ConfigError, InvalidRequestError
from libpipe.model import write_random_checkpoint
from libpipe.net import Security

NOWHERE = ["127.0.0.1:9"]


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint without tokenizer.json."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("bare"), "llama", seed=1, tokenizer=False
    )


@pytest.mark.parametrize(
    "peers, options",
    [
        ([], {"insecure": True}),
        ("127.0.0.1:9", {"insecure": True}),
        (["host-without-port"], {"insecure": True}),
        (NOWHERE, {}),  # neither an identity nor insecure
        (NOWHERE, {"insecure": True, "identity": "/nonexistent"}),
        (NOWHERE, {"insecure": True, "security": Security.insecure()}),
        (NOWHERE, {"insecure": True, "refresh_interval": 0}),
        (NOWHERE, {"insecure": True, "forwarding": "no"}),
        (NOWHERE, {"insecure": True, "server_dtypes": ("int8",)}),
        (NOWHERE, {"insecure": True, "server_dtypes": ()}),
        (NOWHERE, {"insecure": True, "wire_dtype": torch.int8}),
        (NOWHERE, {"insecure": True, "retry": "x"}),
        (NOWHERE, {"insecure": True, "gossip": 3}),
        (NOWHERE, {"security": "insecure"}),
    ],
)
def test_client_arguments(model_dir, peers, options):
    with pytest.raises(ConfigError):
        libpipe.Client(model_dir, peers, **options)


def test_a_directory_without_a_model(tmp_path):
    with pytest.raises(CheckpointError):
        libpipe.Client(tmp_path, NOWHERE, insecure=True)


@pytest.mark.parametrize(
    "options",
    [
        {"max_failures": -1},
        {"max_failures": 1.5},
        {"backoff_base": -1},
        {"backoff_max": float("inf")},
        {"step_timeout": 0},
        {"connect_timeout": float("nan")},
    ],
)
def test_retry_policy(options):
    with pytest.raises(ConfigError):
        RetryPolicy(**options)


@pytest.mark.parametrize(
    "ids",
    [
        [],
        [1, -1],
        [1, 256],
        [1.0],
        [True],
        "text",
        torch.tensor([1.0, 2.0]),
        torch.tensor([True]),
        torch.ones(2, 3, dtype=torch.long),  # batch 2 where 1 is expected
        torch.ones(1, 1, 1, dtype=torch.long),
    ],
)
def test_token_ids(ids):
    with pytest.raises(InvalidRequestError):
        as_token_ids(ids, 256)


async def test_requests_on_an_open_client(model_dir):
    async with libpipe.Client(model_dir, NOWHERE, insecure=True) as client:
        assert client.view.servers == {}
        with pytest.raises(ConfigError):
            await client.__aenter__()  # one lifetime at a time
        with pytest.raises(ConfigError):
            client.inference_session(max_length=10**9)
        with pytest.raises(ConfigError):
            client.inference_session(max_length=8, batch=0)
        with pytest.raises(InvalidRequestError):
            await client.forward(torch.ones(1, 2, 64, dtype=torch.long))
        with pytest.raises(InvalidRequestError):
            await client.forward(torch.ones(2, 64))
        with pytest.raises(InvalidRequestError):
            await client.forward(torch.ones(1, 2, 64), start=0, end=9)
        with pytest.raises(ConfigError):
            await client.generate("", max_new_tokens=1)  # encodes to no tokens
        with pytest.raises(ConfigError):
            await client.generate([1], max_new_tokens=1, top_k=-1)


async def test_text_needs_a_tokenizer(bare_model):
    async with libpipe.Client(bare_model, NOWHERE, insecure=True) as client:
        assert not client.has_tokenizer
        with pytest.raises(ConfigError, match=r"tokenizer\.json"):
            await client.generate("hello", max_new_tokens=1)
        with pytest.raises(ConfigError):
            client.decode([1, 2])


def test_cli_text_prompt_needs_a_tokenizer(bare_model, capsys):
    from libpipe.cli.main import main

    status = main(
        ["generate", "--model", str(bare_model), "--peers", NOWHERE[0], "--insecure",
         "--prompt", "hi", "--max-new-tokens", "2"]
    )  # fmt: skip
    assert status == 2
    assert "tokenizer.json" in capsys.readouterr().err
