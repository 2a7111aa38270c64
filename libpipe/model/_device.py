"""Which devices and compute dtypes a span may run on.

CPUs compute in fp32 or bf16 (fp16 matmuls on CPU are slow or missing);
GPUs in fp16 or bf16 (fp32 works but wastes half the memory a volunteer
GPU has, so it is allowed only when asked for explicitly). The check runs
before any weight is read, so a wrong flag fails in a second, not after
loading gigabytes.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")

ALLOWED_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "mps": (torch.float16, torch.bfloat16, torch.float32),
}
DEFAULT_DTYPES: dict[str, torch.dtype] = {
    "cpu": torch.float32,
    "cuda": torch.float16,
    "mps": torch.float16,
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse and check a device string: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    text = str(device)
    if not _DEVICE_RE.match(text):
        raise ConfigError(f"unknown device {text!r} (use cpu, cuda, cuda:N or mps)", device=text)
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r} asked for but CUDA is not available", device=text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {text!r} does not exist ({torch.cuda.device_count()} CUDA devices)",
                device=text,
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for but MPS is not available", device=text)
    return canonical_device(dev)


def canonical_device(device: str | torch.device) -> torch.device:
    """The device as tensors report it (``cuda`` -> ``cuda:0``), so that
    comparing a tensor's device with ours cannot fail on a missing index."""
    dev = torch.device(device)
    if dev.type in ("cuda", "mps") and dev.index is None:
        return torch.empty(0, device=dev).device
    return dev


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for ``device``: its default, or ``dtype`` if allowed there."""
    if dtype is None:
        return DEFAULT_DTYPES[device.type]
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {dtype!r} (use fp32, fp16 or bf16)", dtype=dtype)
        dtype = _DTYPE_NAMES[dtype]
    if dtype not in ALLOWED_DTYPES[device.type]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in ALLOWED_DTYPES[device.type])
        raise ConfigError(
            f"dtype {str(dtype).removeprefix('torch.')} is not supported on {device.type} (use {allowed})",
            dtype=str(dtype),
            device=device.type,
        )
    return dtype
