"""Bulk forward and backward over a sub-span (run on the worker thread).

A forward longer than the span's ``prefill_chunk`` goes block by block
through a temporary one-block cache session instead of one full-sequence
pass, so its attention scratch is ``[B, H, chunk, T]`` rather than
``[B, H, T, T]`` (512 MiB per sequence at T = 8192 with 32 heads in fp32).
That cache comes out of the server's KV budget like any session's, so a
forward never takes memory the server has promised away; the outputs equal
a single pass. Deep prompts (proto/RPC.md) are added before each block on
that path exactly as ``BlockSpan.forward`` adds them.

Backward is ``BlockSpan.backward`` per chunk of blocks: it recomputes the forward under autograd
with respect to the inputs (and prompts); the weights never get a gradient.
A whole span's backward as one job would keep the device for all of it
(decode steps of interactive sessions wait: the executor's priorities act
only between jobs) and hold every activation of the span at once, so
``ChunkedBackward`` cuts it into jobs of ``chunk`` blocks each.

Moving tensors between the host and the device (and casting replies to the
wire dtype) also happens here, on the worker: a copy back from a GPU waits
for its kernels, and the event loop must never wait for the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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


class ChunkedBackward:
    """A backward over blocks ``[start, end)`` as a series of short jobs.

    ``jobs()`` are to run in order, each on the worker as its own executor
    job, so decode steps run between them:

    1. one per chunk but the last: that chunk's forward without autograd,
       keeping only its output, the next chunk's input (block-boundary
       activations; nothing inside a chunk outlives its job);
    2. one per chunk, from the last: recompute it under autograd from its
       input and backpropagate the gradient the later chunk handed back
       (``BlockSpan.backward``), then forget that input.

    The gradients equal one pass over the span: the same operations on the
    same values, only the graph is cut at the boundaries. The price is one
    more forward of all chunks but the last; with ``chunk >= end - start``
    there is one job, exactly the one-pass backward. ``result`` holds the
    reply's tensors (gradient w.r.t. ``hidden``, then ``prompts`` if given),
    on the host in the request's dtypes, once the last job has run.
    """

    def __init__(
        self,
        span: BlockSpan,
        hidden: Tensor,
        grad_output: Tensor,
        start: int,
        end: int,
        *,
        chunk: int,
        prompts: Tensor | None = None,
        adapter: str | None = None,
    ) -> None:
        self.span = span
        self.start = start
        self.chunks = [(a, min(a + chunk, end)) for a in range(start, end, chunk)]
        self.adapter = adapter
        self.result: tuple[Tensor, ...] | None = None
        self._received = (hidden, grad_output, prompts)  # as they came, cast on the worker
        self._prompts: Tensor | None = None
        self._grad: Tensor | None = None
        self._inputs: list[Tensor] = []  # the input of chunk i at index i
        self._grad_prompts: list[Tensor] = []  # from the last chunk back

    def jobs(self) -> list[Callable[[], None]]:
        n = len(self.chunks)
        forward = [functools.partial(self._forward, i) for i in range(n - 1)]
        backward = [functools.partial(self._backward, i) for i in reversed(range(n))]
        return forward + backward

    def _cast(self) -> None:
        if self._inputs:
            return
        hidden, grad, prompts = self._received
        self._inputs.append(to_span(hidden, self.span))
        self._grad = to_span(grad, self.span)
        self._prompts = None if prompts is None else to_span(prompts, self.span)

    def _chunk_prompts(self, i: int) -> Tensor | None:
        a, b = self.chunks[i]
        return None if self._prompts is None else self._prompts[a - self.start : b - self.start]

    def _forward(self, i: int) -> None:
        self._cast()
        a, b = self.chunks[i]
        with torch.no_grad():
            out = self.span(
                self._inputs[i], a, b, adapter=self.adapter, prompts=self._chunk_prompts(i)
            )
        self._inputs.append(out)

    def _backward(self, i: int) -> None:
        self._cast()
        assert self._grad is not None and len(self._inputs) == i + 1
        a, b = self.chunks[i]
        grad, grad_prompts = self.span.backward(
            self._inputs.pop(),
            self._grad,
            a,
            b,
            adapter=self.adapter,
            prompts=self._chunk_prompts(i),
        )
        self._grad = grad
        if grad_prompts is not None:
            self._grad_prompts.append(grad_prompts)
        if i == 0:
            self._finish()

    def _finish(self) -> None:
        assert self._grad is not None
        hidden, _, prompts = self._received
        replies = [to_wire(self._grad, hidden.dtype)]
        if prompts is not None:
            replies.append(to_wire(torch.cat(self._grad_prompts[::-1]), prompts.dtype))
        self.result = tuple(replies)
