"""Bulk forward and backward over a sub-span (run on the worker thread).

A request's rows go through in groups of at most ``prefill_chunk`` tokens
(at least one row, ``row_groups``): the frame limit lets ~10^8 values
through, and a batch of thousands of short rows in one pass would need
activations and attention scratch far beyond the input's size (enough to
have the OS kill the daemon on a CPU host). Rows are independent, so the
results equal one pass.

A forward longer than the span's ``prefill_chunk`` goes block by block
through a temporary one-block cache session instead of one full-sequence
pass, so its attention scratch is ``[B, H, chunk, T]`` rather than
``[B, H, T, T]`` (512 MiB per sequence at T = 8192 with 32 heads in fp32).
That cache comes out of the server's KV budget like any session's, so a
forward never takes memory the server has promised away; the outputs equal
a single pass. Deep prompts (proto/RPC.md) are added before each block on
that path exactly as ``BlockSpan.forward`` adds them.

Backward is ``BlockSpan.backward`` per chunk of blocks: it recomputes the
forward under autograd with respect to the inputs (and prompts); the
weights never get a gradient.
A whole span's backward as one job would keep the device for all of it
(decode steps of interactive sessions wait: the executor's priorities act
only between jobs) and hold every activation of the span at once, so
``ChunkedBackward`` cuts it into jobs of ``chunk`` blocks each. A forward
call is cut the same way (``ChunkedForward``), which recomputes nothing.

Moving tensors between the host and the device (and casting replies to the
wire dtype) also happens here, on the worker: a copy back from a GPU waits
for its kernels, and the event loop must never wait for the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InvalidRequestError
from ..model import BlockSpan, KVCachePool
from ..wire import cast_for_wire


def to_span(t: Tensor, span: BlockSpan) -> Tensor:
    """A received tensor on the span's device, in its compute dtype."""
    return t.to(device=span.device, dtype=span.dtype)


def input_on_span(t: Tensor, span: BlockSpan, name: str) -> Tensor:
    """A bulk request's tensor on the span's device and dtype, refused
    (``InvalidRequestError``) if it holds NaN or infinities, there or only
    after the cast (a value past fp16's range sent to an fp16 server): a
    NaN in one row spreads through attention to every later result of that
    row, and the client would get back noise it cannot trace."""
    out = to_span(t, span)
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise InvalidRequestError(
            f"{name} hold {bad} NaN or infinite value(s) in {span.dtype}".replace("torch.", ""),
            count=bad,
        )
    return out


def to_wire(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A result ready to send: cast (overflow refused) on the device, then on the host."""
    return cast_for_wire(t, dtype).to("cpu").contiguous()


def row_groups(batch: int, tokens: int, prefill_chunk: int) -> list[slice]:
    """The rows of a bulk request that go through in one pass: at most
    ``prefill_chunk`` tokens' worth, at least one row."""
    rows = max(1, prefill_chunk // tokens)
    return [slice(r, r + rows) for r in range(0, batch, rows)]


class ChunkedForward:
    """A forward over blocks ``[start, end)`` as a series of short jobs, so
    decode steps run between them instead of waiting for a whole span's
    pass (the executor's priorities act only between jobs).

    ``jobs()`` are to run in order, each on the worker as its own executor
    job: for each group of rows (``row_groups``), one job per chunk of
    ``chunk`` blocks, each taking the previous one's output (a block-
    boundary activation) as its input. The same operations on the same
    values as ``forward``, so the outputs are equal; unlike backward's,
    the cut costs no recomputation, only a hand-off per job. ``result``
    holds the reply's tensor, on the host in the request's dtype, once the
    last job has run."""

    def __init__(
        self,
        span: BlockSpan,
        pool: KVCachePool,
        hidden: Tensor,
        start: int,
        end: int,
        *,
        chunk: int,
        prompts: Tensor | None = None,
        adapter: str | None = None,
    ) -> None:
        self.span = span
        self.pool = pool
        self.hidden = hidden
        self.prompts = prompts
        self.start = start
        self.adapter = adapter
        self.chunks = [(a, min(a + chunk, end)) for a in range(start, end, chunk)]
        self.rows = row_groups(hidden.shape[0], hidden.shape[1], span.prefill_chunk)
        self._x: Tensor | None = None  # the current row group's activations
        self._p: Tensor | None = None  # and its deep prompts, on the device
        self._outs: list[Tensor] = []
        self.result: Tensor | None = None

    def jobs(self) -> list[Callable[[], None]]:
        return [
            functools.partial(self._job, rows, i)
            for rows in self.rows
            for i in range(len(self.chunks))
        ]

    def _job(self, rows: slice, i: int) -> None:
        span = self.span
        if i == 0:
            self._x = input_on_span(self.hidden[rows], span, "hidden states")
            self._p = (
                None
                if self.prompts is None
                else input_on_span(self.prompts[:, rows], span, "deep prompts")
            )
        a, b = self.chunks[i]
        p = None if self._p is None else self._p[a - self.start : b - self.start]
        assert self._x is not None
        self._x = _forward_rows(span, self.pool, self._x, a, b, prompts=p, adapter=self.adapter)
        if i == len(self.chunks) - 1:
            self._outs.append(to_wire(self._x, self.hidden.dtype))
            self._x = self._p = None
            if len(self._outs) == len(self.rows):
                self.result = _join(self._outs)


def _forward_rows(
    span: BlockSpan,
    pool: KVCachePool,
    hidden: Tensor,
    start: int,
    end: int,
    *,
    prompts: Tensor | None,
    adapter: str | None,
) -> Tensor:
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
    job, so decode steps run between them. For each group of rows
    (``row_groups``):

    1. one job per chunk of blocks but the last: that chunk's forward
       without autograd, keeping only its output, the next chunk's input
       (block-boundary activations; nothing inside a chunk outlives its job);
    2. one per chunk, from the last: recompute it under autograd from its
       input and backpropagate the gradient the later chunk handed back
       (``BlockSpan.backward``), then forget that input.

    The gradients equal one pass over the span: the same operations on the
    same values, only the graph is cut at the boundaries. The price is one
    more forward of all chunks but the last; with ``chunk >= end - start``
    there is one job per row group, the one-pass backward. ``result`` holds
    the reply's tensors (gradient w.r.t. ``hidden``, then ``prompts`` if
    given), on the host in the request's dtypes, once the last job has run.
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
        chunks = [(a, min(a + chunk, end)) for a in range(start, end, chunk)]
        self.groups = [
            _RowsBackward(
                span,
                chunks,
                hidden[rows],
                grad_output[rows],
                None if prompts is None else prompts[:, rows],
                adapter,
            )
            for rows in row_groups(hidden.shape[0], hidden.shape[1], span.prefill_chunk)
        ]
        self.dtypes = (hidden.dtype, None if prompts is None else prompts.dtype)
        self.result: tuple[Tensor, ...] | None = None

    def jobs(self) -> list[Callable[[], None]]:
        jobs = [job for group in self.groups for job in group.jobs()]
        # Joining the groups' gradients rides on the last job: one hop fewer.
        jobs[-1] = functools.partial(_in_turn, jobs[-1], self._finish)
        return jobs

    def _finish(self) -> None:
        hidden_dtype, prompts_dtype = self.dtypes
        wrt_hidden, wrt_prompts = [], []
        for group in self.groups:
            assert group.grad is not None
            wrt_hidden.append(group.grad[0])
            if group.grad[1] is not None:
                wrt_prompts.append(group.grad[1])
        replies = [to_wire(_join(wrt_hidden), hidden_dtype)]
        if prompts_dtype is not None:
            replies.append(to_wire(_join(wrt_prompts, dim=1), prompts_dtype))
        self.result = tuple(replies)


class _RowsBackward:
    """``ChunkedBackward``'s jobs for one group of rows."""

    def __init__(
        self,
        span: BlockSpan,
        chunks: list[tuple[int, int]],
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None,
        adapter: str | None,
    ) -> None:
        self.span = span
        self.chunks = chunks
        self.start = chunks[0][0]
        self.adapter = adapter
        self._received = (hidden, grad_output, prompts)  # as they came, cast on the worker
        self._prompts: Tensor | None = None
        self._grad: Tensor | None = None
        self._inputs: list[Tensor] = []  # the input of chunk i at index i
        self._grad_prompts: list[Tensor] = []  # from the last chunk back
        # (w.r.t. hidden, w.r.t. prompts or None) on the device, once done.
        self.grad: tuple[Tensor, Tensor | None] | None = None

    def jobs(self) -> list[Callable[[], None]]:
        n = len(self.chunks)
        forward = [functools.partial(self._forward, i) for i in range(n - 1)]
        backward = [functools.partial(self._backward, i) for i in reversed(range(n))]
        return forward + backward

    def _cast(self) -> None:
        if self._inputs:
            return
        hidden, grad, prompts = self._received
        self._inputs.append(input_on_span(hidden, self.span, "hidden states"))
        self._grad = input_on_span(grad, self.span, "output gradients")
        if prompts is not None:
            self._prompts = input_on_span(prompts, self.span, "deep prompts")

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
            prompts = torch.cat(self._grad_prompts[::-1]) if self._grad_prompts else None
            self.grad = (grad, prompts)


def _in_turn(first: Callable[[], None], then: Callable[[], None]) -> None:
    first()
    then()


def _join(parts: list[Tensor], dim: int = 0) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
