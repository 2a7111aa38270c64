"""Our spans, chained, against transformers' own implementation of the same checkpoint."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from libpipe.model import KVCachePool, load_client_head, load_span, write_random_checkpoint
from libpipe.model._llama import rope_inv_freq

SPANS = [(0, 3), (3, 5), (5, 8)]
# fp32, different kernels and summation order: a few ulps per block.
TOL = {"atol": 1e-4, "rtol": 1e-4}


@functools.cache
def _hf(path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _ours(path):
    spans = [load_span(path, a, b, progress=False) for a, b in SPANS]
    return spans, load_client_head(path, progress=False)


@pytest.mark.parametrize("preset", ["llama", "llama-gqa", "llama3", "qwen2"])
def test_chained_spans_match_full_sequence(checkpoints, preset):
    path = checkpoints[preset]
    hf = _hf(path)
    spans, head = _ours(path)
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        h = head.embed(ids)
        torch.testing.assert_close(h, ref.hidden_states[0], atol=0, rtol=0)
        for span in spans:
            h = span(h)
            # hidden_states[i] is the input of block i (the last one is normed).
            if span.end < 8:
                torch.testing.assert_close(h, ref.hidden_states[span.end], **TOL)
        torch.testing.assert_close(head.logits(h), ref.logits, **TOL)


def test_llama3_inverse_frequencies_equal_transformers(checkpoints):
    config = load_span(checkpoints["llama3"], 0, 1, progress=False).config
    ours = rope_inv_freq(config)
    hf = _hf(checkpoints["llama3"])
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq, atol=0, rtol=1e-6)
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    # All three bands occur: kept, interpolated, slowed down by `factor`.
    ratio = plain / ours
    assert ratio.min() == 1.0 and ratio.max() == pytest.approx(8.0)
    assert ((ratio > 1.0) & (ratio < 8.0 - 1e-4)).any()


@pytest.mark.parametrize("preset", ["llama", "llama-gqa", "llama3", "qwen2"])
def test_32_step_decode_with_cache_matches(checkpoints, preset):
    path = checkpoints[preset]
    hf = _hf(path)
    spans, head = _ours(path)
    pool = KVCachePool(1 << 24)
    sessions = [span.open_session(pool, batch=1, max_length=64) for span in spans]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    step_logits, step_hidden = [], []
    new = ids
    for _ in range(33):  # the prompt, then 32 decode steps
        h = head.embed(new)
        outs = []
        for s in sessions:
            h = s.step(h)
            outs.append(h)
        step_hidden.append(outs)
        logits = head.logits(h)
        step_logits.append(logits)
        new = logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, new], dim=1)
    assert all(s.position == 40 for s in sessions)
    with torch.no_grad():
        ref = hf(ids[:, :-1], output_hidden_states=True)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), ref.logits, **TOL)
    for i, (_, end) in enumerate(SPANS[:-1]):
        got = torch.cat([outs[i] for outs in step_hidden], dim=1)
        torch.testing.assert_close(got, ref.hidden_states[end], **TOL)
    for s in sessions:
        s.close()
    assert pool.used_bytes == 0


def test_sharded_checkpoint_matches(tmp_path, checkpoints):
    path = write_random_checkpoint(
        tmp_path / "sharded", "llama-gqa", seed=7, max_shard_bytes=40_000
    )
    assert len(list(path.glob("model-*.safetensors"))) > 4
    hf = _hf(path)
    spans, head = _ours(path)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = head.embed(ids)
        for span in spans:
            h = span(h)
        torch.testing.assert_close(head.logits(h), hf(ids).logits, **TOL)
    # Same seed, same tensors: sharding changes the files, not the model.
    single, _ = _ours(checkpoints["llama-gqa"])
    for a, b in zip(spans, single, strict=True):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name


def test_input_gradients_through_remote_style_spans_match_autograd(checkpoints):
    """Backward the way a client drives servers: each span gets its input
    and the gradient of its output, and returns the gradient of its input."""
    path = checkpoints["llama-gqa"]
    hf = _hf(path)
    spans, head = _ours(path)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 11, 64, generator=gen)
    weights = torch.randn(2, 11, 256, generator=gen)

    x_ref = x.clone().requires_grad_(True)
    (hf(inputs_embeds=x_ref).logits * weights).sum().backward()

    inputs, h = [], x
    with torch.no_grad():
        for span in spans:
            inputs.append(h)
            h = span(h)
    h = h.clone().requires_grad_(True)
    (head.logits(h) * weights).sum().backward()
    grad = h.grad
    for span, inp in zip(reversed(spans), reversed(inputs), strict=True):
        inp = inp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(span(inp), inp, grad)
        grad = g
    torch.testing.assert_close(grad, x_ref.grad, **TOL)
    assert all(not p.requires_grad for span in spans for p in span.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_bias": True, "mlp_bias": True},
        {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
    ],
    ids=["llama-biases", "mistral"],
)
def test_other_variants_match(tmp_path, overrides):
    biases = overrides.get("mlp_bias", False)
    path = write_random_checkpoint(
        tmp_path / "m", "llama", seed=5, overrides={"num_hidden_layers": 3} | overrides
    )
    hf = _hf(path)
    span, head = load_span(path, 0, 3, progress=False), load_client_head(path, progress=False)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(head.logits(span(head.embed(ids))), hf(ids).logits, **TOL)
    weights = span.state_dict()
    assert ("layers.0.self_attn.o_proj.bias" in weights) == biases
    assert ("layers.2.mlp.down_proj.bias" in weights) == biases
