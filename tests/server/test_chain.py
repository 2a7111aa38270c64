"""A chain of in-process servers [0:3) [3:5) [5:8) computes what the whole
model computes locally: hidden states and logits, for forward and for a
32-step decode session."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import torch

from libpipe.model import load_client_head, load_span
from libpipe.net import ConnectionPool

from .conftest import running_servers

CHAIN = [(0, 3), (3, 5), (5, 8)]
FP32 = {"rtol": 1e-5, "atol": 1e-5}


async def chain_forward(pool: ConnectionPool, servers, hidden: torch.Tensor) -> torch.Tensor:
    for server, (start, end) in zip(servers, CHAIN, strict=True):
        conn = await pool.get(server.address)
        reply = await conn.call("forward", {"start": start, "end": end}, (hidden,))
        hidden = reply.tensors[0]
    return hidden


@pytest.mark.parametrize("preset", ["llama-gqa", "llama3"])
async def test_chain_forward_equals_local_model(checkpoints, make_config, preset):
    model_dir = checkpoints[preset]
    head = load_client_head(model_dir, progress=False)
    whole = load_span(model_dir, 0, 8, progress=False)
    ids = torch.randint(
        0, head.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    hidden = head.embed(ids)
    configs = [make_config(model_dir, blocks) for blocks in CHAIN]
    async with running_servers(configs) as (servers, pool):
        out = await chain_forward(pool, servers, hidden)
    with torch.no_grad():
        expected = whole(hidden)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(head.logits(out), head.logits(expected), **FP32)


@pytest.mark.parametrize("preset", ["llama-gqa", "llama3"])
async def test_chain_decode_session_equals_local_model(checkpoints, make_config, preset):
    model_dir = checkpoints[preset]
    head = load_client_head(model_dir, progress=False)
    whole = load_span(model_dir, 0, 8, progress=False)
    prompt = torch.tensor([[5, 17, 99, 3, 250]])
    configs = [make_config(model_dir, blocks) for blocks in CHAIN]
    async with running_servers(configs) as (servers, pool), AsyncExitStack() as stack:
        streams = []
        for server, (start, end) in zip(servers, CHAIN, strict=True):
            conn = await pool.get(server.address)
            stream = await stack.enter_async_context(
                conn.open_stream(
                    "inference", {"start": start, "end": end, "batch": 1, "max_length": 64}
                )
            )
            assert (await stream.receive()).meta["position"] == 0
            streams.append(stream)

        async def through_chain(x: torch.Tensor, position: int, step: int) -> torch.Tensor:
            for stream in streams:
                await stream.send({"position": position, "step": step}, (x,))
                reply = await stream.receive()
                assert reply.meta == {"position": position + x.shape[1], "step": step}
                x = reply.tensors[0]
            return x

        tokens = prompt
        outputs = [await through_chain(head.embed(prompt), 0, 0)]
        for step in range(1, 33):
            next_token = head.logits(outputs[-1][:, -1:]).argmax(-1)  # [1, 1]
            outputs.append(await through_chain(head.embed(next_token), tokens.shape[1], step))
            tokens = torch.cat([tokens, next_token], dim=1)
        for stream in streams:
            await stream.close_send()
    remote = torch.cat(outputs, dim=1)
    with torch.no_grad():
        expected = whole(head.embed(tokens))
    assert remote.shape == expected.shape == (1, 5 + 32, head.config.hidden_size)
    torch.testing.assert_close(remote, expected, **FP32)
    torch.testing.assert_close(head.logits(remote), head.logits(expected), **FP32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_a_cuda_server_in_fp16_matches_the_local_fp32_model(checkpoints, make_config):
    model_dir = checkpoints["llama-gqa"]
    head = load_client_head(model_dir, progress=False)
    whole = load_span(model_dir, 0, 8, progress=False)
    hidden = head.embed(torch.tensor([[5, 17, 99, 3, 250, 7]]))
    config = make_config(model_dir, (0, 8), device="cuda", dtype="fp16")
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        out = (await conn.call("forward", {"start": 0, "end": 8}, (hidden.half(),))).tensors[0]
        meta = {"start": 0, "end": 8, "batch": 1, "max_length": 16}
        async with conn.open_stream("inference", meta) as stream:
            await stream.receive()
            await stream.send({"position": 0}, (hidden[:, :5].half(),))
            await stream.receive()
            await stream.send({"position": 5}, (hidden[:, 5:].half(),))
            last = (await stream.receive()).tensors[0]
            await stream.close_send()
    with torch.no_grad():
        expected = whole(hidden)
    assert out.dtype == torch.float16 and out.device.type == "cpu"
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(last.float(), expected[:, 5:], rtol=5e-2, atol=5e-2)
