"""Bulk forward and backward over a sub-span (run on the worker thread).

A forward longer than the span's ``prefill_chunk`` goes block by block
through a temporary one-block cache session instead of one full-sequence
pass, so its attention scratch is ``[B, H, chunk, T]`` rather than
``[B, H, T, T]`` (512 MiB per sequence at T = 8192 with 32 heads in fp32).
That cache comes out of the server's KV budget like any session's, so a
forward never takes memory the server has promised away; the outputs equal
a single pass. Deep prompts (proto/RPC.md) are added before each block on
that path exactly as ``BlockSpan.forward`` adds them.

Backward is ``BlockSpan.backward``: it recomputes the forward under autograd
with respect to the inputs (and prompts); the weights never get a gradient.

Moving tensors between the host and the device (and casting replies to the
wire dtype) also happens here, on the worker: a copy back from a GPU waits
for its kernels, and the event loop must never wait for the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import BlockSpan, KVCachePool
from ..wire import cast_for_wire


def to_span(t: Tensor, span: BlockSpan) -> Tensor:
    """A received tensor on the span's device, in its compute dtype."""
    return t.to(device=span.device, dtype=span.dtype)


def to_wire(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A result ready to send: cast (overflow refused) on the device, then on the host."""
    return cast_for_wire(t, dtype).to("cpu").contiguous()


def forward(
    span: BlockSpan,
    pool: KVCachePool,
    hidden: Tensor,
    start: int,
    end: int,
    *,
    prompts: Tensor | None = None,
    adapter: str | None = None,
) -> Tensor:
    """``hidden: [B, T, D]`` through blocks ``[start, end)``; ``prompts: [end-start, B, P, D]``."""
    with torch.no_grad():
        if hidden.shape[1] <= span.prefill_chunk:
            return span(hidden, start, end, adapter=adapter, prompts=prompts)
        bsz, t, _ = hidden.shape
        for i in range(start, end):
            if prompts is not None:
                p = prompts.shape[2]
                hidden = torch.cat([hidden[:, :p] + prompts[i - start], hidden[:, p:]], dim=1)
            with span.open_session(
                pool, batch=bsz, max_length=t, start=i, end=i + 1, adapter=adapter
            ) as session:
                hidden = session.step(hidden)
        return hidden


def backward(
    span: BlockSpan,
    hidden: Tensor,
    grad_output: Tensor,
    start: int,
    end: int,
    *,
    prompts: Tensor | None = None,
    adapter: str | None = None,
) -> tuple[Tensor, ...]:
    """Gradients w.r.t. ``hidden``, then ``prompts`` if given."""
    grad_hidden, grad_prompts = span.backward(
        hidden, grad_output, start, end, adapter=adapter, prompts=prompts
    )
    return (grad_hidden,) if grad_prompts is None else (grad_hidden, grad_prompts)
