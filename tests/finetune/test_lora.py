"""LoRA adapters on frozen spans: against the merged weights W + (alpha/r) B A,
against PEFT itself when it is installed, per session and per batched row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from libpipe.errors import CheckpointError, ConfigError, InvalidRequestError, UnsupportedModelError
from libpipe.model import (
    KVCachePool,
    ModelConfig,
    load_lora_adapter,
    load_span,
    write_random_lora_adapter,
)
from libpipe.model._lora import TARGET_PATHS

# fp32: merged weights sum in another order, a few ulps per block.
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _merged_span(checkpoint: Path, adapter_dir: Path, start: int, end: int):
    """The reference: a span whose weights have the adapter folded in by hand."""
    span = load_span(checkpoint, start, end, progress=False)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for i in range(start, end):
        for path in TARGET_PATHS.values():
            key = f"base_model.model.model.layers.{i}.{path}"
            if f"{key}.lora_A.weight" not in tensors:
                continue
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            linear = span.layers[i - start].get_submodule(path)
            linear.weight += (cfg["lora_alpha"] / a.shape[0]) * (b @ a)
    return span


def _hidden(batch=2, t=9, d=64, seed=0):
    return torch.randn(batch, t, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["attn", "all"])
def test_adapter_equals_merged_weights(checkpoint, adapters, which):
    span = load_span(checkpoint, 2, 6, progress=False, adapters=[adapters[which]])
    ref = _merged_span(checkpoint, adapters[which], 2, 6)
    x = _hidden()
    with torch.no_grad():
        torch.testing.assert_close(span(x, adapter=which), ref(x), **TOL)
        torch.testing.assert_close(span(x, 3, 5, adapter=which), ref(x, 3, 5), **TOL)


def test_several_adapters_leave_the_base_untouched(checkpoint, adapters):
    plain = load_span(checkpoint, 0, 8, progress=False)
    span = load_span(checkpoint, 0, 8, progress=False, adapters=list(adapters.values()))
    assert sorted(span.adapters) == ["all", "attn"]
    x = _hidden()
    with torch.no_grad():
        base = span(x)
        outs = {name: span(x, adapter=name) for name in ("attn", "all")}
        torch.testing.assert_close(span(x, adapter=""), base, atol=0, rtol=0)
        torch.testing.assert_close(base, plain(x), atol=0, rtol=0)
    assert (outs["attn"] - base).abs().max() > 1e-2
    assert (outs["all"] - outs["attn"]).abs().max() > 1e-2


def test_only_the_span_blocks_are_read(checkpoint, adapters):
    config = ModelConfig.from_file(checkpoint)
    adapter = load_lora_adapter(
        adapters["all"], config, 3, 5, device=torch.device("cpu"), dtype=torch.float16
    )
    assert sorted(adapter.blocks) == [3, 4]
    assert adapter.name == "all"
    pair = adapter.blocks[3].pairs["down_proj"]
    assert pair.a.dtype == torch.float16 and pair.scaling == pytest.approx(1.5)
    # rank 2: four [2, 64] + [64, 2] pairs, three with 128 on one side; fp16
    assert adapter.nbytes == 2 * (4 * 256 + 3 * 384) * 2


def test_sessions_and_batched_decode_use_each_sessions_adapter(checkpoint, adapters):
    span = load_span(checkpoint, 0, 4, progress=False, adapters=list(adapters.values()))
    pool = KVCachePool(1 << 24)
    prompt = _hidden(batch=1, t=6, seed=1)
    names = ["attn", None, "all"]
    sessions = [span.open_session(pool, batch=1, max_length=16, adapter=n) for n in names]
    with torch.no_grad():
        for s, n in zip(sessions, names, strict=True):
            torch.testing.assert_close(s.step(prompt), span(prompt, adapter=n), **TOL)
        nxt = [_hidden(batch=1, t=1, seed=10 + i) for i in range(3)]
        batched = span.decode_batch(sessions, nxt)
        for out, n, x in zip(batched, names, nxt, strict=True):
            full = span(torch.cat([prompt, x], dim=1), adapter=n)
            torch.testing.assert_close(out, full[:, -1:], **TOL)


def test_matches_peft(checkpoint, adapters):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(hf, str(adapters["all"])).eval()
    span = load_span(checkpoint, 0, 7, progress=False, adapters=[adapters["all"]])
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        ours = span(ref[0], adapter="all")
    # hidden_states[i] is the input of block i
    torch.testing.assert_close(ours, ref[7], atol=1e-4, rtol=1e-4)


def test_deep_prompts_and_backward(checkpoint):
    span = load_span(checkpoint, 1, 4, progress=False)
    x = _hidden(t=7)
    prompts = torch.randn(2, 2, 3, 64, generator=torch.Generator().manual_seed(9))
    grad_out = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(8))
    # Reference: the prompt enters block i as a zero-padded addition.
    xr, pr = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    h = xr
    for i in range(2):
        h = span(h + torch.nn.functional.pad(pr[i], (0, 0, 0, 4)), 1 + i, 2 + i)
    h.backward(grad_out)
    with torch.no_grad():
        torch.testing.assert_close(span(x, 1, 3, prompts=prompts), h, **TOL)
    gx, gp = span.backward(x, grad_out, 1, 3, prompts=prompts)
    torch.testing.assert_close(gx, xr.grad, **TOL)
    torch.testing.assert_close(gp, pr.grad, **TOL)
    gx_plain, none = span.backward(x, grad_out)
    assert none is None and gx_plain.shape == x.shape
    assert not any(p.requires_grad for p in span.parameters())


def test_bad_requests_are_typed(checkpoint, adapters):
    span = load_span(checkpoint, 0, 2, progress=False, adapters=[adapters["attn"]])
    x = _hidden()
    with pytest.raises(InvalidRequestError, match="unknown adapter 'nope'"):
        span(x, adapter="nope")
    with pytest.raises(InvalidRequestError, match="unknown adapter"):
        span.open_session(KVCachePool(1 << 20), batch=1, max_length=4, adapter="nope")
    with pytest.raises(InvalidRequestError, match="deep prompts have shape"):
        span(x, prompts=torch.zeros(2, 2, 10, 64))
    with pytest.raises(InvalidRequestError, match="deep prompts are"):
        span(x, prompts=torch.zeros(2, 2, 1, 64, dtype=torch.float16))
    with pytest.raises(InvalidRequestError, match="gradient has shape"):
        span.backward(x, x[:, :3])
    config = ModelConfig.from_file(checkpoint)
    again = load_lora_adapter(
        adapters["attn"], config, 0, 2, device=torch.device("cpu"), dtype=torch.float32
    )
    with pytest.raises(ConfigError, match="already loaded"):
        span.add_adapter(again)
    other = load_lora_adapter(
        adapters["attn"], config, 0, 3, device=torch.device("cpu"), dtype=torch.float32, name="x"
    )
    with pytest.raises(ConfigError, match="was loaded for blocks"):
        span.add_adapter(other)


def test_bad_adapter_files_are_typed(tmp_path, checkpoint, gqa_checkpoint, adapters):
    config = ModelConfig.from_file(checkpoint)

    def load(path):
        return load_lora_adapter(
            path, config, 0, 8, device=torch.device("cpu"), dtype=torch.float32
        )

    # An adapter made for another model: shapes do not fit.
    foreign = write_random_lora_adapter(tmp_path / "gqa", ModelConfig.from_file(gqa_checkpoint))
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load(foreign)
    assert len(info.value.details["problems"]) == 16
    # Same widths, more layers: a deeper model's adapter, refused even for
    # a span its extra layers do not touch.
    deeper = write_random_lora_adapter(tmp_path / "deeper", config, layers=[0, 8])
    with pytest.raises(CheckpointError, match="adapts layer 8, past the model's last"):
        load_lora_adapter(deeper, config, 0, 4, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"has no adapter_config\.json"):
        load(tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text(
        (adapters["attn"] / "adapter_config.json").read_text()
    )
    tensors = load_file(str(adapters["attn"] / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    save_file(tensors, str(half / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="lora_A only") as info:
        load(half)
    assert any("lm_head" in p for p in info.value.details["problems"])
    for key, value in [
        ("use_dora", True),
        ("bias", "all"),
        ("peft_type", "IA3"),
        ("alpha_pattern", {"q_proj": 2}),
    ]:
        cfg = json.loads((adapters["attn"] / "adapter_config.json").read_text()) | {key: value}
        (half / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedModelError):
            load(half)
    (half / "adapter_config.json").write_text(json.dumps({"r": 0, "lora_alpha": 1}))
    with pytest.raises(CheckpointError, match="r must be a positive number"):
        load(half)
    (half / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(half)
    (half / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 1}))
    (half / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(half)


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path, checkpoint):
    config = ModelConfig.from_file(checkpoint)
    path = write_random_lora_adapter(tmp_path / "rs", config, rank=4, alpha=8.0, layers=[1])
    raw = json.loads((path / "adapter_config.json").read_text()) | {"use_rslora": True}
    (path / "adapter_config.json").write_text(json.dumps(raw))
    adapter = load_lora_adapter(path, config, 0, 8, device=torch.device("cpu"), dtype=torch.float32)
    assert sorted(adapter.blocks) == [1]
    assert adapter.blocks[1].pairs["q_proj"].scaling == pytest.approx(8.0 / 2.0)
