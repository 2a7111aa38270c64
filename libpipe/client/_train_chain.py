"""Forward and backward through frozen remote blocks, for training.

Theory of operation. ``forward`` sends the hidden states hop by hop with
bulk ``forward`` calls, as ``forward_span`` does, and keeps what it sent
to each hop (a ``Segment``: the hop's blocks and its inputs, exactly as
they went on the wire). ``backward`` walks the segments in reverse and
asks a server holding each segment's blocks for ``backward`` with the kept
inputs and the gradient of the segment's outputs; the server recomputes
its forward and answers the gradient of its inputs (and of the deep
prompts). Servers keep nothing between the two passes, so any replica can
answer a segment's backward, not only the one that ran its forward.

Failures: a hop that fails in ``forward`` is banned and the blocks from its
start are routed again and recomputed from its kept input. A segment whose
``backward`` fails is routed again; when the new route splits the segment
over several servers, the inputs of the inner hops are recomputed with
``forward`` calls from the segment's kept input before their backwards.
Either way the numbers are those of a fault-free step.

Micro-batching: a request must fit the wire's frame limit
(``Limits.max_payload_bytes``), and ``backward`` sends the most (inputs,
gradient, prompts). The batch is split by rows so that every ``backward``
request fits; the pieces run concurrently and, with throughput routing and
the load map, spread over replicas. ``forward`` and ``backward`` use the
same pieces, so each piece's segments are its own.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch
import trio
from torch import Tensor

from ..errors import InvalidRequestError, LibpipeError, RemoteError
from ..wire import Limits, cast_for_wire
from ._bulk import call_hop
from ._context import SwarmContext, hop_error, same_on_every_server
from ._failover import FailureLedger
from ._hidden import check_finite_answer, check_hidden
from ._routing import PlannedHop
from ._train_routing import AdapterDirectory, plan_training_route

# Room left in a frame for metadata and tensor headers (they take well
# under a kilobyte; the metadata limit itself is separate).
_FRAME_HEADROOM = 64 << 10


@dataclass(frozen=True)
class Segment:
    """One hop of a forward pass: blocks ``[start, end)`` and their inputs."""

    start: int
    end: int
    inputs: Tensor  # [b, T, H], in the wire dtype, as sent


@dataclass(frozen=True)
class Piece:
    """One micro-batch's forward: its rows of the batch and its segments."""

    rows: slice
    segments: tuple[Segment, ...]


class TrainChain:
    """Forward/backward of blocks ``[start, end)`` through the swarm.

    ``max_request_bytes`` bounds one request (defaults to the wire's frame
    limit); ``max_rows`` bounds the sequences of one request, to spread even
    a batch that fits one frame over replicas; ``adapter`` names a LoRA
    adapter the servers must have."""

    def __init__(
        self,
        ctx: SwarmContext,
        *,
        start: int = 0,
        end: int | None = None,
        adapter: str | None = None,
        max_request_bytes: int | None = None,
        max_rows: int | None = None,
        directory: AdapterDirectory | None = None,
    ) -> None:
        end = ctx.num_blocks if end is None else end
        if not 0 <= start < end <= ctx.num_blocks:
            raise InvalidRequestError(
                f"blocks [{start}, {end}) are not within the model's {ctx.num_blocks}"
            )
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise InvalidRequestError(f"adapter must be a non-empty name, got {adapter!r}")
        limit = Limits().max_payload_bytes if max_request_bytes is None else max_request_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise InvalidRequestError(f"max_request_bytes must be a positive int, got {limit!r}")
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows <= 0
        ):
            raise InvalidRequestError(f"max_rows must be a positive int, got {max_rows!r}")
        self.ctx = ctx
        self.start, self.end = start, end
        self.max_rows = max_rows
        self.adapter = adapter
        self.max_request_bytes = min(limit, Limits().max_payload_bytes - _FRAME_HEADROOM)
        self.directory = directory or AdapterDirectory()
        # Tensor payload bytes of requests and replies, for benchmarks.
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- the two passes --------------------------------------------------------------

    async def forward(
        self, hidden: Tensor, prompts: Tensor | None = None
    ) -> tuple[Tensor, tuple[Piece, ...]]:
        """``hidden: [B, T, H]`` (``prompts: [end - start, B, P, H]``) through
        the blocks; returns the outputs (dtype of ``hidden``) and what
        ``backward`` needs."""
        self._check(hidden, prompts)
        x = self._to_wire(hidden)
        p = None if prompts is None else self._to_wire(prompts)
        rows = self.micro_batches(x.shape[0], x.shape[1], 0 if p is None else p.shape[2])
        outputs: list[Tensor | None] = [None] * len(rows)
        pieces: list[Piece | None] = [None] * len(rows)

        async def run(n: int, r: slice) -> None:
            outputs[n], segments = await self._forward_piece(x[r], _rows(p, r))
            pieces[n] = Piece(r, segments)

        await _concurrently([functools.partial(run, n, r) for n, r in enumerate(rows)])
        out = torch.cat([o for o in outputs if o is not None], dim=0)
        return out.to(hidden.device, hidden.dtype), tuple(pc for pc in pieces if pc is not None)

    async def backward(
        self,
        pieces: Sequence[Piece],
        grad_output: Tensor,
        prompts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Gradients w.r.t. the inputs of ``forward`` (and its prompts), given
        the gradient w.r.t. its outputs."""
        g = self._to_wire(grad_output)
        p = None if prompts is None else self._to_wire(prompts)
        grads: list[tuple[Tensor, Tensor | None] | None] = [None] * len(pieces)

        async def run(n: int, piece: Piece) -> None:
            grads[n] = await self._backward_piece(piece, g[piece.rows], _rows(p, piece.rows))

        await _concurrently([functools.partial(run, n, piece) for n, piece in enumerate(pieces)])
        done = [gr for gr in grads if gr is not None]
        grad_in = torch.cat([gr[0] for gr in done], dim=0).to(grad_output.device, grad_output.dtype)
        if prompts is None:
            return grad_in, None
        grad_p = torch.cat([gr[1] for gr in done if gr[1] is not None], dim=1)
        return grad_in, grad_p.to(prompts.device, prompts.dtype)

    def micro_batches(self, batch: int, tokens: int, prefix: int) -> list[slice]:
        """Rows per request so that a ``backward`` request (inputs, gradient,
        prompts of the longest hop) fits ``max_request_bytes``, and at most
        ``max_rows`` rows."""
        size = torch.empty((), dtype=self.ctx.wire_dtype).element_size()
        per_row = (2 * tokens + (self.end - self.start) * prefix) * self.ctx.hidden_size * size
        rows = self.max_request_bytes // per_row
        if rows == 0:
            raise InvalidRequestError(
                f"one sequence of {tokens} tokens needs {per_row} bytes per request, over "
                f"the limit of {self.max_request_bytes}; send shorter sequences"
            )
        if self.max_rows is not None:
            rows = min(rows, self.max_rows)
        count = math.ceil(batch / rows)
        # Even pieces: rows of each within one of the others.
        bounds = [round(i * batch / count) for i in range(count + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    # --- one micro-batch -------------------------------------------------------------

    async def _forward_piece(
        self, x: Tensor, prompts: Tensor | None
    ) -> tuple[Tensor, tuple[Segment, ...]]:
        ledger = FailureLedger(self.ctx.policy, f"training forward over [{self.start}, {self.end})")
        segments: list[Segment] = []
        block = self.start
        while block < self.end:
            plan = await self._plan(ledger, block, self.end, x)
            for hop in plan:
                try:
                    (y,) = await self._call(hop, "forward", x, None, prompts)
                except Exception as exc:
                    await self._failed(ledger, hop, exc)
                    break
                segments.append(Segment(hop.start, hop.end, x))
                x, block = y, hop.end
        return x, tuple(segments)

    async def _backward_piece(
        self, piece: Piece, grad: Tensor, prompts: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        ledger = FailureLedger(
            self.ctx.policy, f"training backward over [{self.start}, {self.end})"
        )
        grad_prompts: list[Tensor] = []
        for segment in reversed(piece.segments):
            grad, gp = await self._backward_segment(ledger, segment, grad, prompts)
            if gp is not None:
                grad_prompts.append(gp)
        if prompts is None:
            return grad, None
        return grad, torch.cat(grad_prompts[::-1], dim=0)

    async def _backward_segment(
        self, ledger: FailureLedger, segment: Segment, grad: Tensor, prompts: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        while True:
            plan = await self._plan(ledger, segment.start, segment.end, segment.inputs)
            hop = plan[0]
            try:
                inputs = [segment.inputs]
                for hop in plan[:-1]:
                    (y,) = await self._call(hop, "forward", inputs[-1], None, prompts)
                    inputs.append(y)
                g, grad_prompts = grad, []
                for hop, x in zip(reversed(plan), reversed(inputs), strict=True):
                    g, *gp = await self._call(hop, "backward", x, g, prompts)
                    grad_prompts[:0] = gp
            except Exception as exc:
                await self._failed(ledger, hop, exc)
                continue
            return g, (torch.cat(grad_prompts, dim=0) if grad_prompts else None)

    # --- plumbing ----------------------------------------------------------------------

    async def _plan(
        self, ledger: FailureLedger, start: int, end: int, x: Tensor
    ) -> list[PlannedHop]:
        return await plan_training_route(
            self.ctx,
            ledger,
            self.directory,
            start=start,
            end=end,
            adapter=self.adapter,
            tokens=x.shape[0] * x.shape[1],
        )

    async def _failed(self, ledger: FailureLedger, hop: PlannedHop, exc: Exception) -> None:
        """Ban the hop's server and count the failure, or re-raise what is not
        the server's fault: a request it calls invalid or values that overflow
        the wire dtype would fail the same on every server."""
        error = hop_error(exc)
        if error is None:
            raise exc
        if same_on_every_server(error):
            raise error
        self.ctx.view.ban(hop.peer_id, str(error))
        self.directory.forget(hop.peer_id)
        await ledger.record(hop.describe(), error)

    async def _call(
        self,
        hop: PlannedHop,
        method: str,
        x: Tensor,
        grad: Tensor | None,
        prompts: Tensor | None,
    ) -> tuple[Tensor, ...]:
        """One ``forward`` or ``backward`` of ``hop``'s blocks, counted in the
        load map while in flight; replies checked for count and shape."""
        tensors = [x] if grad is None else [x, grad]
        expect = [x.shape]
        if prompts is not None:
            hop_prompts = prompts[hop.start - self.start : hop.end - self.start].contiguous()
            tensors.append(hop_prompts)
            if method == "backward":
                expect.append(hop_prompts.shape)
        meta: dict[str, object] = {"start": hop.start, "end": hop.end}
        if self.adapter is not None:
            meta["adapter"] = self.adapter
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        reply = await call_hop(
            self.ctx, hop, method, meta, tensors, weight=float(x.shape[0] * x.shape[1])
        )
        self.bytes_received += sum(t.numel() * t.element_size() for t in reply.tensors)
        got = [t.shape for t in reply.tensors]
        if got != expect:
            raise RemoteError(
                f"{method} on {hop.describe()} answered shapes {[list(s) for s in got]}, "
                f"expected {[list(s) for s in expect]}"
            )
        for t in reply.tensors:
            check_finite_answer(t, f"{method} on {hop.describe()}")
        self.ctx.view.answered(hop.peer_id)
        return tuple(t.to(self.ctx.wire_dtype) for t in reply.tensors)

    def _to_wire(self, t: Tensor) -> Tensor:
        # The wire carries host memory; a client computing on a GPU gets its
        # results back on the device it sent from.
        # Casting down to fp16 must not turn values into infinities.
        return cast_for_wire(t.detach().cpu(), self.ctx.wire_dtype).contiguous()

    def _check(self, hidden: Tensor, prompts: Tensor | None) -> None:
        h = self.ctx.hidden_size
        check_hidden(hidden, h)
        if prompts is None:
            return
        blocks, (b, t, _) = self.end - self.start, hidden.shape
        if (
            not isinstance(prompts, Tensor)
            or not prompts.dtype.is_floating_point
            or prompts.dim() != 4
            or tuple(prompts.shape[:2]) != (blocks, b)
            or not 0 < prompts.shape[2] <= t
            or prompts.shape[3] != h
        ):
            shape = list(prompts.shape) if isinstance(prompts, Tensor) else type(prompts).__name__
            raise InvalidRequestError(
                f"deep prompts must be [{blocks}, {b}, P, {h}] with 0 < P <= {t}, got {shape}"
            )


async def _concurrently(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` at once; a failure comes out as itself, not in a group
    (the first one that is ours, when pieces fail alike)."""
    if len(jobs) == 1:
        await jobs[0]()
        return
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        ours = group.subgroup(lambda e: isinstance(e, LibpipeError))
        if ours is None:
            raise
        first: BaseException = ours
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _rows(prompts: Tensor | None, rows: slice) -> Tensor | None:
    # prompts: [blocks, B, P, H] -> the rows of one micro-batch
    return None if prompts is None else prompts[:, rows].contiguous()
