from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from libpipe.errors import CheckpointError, ConfigError, InvalidRequestError
from libpipe.model import _checkpoint, load_client_head, load_span, write_random_checkpoint


class _Recorder:
    """Wraps safe_open to record which files are opened and tensors read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.read: list[str] = []
        real = _checkpoint.safe_open
        recorder = self

        class Handle:
            def __init__(self, path, **kw):
                recorder.opened.append(path.rsplit("/", 1)[-1])
                self._f = real(path, **kw)

            def keys(self):
                return self._f.keys()

            def get_tensor(self, name):
                recorder.read.append(name)
                return self._f.get_tensor(name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        monkeypatch.setattr(_checkpoint, "safe_open", Handle)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # ~1 block per shard: shards holding only other blocks must stay closed.
    return write_random_checkpoint(
        tmp_path_factory.mktemp("sharded"), "llama", seed=3, max_shard_bytes=70_000
    )


def _shards_of(path, names):
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return {weight_map[n] for n in names}, set(weight_map.values())


def test_span_reads_only_its_tensors_and_opens_only_their_shards(sharded, monkeypatch):
    rec = _Recorder(monkeypatch)
    span = load_span(sharded, 3, 5, progress=False)
    assert {n.split(".")[2] for n in rec.read} == {"3", "4"}
    assert len(rec.read) == len(set(rec.read)) == len(span.state_dict()) == 2 * 9
    needed, all_shards = _shards_of(sharded, rec.read)
    assert set(rec.opened) == needed
    assert len(all_shards - needed) >= 5  # the test would prove nothing otherwise


def test_single_file_reads_only_wanted_tensors(checkpoints, monkeypatch):
    rec = _Recorder(monkeypatch)
    load_span(checkpoints["qwen2"], 7, 8, progress=False)
    assert rec.read and all(n.startswith("model.layers.7.") for n in rec.read)
    assert len(rec.read) == 12  # 9 weights + q/k/v biases


def test_client_head_reads_no_block(sharded, monkeypatch):
    rec = _Recorder(monkeypatch)
    head = load_client_head(sharded, progress=False)
    assert sorted(rec.read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    ids = torch.tensor([[1, 2, 3]])
    assert head.logits(head.embed(ids)).shape == (1, 3, 256)


def test_tied_embeddings_share_one_tensor(checkpoints):
    assert "lm_head.weight" not in load_file(checkpoints["llama-gqa"] / "model.safetensors")
    head = load_client_head(checkpoints["llama-gqa"], progress=False)
    assert head.lm_head.weight is head.embed_tokens.weight


def test_dtype_conversion_at_load_time(checkpoints):
    span = load_span(checkpoints["llama"], 0, 2, dtype="bf16", progress=False)
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}
    assert span(torch.randn(1, 4, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="float16 is not supported on cpu"):
        load_span(checkpoints["llama"], 0, 2, dtype=torch.float16, progress=False)


def test_progress_bar_goes_to_stderr_and_can_be_off(checkpoints, capsys):
    load_span(checkpoints["llama"], 0, 1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "blocks 0:1" in err
    load_span(checkpoints["llama"], 0, 1, progress=False)
    assert capsys.readouterr() == ("", "")


def test_missing_tensor_is_named(tmp_path, checkpoints):
    path = write_random_checkpoint(tmp_path / "m", "llama", seed=1)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.4.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    assert load_span(path, 0, 4, progress=False).end == 4  # other blocks still load
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\.mlp\.up_proj\.weight") as info:
        load_span(path, 3, 5, progress=False)
    assert info.value.details["missing"] == ["model.layers.4.mlp.up_proj.weight"]


def test_mismatched_shape_is_named(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", "llama", seed=1)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight \[8, 64\] \(expected \[64, 64\]\)"):
        load_span(path, 0, 2, progress=False)


def test_missing_and_broken_files(tmp_path, sharded):
    write_random_checkpoint(tmp_path / "a", "llama", seed=1)
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        load_span(tmp_path / "a", 0, 1, progress=False)
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot open"):
        load_span(tmp_path / "a", 0, 1, progress=False)
    (tmp_path / "a" / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(CheckpointError, match="weight_map"):
        load_span(tmp_path / "a", 0, 1, progress=False)
    (tmp_path / "a" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.layers.0.input_layernorm.weight": "gone.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="lacks 8 tensor"):
        load_span(tmp_path / "a", 0, 1, progress=False)
    # An index naming shards that are not there.
    (tmp_path / "a" / "model.safetensors.index.json").write_text(
        (sharded / "model.safetensors.index.json").read_text()
    )
    with pytest.raises(CheckpointError, match="is missing"):
        load_span(tmp_path / "a", 0, 1, progress=False)


def test_bad_span_device_and_preset(checkpoints):
    with pytest.raises(InvalidRequestError, match=r"\[6, 9\)"):
        load_span(checkpoints["llama"], 6, 9, progress=False)
    with pytest.raises(InvalidRequestError):
        load_span(checkpoints["llama"], 3, 3, progress=False)
    with pytest.raises(ConfigError, match="unknown device"):
        load_span(checkpoints["llama"], 0, 1, device="tpu", progress=False)
    with pytest.raises(ConfigError, match="unknown preset"):
        write_random_checkpoint(checkpoints["llama"].parent / "x", "gpt2")


def test_client_head_refuses_bad_input(checkpoints):
    head = load_client_head(checkpoints["llama"], progress=False)
    for bad in (
        torch.tensor([[0, 256]]),
        torch.tensor([[-1]]),
        torch.tensor([1, 2]),
        torch.tensor([[1.0]]),
    ):
        with pytest.raises(InvalidRequestError):
            head.embed(bad)
    with pytest.raises(InvalidRequestError, match=r"\[B, T, 64\]"):
        head.logits(torch.zeros(1, 2, 32))
    # Hidden states arrive in the wire dtype; the head computes in its own.
    assert head.logits(torch.zeros(1, 2, 64, dtype=torch.float16)).dtype == torch.float32


def test_byte_tokenizer_round_trips_text(checkpoints, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoints["llama"] / "tokenizer.json"))
    text = "héllo wörld\n\t\x01 ✓"
    ids = tok.encode(text).ids
    assert ids == list(text.encode())
    assert tok.decode(ids) == text
    small = write_random_checkpoint(tmp_path / "s", "llama", overrides={"vocab_size": 100})
    assert not (small / "tokenizer.json").exists()


def test_bf16_checkpoint_is_converted_to_the_compute_dtype(tmp_path, checkpoints):
    path = write_random_checkpoint(tmp_path / "bf16", "llama", seed=7, dtype=torch.bfloat16)
    assert load_file(path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    span = load_span(path, 0, 1, progress=False)
    fp32 = load_span(checkpoints["llama"], 0, 1, progress=False)
    assert {p.dtype for p in span.parameters()} == {torch.float32}
    # Same seed: the bf16 file holds the fp32 weights rounded.
    for (name, a), (_, b) in zip(span.state_dict().items(), fp32.state_dict().items(), strict=True):
        assert torch.equal(a, b.bfloat16().float()), name
