"""The block server's RPCs (proto/RPC.md): validate, translate, queue.

Handlers turn wire messages into calls on the span and back: each request
is checked field by field (``_validate``) before any work is queued, inputs
are cast to the compute dtype and replies back to the request's dtype
(``cast_for_wire`` refuses an fp16 overflow with ``TensorOverflowError``);
both happen on the worker (``_compute.to_span``, ``to_wire``).
Every error a handler raises ends only its own call or stream; the
connection layer sends it to that client with its kind.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from torch import Tensor

from .. import __version__
from ..errors import DrainingError, InvalidRequestError, SessionError
from ..model import BlockSpan, InferenceSession, KVCachePool
from ..net import CallContext, Message, Router, Stream, short_peer_id
from ..swarm import RecordState
from ..wire import PROTOCOL_VERSION
from . import _compute, _validate
from ._config import ServerConfig
from ._executor import Executor, Priority
from ._sessions import SessionTable
from ._throughput import Throughput

logger = logging.getLogger("libpipe.server")

# Replies travel in fp16 unless the request came in another dtype (RPC.md).
WIRE_DTYPE = "float16"


@dataclass(eq=False)
class Serving:
    """Everything the handlers share: one per running server."""

    config: ServerConfig
    span: BlockSpan
    pool: KVCachePool
    executor: Executor
    sessions: SessionTable
    peer_id: str
    throughput: Throughput
    max_length: int
    state: RecordState = RecordState.JOINING
    # Spans this server held before it moved (server/_rebalance.py).
    retired: list[tuple[int, int]] = field(default_factory=list)

    @property
    def blocks(self) -> tuple[int, int]:
        return (self.span.start, self.span.end)

    def sub_span(self, meta: dict[str, Any]) -> tuple[int, int]:
        """The blocks a request asks for, within our span. Blocks we moved away
        from are ``DrainingError`` (RPC.md): the client's view is older than the
        move, and it re-routes instead of taking the request for a bad one."""
        try:
            return _validate.sub_span(meta, self.blocks)
        except InvalidRequestError as exc:
            start, end = exc.details.get("start"), exc.details.get("end")
            if start is not None and any(a <= start < end <= b for a, b in self.retired):
                raise DrainingError(
                    f"this server moved from blocks {start}:{end} to {self.blocks[0]}:{self.blocks[1]}",
                    start=start,
                    end=end,
                    span=list(self.blocks),
                ) from None
            raise

    @property
    def dtype_name(self) -> str:
        return str(self.span.dtype).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        return self.span.config.hidden_size

    def admit(self, what: str) -> None:
        if self.state is RecordState.DRAINING:
            raise DrainingError(f"this server is draining and takes no new {what}")


class RpcHandlers:
    def __init__(self, serving: Serving) -> None:
        self.s = serving

    def register(self, router: Router) -> None:
        router.unary("info", self.info)
        router.unary("ping", self.ping)
        router.unary("forward", self.forward)
        router.unary("backward", self.backward)
        router.stream("inference", self.inference)

    # --- unary -----------------------------------------------------------------------

    async def info(self, ctx: CallContext, msg: Message) -> Message:
        return Message(info_meta(self.s))

    async def ping(self, ctx: CallContext, msg: Message) -> Message:
        return Message()

    async def forward(self, ctx: CallContext, msg: Message) -> Message:
        s = self.s
        s.admit("forward calls")
        start, end = s.sub_span(msg.meta)
        adapter = self._adapter(msg.meta)
        _validate.tensor_count(msg.tensors, (1, 2), "forward")
        hidden = msg.tensors[0]
        self._check_hidden(hidden)
        prompts = self._prompts(msg.tensors[1:], end - start, hidden)
        job = functools.partial(_forward_job, s.span, s.pool, hidden, start, end, prompts, adapter)
        with s.sessions.call():
            out = await s.executor.call(Priority.BULK, job)
        return Message({}, (out,))

    async def backward(self, ctx: CallContext, msg: Message) -> Message:
        s = self.s
        s.admit("backward calls")
        start, end = s.sub_span(msg.meta)
        adapter = self._adapter(msg.meta)
        _validate.tensor_count(msg.tensors, (2, 3), "backward")
        hidden, grad = msg.tensors[0], msg.tensors[1]
        self._check_hidden(hidden)
        _validate.hidden_states(
            grad,
            s.hidden_size,
            name="output gradients",
            batch=hidden.shape[0],
            tokens=hidden.shape[1],
        )
        prompts = self._prompts(msg.tensors[2:], end - start, hidden)
        job = functools.partial(_backward_job, s.span, hidden, grad, start, end, prompts, adapter)
        with s.sessions.call():
            grads = await s.executor.call(Priority.BULK, job)
        return Message({}, grads)

    # --- inference stream --------------------------------------------------------------

    async def inference(self, ctx: CallContext, stream: Stream) -> None:
        s = self.s
        meta = stream.opening.meta
        s.admit("sessions")
        start, end = s.sub_span(meta)
        batch = _validate.meta_int(meta, "batch", minimum=1)
        max_length = _validate.meta_int(meta, "max_length", minimum=1)
        if max_length > s.max_length:
            raise InvalidRequestError(
                f"max_length {max_length} is over this server's {s.max_length}",
                max_length=max_length,
                limit=s.max_length,
            )
        adapter = self._adapter(meta)
        _validate.tensor_count(stream.opening.tensors, (0,), "opening a session")
        with s.sessions.session(short_peer_id(ctx.peer_id)) as entry:
            session = s.span.open_session(
                s.pool, batch=batch, max_length=max_length, start=start, end=end, adapter=adapter
            )
            logger.info(
                "session %d opened by %s: blocks %d:%d batch %d max_length %d",
                entry.id, entry.peer, start, end, batch, max_length,
            )  # fmt: skip
            try:
                await stream.send({"position": 0})
                while True:
                    with trio.move_on_after(s.config.idle_timeout) as idle:
                        try:
                            request = await stream.receive()
                        except trio.EndOfChannel:
                            return
                    if idle.cancelled_caught:
                        raise SessionError(
                            f"session idle for {s.config.idle_timeout:g} s; its cache is freed",
                            idle_timeout=s.config.idle_timeout,
                        )
                    reply = await self._step(session, request)
                    await stream.send(reply.meta, reply.tensors)
            finally:
                session.close()
                logger.info(
                    "session %d of %s closed at position %d", entry.id, entry.peer, session.position
                )

    async def _step(self, session: InferenceSession, msg: Message) -> Message:
        s = self.s
        position = _validate.meta_int(msg.meta, "position", minimum=0)
        step = _validate.optional_int(msg.meta, "step")
        _validate.tensor_count(msg.tensors, (1,), "an inference step")
        hidden = msg.tensors[0]
        _validate.hidden_states(hidden, s.hidden_size, batch=session.cache.batch)
        t = hidden.shape[1]
        if position > session.position:
            raise InvalidRequestError(
                f"step at position {position} but the session is at {session.position}",
                position=position,
                current=session.position,
            )
        if position + t > session.max_length:
            raise InvalidRequestError(
                f"{t} positions from {position} pass the session's max_length {session.max_length}",
                position=position,
                tokens=t,
                max_length=session.max_length,
            )
        if position < session.position:
            session.rollback(position)
        if t == 1:
            out = await s.executor.decode(session, hidden)
        else:
            out = await self._prefill(session, hidden)
        reply: dict[str, Any] = {"position": session.position}
        if step is not None:
            reply["step"] = step
        return Message(reply, (out,))

    async def _prefill(self, session: InferenceSession, hidden: Tensor) -> Tensor:
        # One job per chunk, so decode steps of other sessions slip in
        # between the chunks of a long prompt instead of waiting for all of it.
        chunk = self.s.span.prefill_chunk
        outs = []
        for c in range(0, hidden.shape[1], chunk):
            job = functools.partial(_prefill_job, session, hidden[:, c : c + chunk])
            outs.append(await self.s.executor.call(Priority.PREFILL, job))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    # --- helpers ---------------------------------------------------------------------------

    def _adapter(self, meta: dict[str, Any]) -> str | None:
        _validate.check_adapter(meta, tuple(self.s.span.adapters))
        return meta.get("adapter") or None

    def _check_hidden(self, hidden: Tensor) -> None:
        _validate.hidden_states(hidden, self.s.hidden_size)
        if hidden.shape[1] > self.s.max_length:
            raise InvalidRequestError(
                f"{hidden.shape[1]} tokens are more than this server's max_length {self.s.max_length}"
            )

    def _prompts(self, rest: tuple[Tensor, ...], n_blocks: int, hidden: Tensor) -> Tensor | None:
        if not rest:
            return None
        prompts = rest[0]
        _validate.deep_prompts(
            prompts, n_blocks, hidden.shape[0], hidden.shape[1], self.s.hidden_size
        )
        return prompts


def info_meta(s: Serving) -> dict[str, Any]:
    cfg = s.span.config
    n_blocks = s.span.end - s.span.start
    return {
        "peer_id": s.peer_id,
        "model_id": cfg.model_id,
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "span": list(s.blocks),
        "num_blocks": cfg.num_hidden_layers,
        "dtype": s.dtype_name,
        "wire_dtype": WIRE_DTYPE,
        "device": str(s.span.device),
        "state": s.state.value,
        "max_length": s.max_length,
        "cache_bytes_total": s.pool.budget_bytes,
        "cache_bytes_free": s.pool.free_bytes,
        "cache_bytes_per_token": cfg.kv_bytes_per_token(n_blocks, s.span.dtype.itemsize),
        "throughput_decode": s.throughput.decode,
        "throughput_forward": s.throughput.forward,
        "active_sessions": len(s.sessions),
        "adapters": sorted(s.span.adapters),
    }


def _prefill_job(session: InferenceSession, hidden: Tensor) -> Tensor:
    out = session.step(_compute.to_span(hidden, session.span))
    return _compute.to_wire(out, hidden.dtype)


def _forward_job(
    span: BlockSpan,
    pool: KVCachePool,
    hidden: Tensor,
    start: int,
    end: int,
    prompts: Tensor | None,
    adapter: str | None,
) -> Tensor:
    # Casts run here, on the worker, not on the event loop: bulk inputs are big.
    x = _compute.to_span(hidden, span)
    p = None if prompts is None else _compute.to_span(prompts, span)
    out = _compute.forward(span, pool, x, start, end, prompts=p, adapter=adapter)
    return _compute.to_wire(out, hidden.dtype)


def _backward_job(
    span: BlockSpan,
    hidden: Tensor,
    grad: Tensor,
    start: int,
    end: int,
    prompts: Tensor | None,
    adapter: str | None,
) -> tuple[Tensor, ...]:
    x, g = _compute.to_span(hidden, span), _compute.to_span(grad, span)
    p = None if prompts is None else _compute.to_span(prompts, span)
    grads = _compute.backward(span, x, g, start, end, prompts=p, adapter=adapter)
    dtypes = [hidden.dtype] + ([] if prompts is None else [prompts.dtype])
    return tuple(_compute.to_wire(gr, dt) for gr, dt in zip(grads, dtypes, strict=True))
