"""Bulk work over a span of blocks: ``forward`` (and ``backward`` for
fine-tuning), stateless on the servers, spread over replicas.

Routes use the "throughput" objective: each server's cost is its bulk
time per token scaled by the calls already in flight there
(``SwarmContext.load``), randomised among near-equal choices, so concurrent calls fan out
over replicas in proportion to their throughput.

Failover is simpler than for sessions because nothing is cached: a hop
that fails is banned, and blocks from its start are routed again and
recomputed from its input, within the ``FailureLedger``'s bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
from torch import Tensor

from ..errors import ConfigError, InvalidRequestError, RemoteError
from ..net import Message
from ..wire import cast_for_wire
from ._context import SwarmContext, hop_error, same_on_every_server
from ._failover import FailureLedger
from ._hidden import check_finite_answer, check_hidden
from ._routing import PlannedHop
from ._train_routing import AdapterDirectory, plan_training_route


async def call_hop(
    ctx: SwarmContext,
    hop: PlannedHop,
    method: str,
    meta: dict[str, Any],
    tensors: Sequence[Tensor],
    *,
    weight: float = 1.0,
) -> Message:
    """One unary ``method`` on one hop, counted in the load map (by
    ``weight``) while in flight, within the policy's step timeout. Raises the
    hop's failure as a ``LibpipeError``; the caller checks the reply."""
    ctx.load[hop.peer_id] += weight
    try:
        with trio.fail_after(ctx.policy.step_timeout):
            connection = await ctx.connect(hop.server)
            reply = await connection.call(method, meta, tuple(tensors))
    except BaseException as exc:
        error = hop_error(exc)
        if error is None:
            raise
        raise error from None
    finally:
        ctx.load[hop.peer_id] -= weight
        if ctx.load[hop.peer_id] <= 0:
            del ctx.load[hop.peer_id]
    return reply


async def forward_hop(
    ctx: SwarmContext, hop: PlannedHop, x: Tensor, adapter: str | None = None
) -> Tensor:
    """``x`` through one hop's blocks (with ``adapter``), the reply's shape checked."""
    meta: dict[str, Any] = {"start": hop.start, "end": hop.end}
    if adapter is not None:
        meta["adapter"] = adapter
    reply = await call_hop(ctx, hop, "forward", meta, (x,))
    if not reply.tensors or reply.tensors[0].shape != x.shape:
        raise RemoteError(
            f"forward on {hop.describe()} answered {[list(t.shape) for t in reply.tensors]}, "
            f"expected one tensor shaped {list(x.shape)}"
        )
    out = check_finite_answer(reply.tensors[0], f"forward on {hop.describe()}")
    ctx.view.answered(hop.peer_id)
    return out.to(x.dtype)


async def forward_span(
    ctx: SwarmContext,
    hidden: Tensor,
    *,
    start: int = 0,
    end: int | None = None,
    adapter: str | None = None,
) -> Tensor:
    """``hidden: [B, T, H]`` through blocks ``[start, end)`` (default: to
    the last block), spread over replicas, failed hops recomputed elsewhere.
    With ``adapter``, only over servers that loaded that LoRA adapter."""
    end = ctx.num_blocks if end is None else end
    if not 0 <= start < end <= ctx.num_blocks:
        raise InvalidRequestError(
            f"blocks [{start}, {end}) are not within the model's {ctx.num_blocks}"
        )
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise ConfigError(f"adapter must be a non-empty string or None, got {adapter!r}")
    check_hidden(hidden, ctx.hidden_size)
    x = cast_for_wire(hidden, ctx.wire_dtype).contiguous()
    ledger = FailureLedger(ctx.policy, f"forward over blocks [{start}, {end})")
    adapters = AdapterDirectory()
    block = start
    while block < end:
        plan = await plan_training_route(
            ctx,
            ledger,
            adapters,
            start=block,
            end=end,
            adapter=adapter,
            tokens=x.shape[0] * x.shape[1],
        )
        for hop in plan:
            try:
                x = await forward_hop(ctx, hop, x, adapter)
            except Exception as exc:
                error = hop_error(exc)
                if error is None:
                    raise
                if same_on_every_server(error):
                    raise error from None
                ctx.view.ban(hop.peer_id, str(error))
                await ledger.record(hop.describe(), error)
                break
            block = hop.end
    return x
