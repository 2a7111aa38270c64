"""Loading a span (or the client's head) from a Hugging Face checkpoint.

Theory of operation: the model is built on the ``meta`` device (shapes, no
memory), then filled with ``load_state_dict(assign=True)`` from tensors read
one by one with ``safetensors.safe_open``. Which file holds which tensor
comes from ``model.safetensors.index.json`` (sharded) or from the header of
``model.safetensors``; only files that hold a wanted tensor are opened, and
only wanted tensors are read, so a server holding blocks 10-19 of a 32 GB
model reads about 10/N of it. Each tensor is converted to the compute dtype
and moved to the device as it is read, so peak host memory is one tensor
beyond the span itself.

Every wanted tensor is checked before the model is touched: missing names
and wrong shapes raise ``CheckpointError`` listing them all.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..errors import CheckpointError
from ._config import ModelConfig
from ._device import resolve_device, resolve_dtype
from ._llama import ClientHead, block_tensor_shapes, head_tensor_shapes
from ._lora import load_lora_adapter
from ._span import DEFAULT_PREFILL_CHUNK, BlockSpan

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_span(
    model_dir: str | Path,
    start: int,
    end: int,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    adapters: Sequence[str | Path] = (),
) -> BlockSpan:
    """Blocks ``[start, end)`` of the checkpoint in ``model_dir``, frozen.

    ``dtype`` defaults to the device's compute dtype (fp32 on CPU, fp16 on
    GPUs); the progress bar goes to stderr unless ``progress=False``.
    ``adapters`` are LoRA adapter directories (PEFT layout), each named
    after its directory; only their tensors for these blocks are read."""
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    compute = resolve_dtype(dev, dtype)
    config = ModelConfig.from_file(model_dir)
    with torch.device("meta"):
        span = BlockSpan(config, start, end, device=dev, dtype=compute, prefill_chunk=prefill_chunk)
    block_shapes = block_tensor_shapes(config)
    wanted = {
        f"model.layers.{i}.{name}": (f"{i - start}.{name}", shape)
        for i in range(start, end)
        for name, shape in block_shapes.items()
    }
    state = _read(model_dir, wanted, dev, compute, progress, f"blocks {start}:{end}")
    span.layers.load_state_dict(state, strict=True, assign=True)
    for path in adapters:
        span.add_adapter(load_lora_adapter(path, config, start, end, device=dev, dtype=compute))
    return span.requires_grad_(False).eval()


def load_client_head(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> ClientHead:
    """Embeddings, final norm and LM head (tied to the embeddings if the
    config says so); no block is read."""
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    compute = resolve_dtype(dev, dtype)
    config = ModelConfig.from_file(model_dir)
    with torch.device("meta"):
        head = ClientHead(config)
    local = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    wanted = {name: (local[name], shape) for name, shape in head_tensor_shapes(config).items()}
    state = _read(model_dir, wanted, dev, compute, progress, "client head")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    head.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        head.lm_head.weight = head.embed_tokens.weight
    return head.requires_grad_(False).eval()


def tensor_locations(model_dir: Path) -> dict[str, str]:
    """Checkpoint tensor name -> file name (relative to ``model_dir``)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index}: {exc!r}", path=str(index)) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(f"{index} has no valid weight_map", path=str(index))
        return weight_map
    single = model_dir / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CheckpointError(
        f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}", path=str(model_dir)
    )


def _read(
    model_dir: Path,
    wanted: dict[str, tuple[str, tuple[int, ...]]],
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    what: str,
) -> dict[str, torch.Tensor]:
    """Read ``wanted`` (checkpoint name -> (local name, shape)), checked."""
    locations = tensor_locations(model_dir)
    missing = sorted(n for n in wanted if n not in locations)
    if missing:
        raise CheckpointError(
            f"checkpoint {model_dir} lacks {len(missing)} tensor(s) for {what}: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else ""),
            missing=missing,
        )
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in wanted:
        by_file[locations[name]].append(name)
    state: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    with tqdm(
        total=len(wanted),
        desc=f"loading {what}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for file_name in sorted(by_file):
            with _open(model_dir / file_name) as f:
                for name in by_file[file_name]:
                    local, shape = wanted[name]
                    tensor = _get(f, name, model_dir / file_name)
                    if tuple(tensor.shape) != shape:
                        mismatched.append(f"{name} {list(tensor.shape)} (expected {list(shape)})")
                    elif not tensor.is_floating_point():
                        mismatched.append(f"{name} has dtype {tensor.dtype}")
                    else:
                        state[local] = tensor.to(device=device, dtype=dtype)
                    bar.update(1)
    if mismatched:
        raise CheckpointError(
            f"checkpoint {model_dir} has mismatched tensor(s): {'; '.join(mismatched[:8])}",
            mismatched=mismatched,
        )
    return state


def _open(path: Path) -> safe_open:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing", path=str(path)) from None
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot open {path}: {exc}", path=str(path)) from None


def _get(f: safe_open, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {name} from {path}: {exc}", path=str(path)) from None
