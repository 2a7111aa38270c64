"""Tensors on the wire: descriptors in the metadata, raw bytes in the payload.

Sending never copies a contiguous CPU tensor: its bytes go out as a
memoryview of its storage. Receiving views the frame's buffer in place. The
only copies are the ones that change bytes: compression (byte-shuffle, then
zstd) and its inverse.

Byte-shuffle: for an n-byte dtype the payload is rewritten as n planes, the
most significant byte of every element first. The high byte of fp16/bf16
activations (sign, exponent) repeats a lot; the low byte (mantissa) is close
to noise. Grouping them lets zstd find the repetition.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zstandard

from ..errors import (
    DecompressionError,
    InvalidMessageError,
    LimitExceededError,
    PayloadMismatchError,
    TensorOverflowError,
)
from ._frame import TENSOR_ALIGN, Limits

# Wire name <-> torch dtype. Names are append-only, like frame kinds.
DTYPES: dict[str, torch.dtype] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "u8": torch.uint8,
    "i8": torch.int8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "bool": torch.bool,
}
WIRE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
# numpy stand-ins: numpy views of buffers are cheaper to make than torch's
# (bench/wire.py, decode-step row); bf16 travels as int16 and is re-viewed.
NUMPY: dict[str, np.dtype[Any]] = {
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(np.int16),
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "u8": np.dtype(np.uint8),
    "i8": np.dtype(np.int8),
    "i16": np.dtype(np.int16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "bool": np.dtype(np.uint8),
}

# The names whose numpy stand-in is not their own dtype: re-viewed in torch.
_REVIEWED = frozenset({"bf16", "bool"})

CODEC_RAW = "raw"
CODEC_ZSTD = "zstd"  # zstd over the element bytes as they are (1-byte dtypes)
CODEC_SHUFFLE_ZSTD = "shuffle-zstd"  # zstd over the byte planes, high byte first
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_SHUFFLE_ZSTD)

# Compression is attempted only from this size. Shuffle + zstd level 1 runs
# at ~1.2 GB/s and saves ~15% on fp16 activations, so it pays on links slower
# than ~0.15 x 1.2 GB/s (~1.4 Gbit/s) whatever the size; but decode-step
# frames (8-16 KiB) are latency-bound, and there the fixed cost of two zstd
# calls (bench/wire.py: "zstd_decode_step_us") buys back little. 64 KiB
# leaves every decode step raw and compresses prefill and bulk payloads.
COMPRESS_MIN_BYTES = 64 * 1024
# ...and kept only when it saves at least this fraction of the bytes; less
# than that does not pay for the decompression on the other side.
COMPRESS_MIN_SAVING = 0.10
ZSTD_LEVEL = 1

_PAD = bytes(TENSOR_ALIGN)


def cast_for_wire(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``t`` cast to ``dtype`` for sending, refusing to turn finite values into
    infinities (fp16 tops out at 65504; activations with outlier channels get
    there, and an inf would silently poison every later block)."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if out.is_floating_point() and bool(torch.isinf(out).any()):
        new_inf = torch.isinf(out) & ~torch.isinf(t)
        count = int(new_inf.sum())
        if count:
            max_abs = float(t[new_inf].abs().max())
            raise TensorOverflowError(
                f"casting {WIRE_NAMES.get(t.dtype, str(t.dtype))} to "
                f"{WIRE_NAMES.get(dtype, str(dtype))} overflows {count} value(s) "
                f"(largest magnitude {max_abs:g})",
                count=count,
                max_abs=max_abs,
            )
    return out


# What ``Tensor.numpy()`` gives for each wire dtype (bf16 has no numpy
# dtype: its ``numpy()`` raises, and it takes the general path).
_NUMPY_NAMES: dict[np.dtype[Any], str] = {
    np.dtype(np.float16): "f16",
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.uint8): "u8",
    np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.bool_): "bool",
}


def wire_view(t: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """The wire dtype name, shape and a byte view of ``t``'s storage.

    A contiguous CPU tensor of a numpy-typed dtype (every decode step) costs
    one torch call, ``numpy()``, and the rest is read off the array: each
    torch call on a tiny tensor costs more than the bytes it describes, and
    several times more on a cold cache (a step's first touch of this code
    after 16 ms of compute). Anything else (GPU, bf16, strided, grad)
    goes through ``tensor_bytes``, which copies where it must."""
    try:
        array = t.numpy()
    except (TypeError, RuntimeError):
        array = None
    if array is not None and array.flags.c_contiguous:
        name = _NUMPY_NAMES.get(array.dtype)
        if name is not None:
            shape = list(array.shape)
            if array.ndim == 0 or array.size == 0:
                # memoryview.cast wants at least one dimension and no zero extents
                array = array.reshape(-1)
            return name, shape, memoryview(array).cast("B")
    name = WIRE_NAMES.get(t.dtype)
    if name is None:
        raise InvalidMessageError(f"dtype {t.dtype} cannot travel on the wire")
    return name, list(t.shape), tensor_bytes(t)[1]


def tensor_bytes(t: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """A contiguous CPU version of ``t`` and a byte view of its storage
    (copies only when ``t`` is on a GPU or not contiguous)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dim() == 0 or t.numel() == 0:
        # memoryview.cast wants at least one dimension and no zero extents
        t = t.reshape(-1)
    if t.dtype is torch.bfloat16:
        return t, memoryview(t.view(torch.int16).numpy()).cast("B")
    return t, memoryview(t.numpy()).cast("B")


def shuffle(raw: memoryview, itemsize: int) -> np.ndarray:
    """Byte planes, most significant first (elements are little-endian, so
    plane p holds byte ``itemsize - 1 - p`` of every element). One strided
    copy per plane: several times faster than transposing a 2-D view."""
    src = np.frombuffer(raw, dtype=np.uint8)
    n = src.size // itemsize
    out = np.empty(src.size, dtype=np.uint8)
    for p in range(itemsize):
        out[p * n : (p + 1) * n] = src[itemsize - 1 - p :: itemsize]
    return out


def unshuffle_into(planes: bytes, itemsize: int, out: memoryview) -> None:
    src = np.frombuffer(planes, dtype=np.uint8)
    dst = np.frombuffer(out, dtype=np.uint8)
    n = src.size // itemsize
    for p in range(itemsize):
        dst[itemsize - 1 - p :: itemsize] = src[p * n : (p + 1) * n]


class TensorEncoder:
    """Turns tensors into descriptors and payload buffers; holds the zstd
    context so a connection reuses it."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)

    def encode(
        self, tensors: tuple[torch.Tensor, ...], compress: bool, limits: Limits
    ) -> tuple[list[list[Any]], list[bytes | memoryview], int, bool]:
        """Descriptors, payload buffers (padding included), payload length,
        and whether anything was compressed."""
        if len(tensors) > limits.max_tensors:
            raise LimitExceededError(
                f"{len(tensors)} tensors in one message, limit {limits.max_tensors}",
                count=len(tensors),
                limit=limits.max_tensors,
            )
        descriptors: list[list[Any]] = []
        buffers: list[bytes | memoryview] = []
        offset = 0
        compressed_any = False
        for t in tensors:
            name, shape, data = wire_view(t)
            if len(shape) > limits.max_tensor_dims:
                raise LimitExceededError(
                    f"tensor of {len(shape)} dims, limit {limits.max_tensor_dims}",
                    dims=len(shape),
                    limit=limits.max_tensor_dims,
                )
            codec = CODEC_RAW
            body: bytes | memoryview = data
            if compress and data.nbytes >= COMPRESS_MIN_BYTES:
                itemsize = ITEMSIZE[name]
                packed = self._zstd.compress(shuffle(data, itemsize) if itemsize > 1 else data)
                if len(packed) <= data.nbytes * (1.0 - COMPRESS_MIN_SAVING):
                    codec = CODEC_SHUFFLE_ZSTD if itemsize > 1 else CODEC_ZSTD
                    body = packed
                    compressed_any = True
            pad = -offset % TENSOR_ALIGN
            if pad:
                buffers.append(_PAD[:pad])
                offset += pad
            nbytes = len(body) if isinstance(body, bytes) else body.nbytes
            if nbytes:
                buffers.append(body)
            offset += nbytes
            descriptors.append([name, shape, codec, nbytes])
        if offset > limits.max_payload_bytes:
            raise LimitExceededError(
                f"payload of {offset} bytes, limit {limits.max_payload_bytes}",
                size=offset,
                limit=limits.max_payload_bytes,
            )
        return descriptors, buffers, offset, compressed_any


def decode_tensors(
    descriptors: object,
    payload: bytearray | memoryview,
    payload_offset: int,
    payload_len: int,
    compressed_flag: bool,
    limits: Limits,
) -> tuple[torch.Tensor, ...]:
    """Tensors viewing ``payload[payload_offset:]``; every descriptor is
    checked against the limits and the payload size before any allocation."""
    if not isinstance(descriptors, list):
        raise InvalidMessageError(f"'tensors' must be an array, not {type(descriptors).__name__}")
    if len(descriptors) > limits.max_tensors:
        raise LimitExceededError(
            f"{len(descriptors)} tensors in one message, limit {limits.max_tensors}",
            count=len(descriptors),
            limit=limits.max_tensors,
        )
    plan = []
    offset = 0
    decoded_total = 0
    compressed_any = False
    for i, desc in enumerate(descriptors):
        if not (isinstance(desc, list) and len(desc) == 4):
            raise InvalidMessageError(
                f"tensor {i}: descriptor must be [dtype, shape, codec, nbytes]"
            )
        name, shape, codec, nbytes = desc
        if type(name) is not str or name not in DTYPES:
            raise InvalidMessageError(f"tensor {i}: unknown dtype {name!r}")
        if type(shape) is not list:
            raise InvalidMessageError(f"tensor {i}: shape must be an array of non-negative ints")
        if len(shape) > limits.max_tensor_dims:
            raise LimitExceededError(
                f"tensor {i}: {len(shape)} dims, limit {limits.max_tensor_dims}",
                dims=len(shape),
                limit=limits.max_tensor_dims,
            )
        if codec not in CODECS:
            raise InvalidMessageError(f"tensor {i}: unknown codec {codec!r}")
        if type(nbytes) is not int or nbytes < 0:
            raise InvalidMessageError(f"tensor {i}: nbytes must be a non-negative int")
        numel = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise InvalidMessageError(
                    f"tensor {i}: shape must be an array of non-negative ints, not {shape!r}"
                )
            # even an empty tensor may not name an extent torch cannot hold
            if d > limits.max_payload_bytes:
                raise LimitExceededError(
                    f"tensor {i}: extent {d} over the payload limit {limits.max_payload_bytes}",
                    size=d,
                    limit=limits.max_payload_bytes,
                )
            numel *= d
        size = numel * ITEMSIZE[name]
        decoded_total += size
        if decoded_total > limits.max_payload_bytes:
            raise LimitExceededError(
                f"tensors of {decoded_total} bytes once decoded, limit {limits.max_payload_bytes}",
                size=decoded_total,
                limit=limits.max_payload_bytes,
            )
        if codec == CODEC_RAW and nbytes != size:
            raise PayloadMismatchError(
                f"tensor {i}: {nbytes} bytes on the wire for {name}{shape} ({size} bytes)",
                declared=nbytes,
                expected=size,
            )
        if codec != CODEC_RAW:
            compressed_any = True
            if codec == CODEC_SHUFFLE_ZSTD and ITEMSIZE[name] == 1:
                raise InvalidMessageError(f"tensor {i}: shuffle of a 1-byte dtype")
        offset += -offset % TENSOR_ALIGN
        plan.append((name, shape, codec, offset, nbytes, numel, size))
        offset += nbytes
    if offset != payload_len:
        raise PayloadMismatchError(
            f"the tensors take {offset} bytes but the payload has {payload_len}",
            declared=payload_len,
            expected=offset,
        )
    if compressed_any != compressed_flag:
        raise InvalidMessageError("the COMPRESSED flag disagrees with the tensor codecs")
    out = []
    for name, shape, codec, offset, nbytes, numel, size in plan:
        dtype = DTYPES[name]
        if numel == 0:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        start = payload_offset + offset
        if codec == CODEC_RAW:
            buffer: bytearray | memoryview | np.ndarray = payload
        else:
            buffer = _decompress(memoryview(payload)[start : start + nbytes], codec, name, size)
            start = 0
        # One numpy call makes the shaped view: cheaper than frombuffer and
        # reshape, or than torch.frombuffer and view (two torch calls).
        array = np.ndarray(shape, NUMPY[name], buffer, start)
        if dtype is torch.bool and int(array.max()) > 1:
            raise InvalidMessageError("a bool tensor holds bytes other than 0 and 1")
        t = torch.from_numpy(array)
        out.append(t.view(dtype) if name in _REVIEWED else t)
    return tuple(out)


def _decompress(data: memoryview, codec: str, name: str, size: int) -> np.ndarray:
    """Exactly ``size`` bytes or ``DecompressionError``: the frame header must
    declare that size, and the decoder stops at it (no zstd bombs)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"not a zstd frame: {exc}") from exc
    if declared != size:
        raise DecompressionError(
            f"zstd frame declares {declared} bytes, the tensor needs {size}",
            declared=declared,
            expected=size,
        )
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        plain = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"corrupt zstd payload: {exc}") from exc
    if not dobj.eof or dobj.unused_data or len(plain) != size:
        raise DecompressionError(
            f"zstd payload decodes to {len(plain)} bytes (frame complete: {dobj.eof}, "
            f"{len(dobj.unused_data)} trailing bytes), the tensor needs {size}"
        )
    out = np.empty(size, dtype=np.uint8)  # every byte is written below
    if codec == CODEC_SHUFFLE_ZSTD:
        unshuffle_into(plain, ITEMSIZE[name], memoryview(out))
    else:
        out[:] = np.frombuffer(plain, dtype=np.uint8)
    return out
