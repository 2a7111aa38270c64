"""Three real servers, [0:3) [3:5) [5:8): the swarm computes what the local
model computes, through every entry point of the client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

import libpipe
from libpipe.cli.main import main as cli_main
from libpipe.client import RetryPolicy
from libpipe.client._session import RemoteSession
from libpipe.errors import (
    ConfigError,
    ConnectionClosedError,
    InvalidRequestError,
    NoRouteError,
    SessionError,
    TensorOverflowError,
)
from libpipe.model import (
    ModelConfig,
    load_lora_adapter,
    load_span,
    write_random_lora_adapter,
)

from .conftest import NUM_BLOCKS, LocalModel

PROMPT = [11, 22, 33, 44, 55, 66]


def client(model_dir: Path, peers: list[str], **kw) -> libpipe.Client:
    return libpipe.Client(model_dir, peers, insecure=True, **kw)


async def test_greedy_equals_transformers_generate(model_dir, chain):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, min_new_tokens=16
        )
    expected = out[0, len(PROMPT) :].tolist()
    async with client(model_dir, chain) as c:
        got = await c.generate(PROMPT, max_new_tokens=16, stop_tokens=())
        route = [(h.start, h.end) for h in c.last_route]
    assert got == expected
    assert route == [(0, 3), (3, 5), (5, 8)]


async def test_session_step_logits_match_local_model(model_dir, chain, local_model: LocalModel):
    async with client(model_dir, chain) as c:
        async with c.inference_session(max_length=16) as session:
            prefill = await session.step(PROMPT)
            step = await session.step([7])
            assert session.position == len(PROMPT) + 1
    expected = local_model.logits([*PROMPT, 7])
    assert prefill.shape == (1, len(PROMPT), 256)
    torch.testing.assert_close(prefill[0], expected[: len(PROMPT)], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[0, 0], expected[-1], rtol=1e-4, atol=1e-4)


async def test_rollback_recomputes_the_forgotten_positions(model_dir, chain, local_model):
    async with client(model_dir, chain) as c:
        async with c.inference_session(max_length=16) as session:
            await session.step(PROMPT)
            await session.step([99])
            session.rollback(len(PROMPT))
            again = await session.step([7])
    torch.testing.assert_close(
        again[0, 0], local_model.logits([*PROMPT, 7])[-1], rtol=1e-4, atol=1e-4
    )


async def test_bulk_forward_matches_local_blocks(model_dir, chain, local_model):
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    async with client(model_dir, chain) as c:
        whole = await c.forward(hidden)
        middle = await c.forward(hidden, start=2, end=6)
    with torch.no_grad():
        torch.testing.assert_close(whole, local_model.blocks(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(middle, local_model.blocks(hidden, 2, 6), rtol=1e-5, atol=1e-5)


async def test_sampling_is_reproducible_with_a_seed(model_dir, chain):
    options = dict(max_new_tokens=8, temperature=1.5, top_k=50)
    async with client(model_dir, chain) as c:
        first = await c.generate(PROMPT, seed=3, **options)
        streamed = [t async for t in c.stream(PROMPT, seed=3, **options)]
        other = await c.generate(PROMPT, seed=4, **options)
    assert first == streamed
    assert first != other


async def test_text_in_text_out(model_dir, chain):
    async with client(model_dir, chain) as c:
        ids = c.encode("hello")
        assert ids == list(b"hello")  # the byte-level tokenizer of random checkpoints
        new = await c.generate("hello", max_new_tokens=4, stop_tokens=())
        assert new == await c.generate(ids, max_new_tokens=4, stop_tokens=())
        assert isinstance(c.decode(new), str)


async def test_stops_at_a_stop_token(model_dir, chain, local_model):
    expected = local_model.greedy(PROMPT, 6)
    async with client(model_dir, chain) as c:
        got = await c.generate(PROMPT, max_new_tokens=6, stop_tokens={expected[2]})
    assert got == expected[: expected.index(expected[2]) + 1]


async def test_bad_arguments_get_typed_errors(model_dir, chain):
    with pytest.raises(ConfigError):
        client(model_dir, [])
    with pytest.raises(ConfigError):
        client(model_dir, ["no-port"])
    with pytest.raises(ConfigError):
        libpipe.Client(model_dir, chain)  # neither identity nor insecure
    c = client(model_dir, chain)
    with pytest.raises(ConnectionClosedError):
        await c.generate(PROMPT, max_new_tokens=2)
    async with c:
        with pytest.raises(ConfigError):
            await c.generate(PROMPT, max_new_tokens=0)
        with pytest.raises(ConfigError):
            await c.generate(PROMPT, max_new_tokens=2, temperature=-1)
        with pytest.raises(ConfigError):
            await c.generate(PROMPT, max_new_tokens=2, temperature=1.0, top_p=0)
        with pytest.raises(InvalidRequestError):
            await c.generate([], max_new_tokens=2)
        with pytest.raises(InvalidRequestError):
            await c.generate([1, 256], max_new_tokens=2)
        with pytest.raises(InvalidRequestError):
            await c.generate([1.5], max_new_tokens=2)  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError):
            await c.forward(torch.randn(1, 3, 65))
        with pytest.raises(InvalidRequestError):
            await c.forward(torch.randn(1, 3, 64), start=3, end=3)
        with pytest.raises(ConfigError):
            c.inference_session(max_length=0)
        async with c.inference_session(max_length=4) as session:
            with pytest.raises(SessionError):
                await session.step([1, 2, 3, 4, 5])
            with pytest.raises(InvalidRequestError):
                session.rollback(1)
            with pytest.raises(InvalidRequestError):
                await session.step(torch.ones(2, 1, dtype=torch.long))
            with pytest.raises(InvalidRequestError):
                await session.step_hidden(torch.ones(1, 1, 64, dtype=torch.long))
            with pytest.raises(InvalidRequestError):
                await session.step_hidden(torch.ones(1, 1, 65))
        with pytest.raises(SessionError):
            await session.step([1])


async def test_values_the_wire_dtype_cannot_hold_are_refused(model_dir, chain):
    huge = torch.full((1, 2, 64), 1e6)
    async with client(model_dir, chain, wire_dtype=torch.float16) as c:
        with pytest.raises(TensorOverflowError):
            await c.forward(huge)
        async with c.inference_session(max_length=4) as session:
            with pytest.raises(TensorOverflowError):
                await session.step_hidden(huge)
            # Nothing was sent: the session is still usable, and nobody is banned.
            out = await session.step_hidden(torch.randn(1, 2, 64))
        assert out.dtype == torch.float16 and out.shape == (1, 2, 64)
        assert not any(c.view.is_banned(p) for p in c.view.servers)


def test_blocking_client_from_plain_code(model_dir, chain, local_model):
    with libpipe.SyncClient(model_dir, chain, insecure=True) as c:
        assert c.generate(PROMPT, max_new_tokens=5, stop_tokens=()) == local_model.greedy(PROMPT, 5)
        assert list(c.stream(PROMPT, max_new_tokens=3, stop_tokens=())) == local_model.greedy(
            PROMPT, 3
        )
        with c.inference_session(max_length=8) as session:
            logits = session.step(PROMPT)
        torch.testing.assert_close(logits[0], local_model.logits(PROMPT), rtol=1e-4, atol=1e-4)
        with pytest.raises(InvalidRequestError):
            c.generate([999], max_new_tokens=1)
    with pytest.raises(ConnectionClosedError):
        c.generate(PROMPT, max_new_tokens=1)


def test_blocking_client_reports_a_bad_checkpoint(tmp_path, chain):
    with pytest.raises(libpipe.LibpipeError):
        libpipe.SyncClient(tmp_path, chain, insecure=True)


def test_cli_generate_json(model_dir, chain, local_model, capsys):
    status = cli_main(
        ["generate", "--model", str(model_dir), "--peers", ",".join(chain), "--insecure",
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--no-stop",
         "--json"]
    )  # fmt: skip
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == local_model.greedy(PROMPT, 6)
    assert [(h["start"], h["end"]) for h in out["route"]] == [(0, 3), (3, 5), (5, 8)]
    assert out["timings"]["first_token_s"] > 0


def test_cli_generate_streams_text(model_dir, chain, local_model, capsys):
    status = cli_main(
        ["generate", "--model", str(model_dir), "--peers", ",".join(chain), "--insecure",
         "--prompt", "hi", "--max-new-tokens", "3", "--no-stop"]
    )  # fmt: skip
    assert status == 0
    expected = bytes(local_model.greedy(list(b"hi"), 3)).decode("utf-8", errors="replace")
    assert capsys.readouterr().out.strip("\n") == expected


def test_cli_generate_refuses_bad_ids_without_traceback(model_dir, chain):
    result = subprocess.run(
        [sys.executable, "-m", "libpipe.cli.main", "generate", "--model", str(model_dir),
         "--peers", chain[0], "--insecure", "--prompt-ids", "1,x", "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ConfigError" in result.stderr and "Traceback" not in result.stderr


async def test_client_view_knows_every_server(model_dir, chain):
    async with client(model_dir, chain) as c:
        spans = sorted(e.span for e in c.view.servers.values())
        assert spans == [(0, 3), (3, 5), (5, NUM_BLOCKS)]
        # Every server was pinged: none is left at the pessimistic default.
        assert all(p in c.view.rtt for p in c.view.servers)


async def test_concurrent_generations_share_one_client(model_dir, chain, local_model):
    prompts = [PROMPT, [200, 100, 50, 25]]
    results: dict[int, list[int]] = {}
    async with client(model_dir, chain) as c:

        async def one(i: int) -> None:
            results[i] = await c.generate(prompts[i], max_new_tokens=4, stop_tokens=())

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
    assert [results[i] for i in range(len(prompts))] == [local_model.greedy(p, 4) for p in prompts]


async def test_session_with_an_adapter_routes_over_servers_that_loaded_it(
    model_dir, spawn, tmp_path, local_model: LocalModel
):
    """Two servers with the adapter, one faster one without: the adapter's
    session takes the two, and computes what the local blocks compute with
    the adapter."""
    config = ModelConfig.from_file(model_dir)
    lora = write_random_lora_adapter(tmp_path / "lora", config, seed=3)
    with_adapter = ["--adapters", str(lora)]
    bare, first, second = spawn(
        [((0, NUM_BLOCKS), ()), ((0, 4), with_adapter), ((4, NUM_BLOCKS), with_adapter)]
    )
    peers = [bare.address, first.address, second.address]
    blocks = load_span(model_dir, 0, NUM_BLOCKS, progress=False)
    blocks.add_adapter(
        load_lora_adapter(
            lora, config, 0, NUM_BLOCKS, device=torch.device("cpu"), dtype=torch.float32
        )
    )
    hidden = local_model.head.embed(torch.tensor([PROMPT]))
    with torch.no_grad():
        expected = blocks.forward(hidden, adapter="lora")
    async with client(model_dir, peers, wire_dtype=torch.float32) as c:
        _, ctx = c._open()
        async with RemoteSession(ctx, max_length=16, batch=1, adapter="lora") as session:
            out = await session.step(hidden)
            route = [(h.start, h.end) for h in session.route]
    assert route == [(0, 4), (4, NUM_BLOCKS)]
    assert (out - expected).abs().max() < 1e-4


async def test_session_with_an_adapter_nobody_loaded_has_no_route(model_dir, chain):
    async with client(model_dir, chain, retry=RetryPolicy(max_failures=1)) as c:
        _, ctx = c._open()
        with pytest.raises(NoRouteError, match="adapter 'missing'"):
            async with RemoteSession(ctx, max_length=16, batch=1, adapter="missing"):
                pass
        with pytest.raises(ConfigError):
            RemoteSession(ctx, max_length=16, batch=1, adapter="")
