"""The ``inference`` stream (proto/RPC.md): one client's session on this span.

A session holds KV cache from the pool for its whole life, so everything
here is about giving it back: on the client's close, on an idle timeout,
on any error, and when the server drains.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import trio
from torch import Tensor

from ..errors import InvalidRequestError, SessionError
from ..model import InferenceSession
from ..net import CallContext, Message, Stream, short_peer_id
from . import _compute, _validate
from ._executor import Priority
from ._serving import Serving

logger = logging.getLogger("libpipe.server")


class InferenceHandler:
    def __init__(self, serving: Serving) -> None:
        self.s = serving

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
        adapter = s.adapter(meta)
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


def _prefill_job(session: InferenceSession, hidden: Tensor) -> Tensor:
    out = session.step(_compute.to_span(hidden, session.span))
    return _compute.to_wire(out, hidden.dtype)
