"""Bulk forward and backward over a sub-span, with deep prompts (worker thread).

Deep prompts (proto/RPC.md): before block ``start + i`` runs,
``prompts[i]`` is added to the first ``prefix`` positions. So the work goes
block by block whenever prompts are present; otherwise the span runs whole.

A forward longer than the span's ``prefill_chunk`` goes through a
temporary one-block cache session instead of one full-sequence pass, so its
attention scratch is ``[B, H, chunk, T]`` rather than ``[B, H, T, T]`` (512
MiB per sequence at T = 8192 with 32 heads in fp32). That cache comes out
of the server's KV budget like any session's, so a forward can never take
memory the server has promised away; the outputs equal a single pass.

Backward recomputes the forward under autograd with respect to the inputs
(and prompts); the weights are frozen (``requires_grad=False``) and never
receive a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import BlockSpan, KVCachePool


def forward(
    span: BlockSpan,
    pool: KVCachePool,
    hidden: Tensor,
    start: int,
    end: int,
    prompts: Tensor | None = None,
) -> Tensor:
    """``hidden: [B, T, D]`` through blocks ``[start, end)``; ``prompts: [end-start, B, P, D]``."""
    with torch.no_grad():
        long = hidden.shape[1] > span.prefill_chunk
        if prompts is None and not long:
            return span(hidden, start, end)
        for i in range(start, end):
            if prompts is not None:
                hidden = _add_prompt(hidden, prompts[i - start])
            hidden = _one_block_chunked(span, pool, hidden, i) if long else span(hidden, i, i + 1)
        return hidden


def backward(
    span: BlockSpan,
    hidden: Tensor,
    grad_output: Tensor,
    start: int,
    end: int,
    prompts: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Gradients of ``sum(outputs * grad_output)`` w.r.t. ``hidden`` (and ``prompts``)."""
    with torch.enable_grad():
        x = hidden.detach().requires_grad_(True)
        inputs = [x]
        if prompts is None:
            out = span(x, start, end)
        else:
            p = prompts.detach().requires_grad_(True)
            inputs.append(p)
            out = x
            for i in range(start, end):
                out = span(_add_prompt(out, p[i - start]), i, i + 1)
        return torch.autograd.grad(out, inputs, grad_output)


def _add_prompt(hidden: Tensor, prompt: Tensor) -> Tensor:
    # hidden: [B, T, D]; prompt: [B, P, D] with P <= T. Not in place: the
    # input may be the caller's (or the wire's) buffer, and autograd needs both.
    p = prompt.shape[1]
    return torch.cat([hidden[:, :p] + prompt, hidden[:, p:]], dim=1)


def _one_block_chunked(span: BlockSpan, pool: KVCachePool, hidden: Tensor, block: int) -> Tensor:
    bsz, t, _ = hidden.shape
    with span.open_session(pool, batch=bsz, max_length=t, start=block, end=block + 1) as session:
        return session.step(hidden)
