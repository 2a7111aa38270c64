"""Model configuration read from a Hugging Face ``config.json``.

One dataclass covers the Llama family as transformers writes it: Llama
1/2/3 (``LlamaForCausalLM``), Mistral without a sliding window and Qwen2
(biases on q/k/v). Every option that would change the computation and that
the blocks in ``_llama.py`` do not implement is refused here, by name, so a
server never serves a model it would compute wrongly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError

# architecture name -> the model_type transformers pairs it with.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)

# Keys that say where a config came from rather than what the model is;
# left out of the hash so that re-saving a checkpoint keeps its model_id.
_PROVENANCE_KEYS = ("transformers_version",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (the only rope_type besides "default")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    attention_bias: bool = False  # bias on q, k, v and o (Llama option)
    qkv_bias: bool = False  # bias on q, k, v only (always on for Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_id: str = field(default="", compare=False)
    # Where generation stops by default; config.json's ``eos_token_id``
    # (an int or a list). Changes no computation, so not compared.
    eos_token_ids: frozenset[int] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise UnsupportedModelError(
                    f"hidden_size {self.hidden_size} is not a multiple of "
                    f"num_attention_heads {self.num_attention_heads} and no head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} is odd; rotary needs it even")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias

    def kv_bytes_per_token(self, n_blocks: int, element_size: int) -> int:
        """Cache bytes one token of one sequence costs over ``n_blocks`` blocks."""
        return n_blocks * 2 * self.num_key_value_heads * self.head_dim * element_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, name: str = "") -> ModelConfig:
        """Validate a parsed config.json; ``name`` prefixes the model_id."""
        return _parse(raw, name)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or the ``config.json`` inside a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"no config.json at {path}", path=str(path)) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}", path=str(path)) from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} does not hold a JSON object", path=str(path))
        return _parse(raw, raw.get("_name_or_path") or path.parent.name)


def model_id_for(raw: dict[str, Any], name: str) -> str:
    """``<name>@<hash>``: equal for every server that holds the same model.

    The name alone is not enough (two fine-tunes can share it) and the hash
    alone is unreadable in logs, so both. The hash covers the canonical JSON
    of the config, whitespace and key order aside.
    """
    meaningful = {
        k: v for k, v in raw.items() if not k.startswith("_") and k not in _PROVENANCE_KEYS
    }
    canonical = json.dumps(meaningful, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name).rstrip("/").split("/")[-1]) or "model"
    return f"{slug}@{digest}"


def _parse(raw: dict[str, Any], name: str) -> ModelConfig:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1:
        raise UnsupportedModelError(f"expected exactly one architecture, config has {archs!r}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            architecture=arch,
        )
    act = raw.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"unsupported activation hidden_act={act!r}", option="hidden_act"
        )
    max_pos = _int(raw, "max_position_embeddings")
    _refuse_sliding_window(raw, arch, max_pos)
    theta, scaling = _rope(raw)
    is_qwen2 = SUPPORTED_ARCHITECTURES[arch] == "qwen2"
    n_heads = _int(raw, "num_attention_heads")
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=_int(raw, "hidden_size"),
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            head_dim=int(raw.get("head_dim") or 0),
            attention_bias=bool(raw.get("attention_bias", False)) and not is_qwen2,
            qkv_bias=is_qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            model_id=model_id_for(raw, name or arch),
            eos_token_ids=_eos_token_ids(raw.get("eos_token_id")),
        )
    except (TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"config.json has an invalid value: {exc}") from None


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedModelError(f"config.json needs a positive integer {key!r}, has {value!r}")
    return value


def _eos_token_ids(eos: object) -> frozenset[int]:
    """The integer ids in ``eos_token_id``; anything else (null, absent) is none."""
    values = eos if isinstance(eos, list) else [eos]
    return frozenset(e for e in values if isinstance(e, int) and not isinstance(e, bool))


def _refuse_sliding_window(raw: dict[str, Any], arch: str, max_pos: int) -> None:
    # Qwen2 writes a window size even when it is switched off.
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        return
    window = raw.get("sliding_window")
    if window is not None and window < max_pos:
        raise UnsupportedModelError(
            f"sliding_window={window} (< max_position_embeddings {max_pos}) is not supported",
            option="sliding_window",
        )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either config format.

    transformers < 5 writes ``rope_theta`` + ``rope_scaling``; 5 writes one
    ``rope_parameters`` dict holding both. Checkpoints in the wild have either.
    """
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            "partial_rotary_factor != 1 is not supported", option="partial_rotary_factor"
        )
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
            option="rope_type",
        )
    if rope_type == "default":
        return float(theta), None
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise UnsupportedModelError(f"llama3 rope scaling lacks {exc.args[0]!r}") from None
