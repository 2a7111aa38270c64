import json

import pytest

from libpipe.errors import CheckpointError, UnsupportedModelError
from libpipe.model import PRESETS, ModelConfig, RopeScaling


def _cfg(**changes):
    raw = dict(PRESETS["llama"]) | changes
    return ModelConfig.from_dict({k: v for k, v in raw.items() if v is not None}, name="m")


def test_derived_fields():
    cfg = _cfg()
    assert cfg.head_dim == 16 and cfg.kv_groups == 1 and not cfg.q_bias
    gqa = ModelConfig.from_dict(PRESETS["llama-gqa"])
    assert (gqa.head_dim, gqa.kv_groups, gqa.tie_word_embeddings) == (16, 4, True)
    qwen = ModelConfig.from_dict(PRESETS["qwen2"])
    assert qwen.qkv_bias and qwen.q_bias and not qwen.attention_bias


@pytest.mark.parametrize(
    ("eos", "ids"),
    [(2, {2}), ([2, 7], {2, 7}), (None, set()), ([2, "x", True], {2}), ("2", set())],
)
def test_eos_token_ids_from_an_int_or_a_list(eos, ids):
    assert _cfg(eos_token_id=eos).eos_token_ids == ids


def test_llama3_rope_in_both_config_formats():
    old = ModelConfig.from_dict(PRESETS["llama3"])
    assert old.rope_theta == 500000.0
    assert old.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    # transformers 5 writes one rope_parameters dict instead.
    raw = {k: v for k, v in PRESETS["llama3"].items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = PRESETS["llama3"]["rope_scaling"] | {"rope_theta": 500000.0}
    assert ModelConfig.from_dict(raw) == old


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"architectures": None}, "architecture"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66}, "head_dim"),
        ({"vocab_size": "256"}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"rms_norm_eps": "small"}, "invalid value"),
    ],
)
def test_unsupported_configs_are_refused_by_name(changes, named):
    with pytest.raises(UnsupportedModelError, match=named):
        _cfg(**changes)


def test_sliding_window_as_long_as_the_context_is_fine():
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert _cfg(**mistral, sliding_window=8192).architecture == "MistralForCausalLM"
    assert _cfg(**mistral, sliding_window=None).architecture == "MistralForCausalLM"
    qwen_on = dict(PRESETS["qwen2"]) | {"use_sliding_window": True}
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        ModelConfig.from_dict(qwen_on)


def test_model_id_is_stable_and_tells_models_apart():
    raw = dict(PRESETS["llama"])
    a = ModelConfig.from_dict(raw, name="org/tiny").model_id
    reordered = dict(reversed(list(raw.items()))) | {
        "transformers_version": "9.9",
        "_name_or_path": "x",
    }
    assert ModelConfig.from_dict(reordered, name="org/tiny").model_id == a
    assert a.startswith("tiny@")
    assert ModelConfig.from_dict(raw | {"rope_theta": 1.0}, name="org/tiny").model_id != a
    assert ModelConfig.from_dict(raw, name="org/other").model_id != a


def test_config_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama"]))
    assert ModelConfig.from_file(tmp_path / "config.json").model_id.startswith(tmp_path.name)
