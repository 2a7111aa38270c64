"""Checks on what a request carries, each failure an ``InvalidRequestError``
that names the field (proto/RPC.md: missing keys, wrong types and
impossible values are ``invalid_request``, never a hang)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidRequestError

# What a client may send (and so gets back): RPC.md, 'Hidden states'.
ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def meta_int(meta: dict[str, Any], key: str, *, minimum: int | None = None) -> int:
    """A required integer field (booleans are not integers here)."""
    if key not in meta:
        raise InvalidRequestError(f"request lacks {key!r}", field=key)
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(
            f"{key!r} must be an integer, got {type(value).__name__}", field=key
        )
    if minimum is not None and value < minimum:
        raise InvalidRequestError(f"{key!r} must be >= {minimum}, got {value}", field=key)
    return value


def optional_int(meta: dict[str, Any], key: str) -> int | None:
    """An integer field a request may leave out (or send as null)."""
    return None if meta.get(key) is None else meta_int(meta, key)


def sub_span(meta: dict[str, Any], served: tuple[int, int]) -> tuple[int, int]:
    """``start``/``end`` of a request, inside the blocks this server holds."""
    start, end = meta_int(meta, "start"), meta_int(meta, "end")
    if not served[0] <= start < end <= served[1]:
        raise InvalidRequestError(
            f"blocks [{start}, {end}) are not within this server's span [{served[0]}, {served[1]})",
            start=start,
            end=end,
            span=list(served),
        )
    return start, end


def check_adapter(meta: dict[str, Any], loaded: tuple[str, ...] = ()) -> None:
    adapter = meta.get("adapter")
    if adapter is None or adapter == "":
        return
    if not isinstance(adapter, str) or adapter not in loaded:
        raise InvalidRequestError(f"unknown adapter {adapter!r}", adapter=repr(adapter))


def tensor_count(tensors: tuple[Tensor, ...], allowed: tuple[int, ...], what: str) -> None:
    if len(tensors) not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise InvalidRequestError(f"{what} takes {want} tensor(s), got {len(tensors)}")


def hidden_states(
    t: Tensor,
    hidden_size: int,
    *,
    name: str = "hidden states",
    batch: int | None = None,
    tokens: int | None = None,
) -> None:
    """``t`` is ``[batch, tokens, hidden_size]`` of an accepted float dtype."""
    if t.dtype not in ACCEPTED_DTYPES:
        raise InvalidRequestError(f"{name} are {t.dtype}; send float16, bfloat16 or float32")
    shape = list(t.shape)
    if (
        t.dim() != 3
        or shape[0] < 1
        or shape[1] < 1
        or shape[2] != hidden_size
        or (batch is not None and shape[0] != batch)
        or (tokens is not None and shape[1] != tokens)
    ):
        want = f"[{batch or 'B>0'}, {tokens or 'T>0'}, {hidden_size}]"
        raise InvalidRequestError(f"{name} have shape {shape}, expected {want}", shape=shape)


def deep_prompts(p: Tensor, n_blocks: int, batch: int, tokens: int, hidden_size: int) -> None:
    """``p`` is ``[n_blocks, batch, prefix, hidden_size]`` with ``1 <= prefix <= tokens``."""
    if p.dtype not in ACCEPTED_DTYPES:
        raise InvalidRequestError(f"deep prompts are {p.dtype}; send float16, bfloat16 or float32")
    shape = list(p.shape)
    if (
        p.dim() != 4
        or shape[0] != n_blocks
        or shape[1] != batch
        or not 1 <= shape[2] <= tokens
        or shape[3] != hidden_size
    ):
        raise InvalidRequestError(
            f"deep prompts have shape {shape}, expected "
            f"[{n_blocks}, {batch}, 1..{tokens}, {hidden_size}]",
            shape=shape,
        )
