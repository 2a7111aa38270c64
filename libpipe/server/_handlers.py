"""The block server's RPCs (proto/RPC.md): validate, translate, queue.

Handlers turn wire messages into calls on the span and back: each request
is checked field by field (``_validate``) before any work is queued, inputs
are cast to the compute dtype and replies back to the request's dtype
(``cast_for_wire`` refuses an fp16 overflow with ``TensorOverflowError``);
both happen on the worker (``_compute.input_on_span``, which also refuses
NaN and infinities, and ``to_wire``).
Every error a handler raises ends only its own call or stream; the
connection layer sends it to that client with its kind.
"""

from __future__ import annotations

from typing import Any

import trio
from torch import Tensor

from .. import __version__
from ..errors import InvalidRequestError
from ..net import CallContext, ConnectionPool, Message, Router
from ..wire import PROTOCOL_VERSION
from . import _compute, _validate
from ._executor import Priority
from ._inference import InferenceHandler
from ._push import KnownServers
from ._serving import Serving

# Replies travel in fp16 unless the request came in another dtype (RPC.md).
WIRE_DTYPE = "float16"


class RpcHandlers:
    """The RPCs of one server; the inference stream lives in ``_inference``."""

    def __init__(
        self,
        serving: Serving,
        connections: ConnectionPool | None = None,
        known: KnownServers | None = None,
    ) -> None:
        self.s = serving
        # The server's pool: the inference handler pushes outputs through it,
        # to the servers ``known`` allows (its gossip view).
        self.connections = connections
        self.known = known

    def register(self, router: Router) -> None:
        # Answered from memory on the reader task: a ping then measures the
        # network and the RPC layer, not a task hand-off on a busy server.
        router.unary_inline("info", self.info)
        router.unary_inline("ping", self.ping)
        router.unary("forward", self.forward)
        router.unary("backward", self.backward)
        InferenceHandler(self.s, self.connections, self.known).register(router)

    # --- unary -----------------------------------------------------------------------

    def info(self, ctx: CallContext, msg: Message) -> Message:
        return Message(info_meta(self.s))

    def ping(self, ctx: CallContext, msg: Message) -> Message:
        return Message()

    async def forward(self, ctx: CallContext, msg: Message) -> Message:
        s = self.s
        start, end, adapter, (hidden,), prompts = self._bulk_request(msg, "forward", 1)
        plan = _compute.ChunkedForward(
            s.span,
            s.pool,
            hidden,
            start,
            end,
            chunk=s.config.forward_chunk,
            prompts=prompts,
            adapter=adapter,
        )
        with s.bulk_call(msg.tensors):
            # As backward's: every job ages from the call's arrival.
            since = trio.current_time()
            for job in plan.jobs():
                await s.executor.call(Priority.BULK, job, since=since)
        assert plan.result is not None
        return Message({}, (plan.result,))

    async def backward(self, ctx: CallContext, msg: Message) -> Message:
        s = self.s
        start, end, adapter, (hidden, grad), prompts = self._bulk_request(msg, "backward", 2)
        _validate.hidden_states(
            grad,
            s.hidden_size,
            name="output gradients",
            batch=hidden.shape[0],
            tokens=hidden.shape[1],
        )
        plan = _compute.ChunkedBackward(
            s.span,
            hidden,
            grad,
            start,
            end,
            chunk=s.config.backward_chunk,
            prompts=prompts,
            adapter=adapter,
        )
        with s.bulk_call(msg.tensors):
            # Every job of the call ages from its arrival: past max_wait each
            # goes first again, so a chunked backward is not starved by decoding.
            since = trio.current_time()
            for job in plan.jobs():
                await s.executor.call(Priority.BULK, job, since=since)
        assert plan.result is not None
        return Message({}, plan.result)

    # --- helpers ---------------------------------------------------------------------------

    def _bulk_request(
        self, msg: Message, method: str, inputs: int
    ) -> tuple[int, int, str | None, tuple[Tensor, ...], Tensor | None]:
        """What forward and backward share: admission, blocks, adapter, and
        ``inputs`` tensors (the first one the hidden states) then optional
        deep prompts, checked (the rest of the inputs are the caller's)."""
        s = self.s
        s.admit(f"{method} calls")
        start, end = s.sub_span(msg.meta)
        adapter = s.adapter(msg.meta)
        _validate.tensor_count(msg.tensors, (inputs, inputs + 1), method)
        self._check_hidden(msg.tensors[0])
        prompts = self._prompts(msg.tensors[inputs:], end - start, msg.tensors[0])
        return start, end, adapter, msg.tensors[:inputs], prompts

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
