"""LoRA adapters in the PEFT layout, applied per request to frozen blocks.

Theory of operation: a LoRA adapter adds ``scaling * B @ A`` to some of a
block's projection matrices (``A: [r, in]``, ``B: [out, r]``). We never
merge it into the weights: a server serves the base model and several
adapters at once, so each projection computes ``linear(x) + scaling *
(x @ A.T) @ B.T`` for the rows that asked for that adapter, and the base
weights stay untouched.

PEFT saves a directory with ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors`` whose keys look
like ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``.
The tensors present say what is adapted (``target_modules`` and
``layers_to_transform`` only decided which tensors PEFT created); only the
tensors of the span's blocks are read. PEFT's scaling is ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` per module as the
tensor's rank (``rank_pattern`` only changes shapes). Options that change
the computation in other ways (DoRA, trained biases, ``alpha_pattern``)
are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import CheckpointError, UnsupportedModelError
from ._config import ModelConfig
from ._llama import PROJECTION_PATHS, projection_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Every projection of a block can take an adapter: short name -> its path.
TARGET_PATHS = PROJECTION_PATHS
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)


@dataclass(frozen=True)
class LoraPair:
    """One adapted projection: ``y += scaling * (x @ a.T) @ b.T``."""

    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scaling: float

    def delta(self, x: Tensor) -> Tensor:
        return (x @ self.a.T) @ self.b.T * self.scaling


class BlockLora:
    """The adapted projections of one block (what ``Block.forward`` gets)."""

    def __init__(self, pairs: dict[str, LoraPair]) -> None:
        self.pairs = pairs

    def project(self, name: str, linear: nn.Linear, x: Tensor) -> Tensor:
        y = linear(x)
        pair = self.pairs.get(name)
        return y if pair is None else y + pair.delta(x)


class RowsLora:
    """Different adapters for consecutive groups of rows, for one batched
    decode step of sessions that asked for different adapters."""

    def __init__(self, groups: Sequence[tuple[int, BlockLora | None]]) -> None:
        self.groups = groups  # (rows, adapter of those rows or None for base)

    def project(self, name: str, linear: nn.Linear, x: Tensor) -> Tensor:
        # x: [R, T, in]; rows of each group are consecutive.
        y = linear(x)
        parts, r = [], 0
        for rows, lora in self.groups:
            part = y[r : r + rows]
            pair = None if lora is None else lora.pairs.get(name)
            parts.append(part if pair is None else part + pair.delta(x[r : r + rows]))
            r += rows
        return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class LoraAdapter:
    """A loaded adapter: the pairs of blocks ``[start, end)`` by absolute index."""

    name: str
    start: int
    end: int
    blocks: dict[int, BlockLora]

    def for_block(self, index: int) -> BlockLora | None:
        return self.blocks.get(index)

    @property
    def nbytes(self) -> int:
        return sum(
            p.a.numel() * p.a.element_size() + p.b.numel() * p.b.element_size()
            for block in self.blocks.values()
            for p in block.pairs.values()
        )


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked for what we can compute exactly."""
    file = path / CONFIG_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"adapter {path} has no {CONFIG_FILE}", path=str(path)) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}", path=str(file)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is not a JSON object", path=str(file))
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedModelError(f"adapter {path} is {peft_type!r}, only LORA is supported")
    refused = {
        "use_dora": raw.get("use_dora", False),
        "fan_in_fan_out": raw.get("fan_in_fan_out", False),
        "alpha_pattern": raw.get("alpha_pattern") or {},
    }
    for key, value in refused.items():
        if value:
            raise UnsupportedModelError(
                f"adapter {path} sets {key}={value!r}, which is unsupported"
            )
    if raw.get("bias", "none") != "none":
        raise UnsupportedModelError(
            f"adapter {path} trains biases (bias={raw['bias']!r}), which is unsupported"
        )
    for key in ("r", "lora_alpha"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {value!r}")
    return raw


def load_lora_adapter(
    path: str | Path,
    config: ModelConfig,
    start: int,
    end: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    name: str | None = None,
) -> LoraAdapter:
    """Read the pairs of blocks ``[start, end)`` of the adapter at ``path``.

    The adapter is named after its directory unless ``name`` is given.
    Wrong shapes, half pairs and unknown modules raise ``CheckpointError``
    listing them."""
    path = Path(path)
    raw = read_adapter_config(path)
    alpha, rslora = float(raw["lora_alpha"]), bool(raw.get("use_rslora", False))
    shapes = projection_shapes(config)
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    problems: list[str] = []
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    problems.append(f"{key} is not a LoRA tensor of a decoder block")
                    continue
                layer, group, module, which = int(m[1]), m[2], m[3], m[4]
                if TARGET_PATHS.get(module) != f"{group}.{module}":
                    problems.append(f"{key} adapts {group}.{module}, not a projection we know")
                    continue
                if layer >= config.num_hidden_layers:
                    # Made for a deeper model: its other blocks would be wrong too.
                    problems.append(f"{key} adapts layer {layer}, past the model's last")
                    continue
                if start <= layer < end:
                    found.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except FileNotFoundError:
        raise CheckpointError(f"adapter {path} has no {WEIGHTS_FILE}", path=str(path)) from None
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}", path=str(weights)) from None
    blocks: dict[int, dict[str, LoraPair]] = {}
    for (layer, module), pair in sorted(found.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            problems.append(f"{where} has lora_{''.join(pair)} only")
            continue
        a, b = pair["A"], pair["B"]
        out_dim, in_dim = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim:
            problems.append(
                f"{where}: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not fit "
                f"[r, {in_dim}] and [{out_dim}, r]"
            )
            continue
        rank = a.shape[0]
        if b.shape[1] != rank or rank == 0 or not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{where}: ranks of lora_A {list(a.shape)} and lora_B differ or are 0")
            continue
        scaling = alpha / (math.sqrt(rank) if rslora else rank)
        blocks.setdefault(layer, {})[module] = LoraPair(
            a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), scaling
        )
    if problems:
        raise CheckpointError(
            f"adapter {path} is not a LoRA adapter for this model: {'; '.join(problems[:8])}"
            + (" ..." if len(problems) > 8 else ""),
            path=str(path),
            problems=problems,
        )
    return LoraAdapter(name or path.name, start, end, {i: BlockLora(p) for i, p in blocks.items()})


def write_random_lora_adapter(
    path: str | Path,
    config: ModelConfig,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random adapter in the PEFT layout (for tests and demos).

    PEFT starts ``B`` at zero; here both are random (std about 1/sqrt(fan
    in)) so that the adapter visibly changes outputs."""
    targets = list(target_modules)
    unknown = [t for t in targets if t not in TARGET_PATHS]
    if unknown or rank <= 0:
        raise CheckpointError(f"cannot write adapter: rank {rank}, unknown modules {unknown}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chosen = list(range(config.num_hidden_layers)) if layers is None else list(layers)
    gen = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(config)
    tensors: dict[str, Tensor] = {}
    for layer in chosen:
        for module in targets:
            out_dim, in_dim = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{TARGET_PATHS[module]}"
            a = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
            b = torch.randn(out_dim, rank, generator=gen) / rank**0.5
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.model_id,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "layers_to_transform": None if layers is None else chosen,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (path / CONFIG_FILE).write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return path
