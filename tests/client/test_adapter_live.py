"""Generation and bulk forward with a LoRA adapter through real servers
started with ``--adapters``: the tokens are those of the local model with
the adapter merged by PEFT, and routes use only servers that loaded it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import libpipe
from libpipe.client import RetryPolicy
from libpipe.errors import ConfigError, NoRouteError
from libpipe.model import ModelConfig, load_span, write_random_lora_adapter
from libpipe.model._llama import PROJECTION_PATHS

PROMPT = [3, 1, 4, 1, 5, 9]
NEW = 10
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter named ``tuned`` on every projection of every block."""
    return write_random_lora_adapter(
        tmp_path_factory.mktemp("lora") / "tuned",
        ModelConfig.from_file(model_dir),
        rank=4,
        alpha=8.0,
        target_modules=tuple(PROJECTION_PATHS),
        seed=11,
    )


@pytest.fixture(scope="module")
def adapter_swarm(spawn, adapter: Path) -> list[str]:
    """[0:4) and [4:8) with the adapter, and a faster [0:8) without it that
    a route ignoring adapters would take."""
    with_adapter = ["--adapters", str(adapter)]
    servers = spawn(
        [
            ((0, 4), with_adapter),
            ((4, 8), with_adapter),
            ((0, 8), ["--throughput", "2000,40000"]),
        ]
    )
    return [s.address for s in servers]


@pytest.fixture(scope="module")
def merged_greedy(model_dir: Path, adapter: Path) -> list[int]:
    """transformers' greedy tokens with the adapter merged by PEFT."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW
        )
    return out[0, len(PROMPT) :].tolist()


async def test_generation_with_an_adapter_equals_the_merged_model(
    model_dir, adapter_swarm, merged_greedy, local_model
):
    assert merged_greedy != local_model.greedy(PROMPT, NEW)  # the adapter matters
    async with libpipe.Client(model_dir, adapter_swarm, insecure=True) as c:
        got = await c.generate(PROMPT, max_new_tokens=NEW, stop_tokens=(), adapter="tuned")
        assert [(h.start, h.end) for h in c.last_route] == [(0, 4), (4, 8)]
        streamed = [
            t async for t in c.stream(PROMPT, max_new_tokens=3, stop_tokens=(), adapter="tuned")
        ]
        async with c.inference_session(max_length=8, adapter="tuned") as session:
            assert [(h.start, h.end) for h in session.route] == [(0, 4), (4, 8)]
        # Without the adapter, the fast whole-model server serves the base model.
        base = await c.generate(PROMPT, max_new_tokens=NEW, stop_tokens=())
        assert [(h.start, h.end) for h in c.last_route] == [(0, 8)]
    assert got == merged_greedy
    assert streamed == merged_greedy[:3]
    assert base == local_model.greedy(PROMPT, NEW)


def test_the_blocking_client_and_the_cli_take_an_adapter(
    model_dir, adapter_swarm, merged_greedy, capsys
):
    with libpipe.SyncClient(model_dir, adapter_swarm, insecure=True) as c:
        assert (
            c.generate(PROMPT, max_new_tokens=4, stop_tokens=(), adapter="tuned")
            == (merged_greedy[:4])
        )
        assert (
            list(c.stream(PROMPT, max_new_tokens=2, stop_tokens=(), adapter="tuned"))
            == (merged_greedy[:2])
        )
        with c.inference_session(max_length=8, adapter="tuned") as session:
            assert [(h.start, h.end) for h in session.route] == [(0, 4), (4, 8)]
    from libpipe.cli.main import main

    status = main(
        ["generate", "--model", str(model_dir), "--peers", ",".join(adapter_swarm), "--insecure",
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--no-stop",
         "--adapter", "tuned", "--json"]
    )  # fmt: skip
    assert status == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == merged_greedy


async def test_bulk_forward_with_an_adapter(model_dir, adapter_swarm, adapter):
    hidden = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    blocks = load_span(model_dir, 0, 8, progress=False, adapters=[adapter])
    with torch.no_grad():
        tuned, base = blocks(hidden, adapter="tuned"), blocks(hidden)
    async with libpipe.Client(model_dir, adapter_swarm, insecure=True) as c:
        torch.testing.assert_close(await c.forward(hidden, adapter="tuned"), tuned, **TOL)
        torch.testing.assert_close(await c.forward(hidden), base, **TOL)
    assert not torch.allclose(tuned, base, **TOL)


async def test_an_adapter_no_server_has_is_no_route_naming_it(model_dir, adapter_swarm):
    policy = RetryPolicy(max_failures=1, backoff_base=0.01, backoff_max=0.01)
    async with libpipe.Client(model_dir, adapter_swarm, insecure=True, retry=policy) as c:
        with pytest.raises(NoRouteError, match="'missing-adapter'"):
            await c.generate(PROMPT, max_new_tokens=2, adapter="missing-adapter")
        with pytest.raises(NoRouteError, match="'missing-adapter'"):
            await c.forward(torch.zeros(1, 2, 64), adapter="missing-adapter")


async def test_a_bad_adapter_argument_is_refused_before_any_server(model_dir):
    async with libpipe.Client(model_dir, ["127.0.0.1:9"], insecure=True) as c:
        for bad in ("", 3):
            with pytest.raises(ConfigError):
                await c.generate(PROMPT, max_new_tokens=2, adapter=bad)
            with pytest.raises(ConfigError):
                c.inference_session(max_length=8, adapter=bad)
            with pytest.raises(ConfigError):
                await c.forward(torch.zeros(1, 2, 64), adapter=bad)
