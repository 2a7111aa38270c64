"""The ``inference`` stream (proto/RPC.md): one client's session on this span.

A session holds KV cache from the pool for its whole life, so everything
here is about giving it back: on the client's close, on an idle timeout,
on any error, and when the server drains.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import trio
from torch import Tensor

from ..errors import InvalidRequestError, LibpipeError, SessionError, sole_error
from ..model import InferenceSession
from ..net import CallContext, ConnectionPool, Message, Router, Stream, short_peer_id
from . import _compute, _validate
from ._executor import Priority
from ._push import KnownServers, PushTable, PushTarget, StepInputs, push
from ._serving import Serving

logger = logging.getLogger("libpipe.server")


class InferenceHandler:
    """The ``inference`` stream and the ``push`` RPC that feeds it.

    ``connections``: the server's pool, for pushing outputs to the next
    hop's server (None: this server never pushes; the client then sends
    every input itself). ``known``: the servers it may push to (None: any
    target a client names)."""

    def __init__(
        self,
        serving: Serving,
        connections: ConnectionPool | None = None,
        known: KnownServers | None = None,
    ) -> None:
        self.s = serving
        self.connections = connections
        self.known = known
        self.pushes = PushTable()

    def register(self, router: Router) -> None:
        router.stream("inference", self.inference)
        router.unary_inline("push", self.pushes.push)

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
            inputs = StepInputs(batch, s.hidden_size)
            inputs.wake = functools.partial(stream.deliver_nowait, _PUSH_WAKE)
            token = self.pushes.open(inputs)
            try:
                await self._reply(stream, Message({"position": 0, "push_token": token}))
                await self._serve(session, stream, inputs)
            finally:
                self.pushes.close(token)
                session.close()
                logger.info(
                    "session %d of %s closed at position %d", entry.id, entry.peer, session.position
                )

    async def _serve(self, session: InferenceSession, stream: Stream, inputs: StepInputs) -> None:
        """Run steps as their inputs arrive, until the client half-closes."""
        client = _ClientDeadline(self.s.config.idle_timeout)
        with client.scope:
            await self._serve_steps(session, stream, inputs, client)
        if client.scope.cancelled_caught:
            raise client.expired()

    async def _serve_steps(
        self, session: InferenceSession, stream: Stream, inputs: StepInputs, client: _ClientDeadline
    ) -> None:
        held: Message | None = None  # read in the turn a push came: runs after it
        while True:
            request = inputs.take_ready()
            if request is None:
                if held is not None:
                    item: object = held
                    held = None
                else:
                    item = await _next_arrival(stream, client)
                if item is _CLIENT_CLOSED:
                    return
                if item is _PUSH_ARRIVED:
                    continue
                assert isinstance(item, Message)
                if inputs.ready is not None:
                    held = item
                    continue
                request = inputs.arrive(item)
                if request is None:
                    continue
            meta = request.meta
            step = _validate.optional_int(meta, "step")
            try:
                target = PushTarget.from_meta(meta)
                reply = await self._step(session, request, step)
            except LibpipeError as exc:
                # The client tells a failed step from a stale one (a step
                # it gave up) by this id.
                if step is not None:
                    exc.details.setdefault("step", step)
                raise
            if target is None:
                await client.send(stream, reply)
            else:
                await self._reply_and_push(stream, reply, target, step, client)

    async def _reply_and_push(
        self,
        stream: Stream,
        reply: Message,
        target: PushTarget,
        step: int | None,
        client: _ClientDeadline,
    ) -> None:
        """Push the output on (the next hop waits for it) and answer the
        client at once; the client hears more only if the push failed
        (``{"step", "pushed": false}``), and then sends the input itself.
        Answering before the push is acknowledged keeps the server-to-
        server round trip off the client's path."""
        refused = None if self.known is None else self.known.refusal(target)
        if refused is not None:
            logger.info("push refused, not dialed: %s", refused)
            await client.send(stream, reply)
            refusal: dict[str, object] = {"pushed": False, "refused": refused.kind}
            refusal["reason"] = str(refused)
            if step is not None:
                refusal["step"] = step
            await client.send(stream, Message(refusal))
            return
        outcome: list[bool] = []
        # Set as the push's frame goes out (or the push gave up first). The
        # reply waits for it: the next hop, on the client's critical path,
        # should not wait behind a send to the client, which on a busy host
        # can also hand the CPU to the client woken by it.
        sending = trio.Event()

        async def push_on() -> None:
            try:
                outcome.append(await push(self.connections, target, reply.tensors[0], sending.set))
            finally:
                sending.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(push_on)
                await sending.wait()
                await client.send(stream, reply)
        except BaseExceptionGroup as group:
            sole = sole_error(group)
            if sole is group:
                raise
            raise sole from None
        if not outcome[0]:
            notice: dict[str, object] = {"pushed": False}
            if step is not None:
                notice["step"] = step
            await client.send(stream, Message(notice))

    async def _reply(self, stream: Stream, reply: Message) -> None:
        """Send within the idle timeout: a client that stops reading must
        not hold its cache forever (the send would wait on TCP for ever)."""
        client = _ClientDeadline(self.s.config.idle_timeout)
        with client.scope:
            await client.send(stream, reply)
        if client.scope.cancelled_caught:
            raise client.expired()

    async def _step(self, session: InferenceSession, msg: Message, step: int | None) -> Message:
        s = self.s
        position = _validate.meta_int(msg.meta, "position", minimum=0)
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


_CLIENT_CLOSED = object()
_PUSH_ARRIVED = object()
# Put in a session's inbox by a push that makes its announced step ready
# (``StepInputs.wake``), so that the handler, waiting for its client's next
# message, wakes to run it. Waiting for either source takes no second task,
# and no cancel scope per wait: cancelling the wait instead cost about as
# much again as the wake itself, once per forwarded hop per step. A wake
# that finds the handler already woken by a client message stays queued
# and is read later as a push with nothing ready, which runs nothing; one
# that finds the inbox full is dropped, and the handler, with messages to
# read, is not waiting anyway.
_PUSH_WAKE = Message({"push_wake": True})


class _ClientDeadline:
    """The idle timeout over one session's waits on its client: for its
    next message, and for it to take a reply (a client that stops reading
    must not hold its cache forever: the send would wait on TCP for ever).

    One cancel scope around the session whose deadline is moved to each
    wait and lifted after it, rather than a scope per wait: a decode step
    passes here twice per hop, and moving a deadline costs a fraction of
    entering and leaving a scope. Compute between the waits runs with no
    deadline, as before."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope()
        self.sending = False  # what the deadline bounds now: a send, or an arrival

    def start(self, *, sending: bool) -> None:
        self.sending = sending
        self.scope.deadline = trio.current_time() + self.timeout

    def stop(self) -> None:
        self.scope.deadline = math.inf

    async def send(self, stream: Stream, reply: Message) -> None:
        self.start(sending=True)
        await stream.send(reply.meta, reply.tensors)
        self.stop()

    def expired(self) -> SessionError:
        """The error of the wait whose deadline passed."""
        if self.sending:
            return SessionError(
                f"the client took no reply for {self.timeout:g} s; the session's cache is freed",
                idle_timeout=self.timeout,
            )
        return self.idle()

    def idle(self) -> SessionError:
        return SessionError(
            f"session idle for {self.timeout:g} s; its cache is freed", idle_timeout=self.timeout
        )


async def _next_arrival(stream: Stream, client: _ClientDeadline) -> object:
    """The client's next message, ``_CLIENT_CLOSED``, or, while a step waits
    for its push, ``_PUSH_ARRIVED`` if the push comes first."""
    client.start(sending=False)
    try:
        item = await stream.receive()
    except trio.EndOfChannel:
        return _CLIENT_CLOSED
    finally:
        client.stop()
    return _PUSH_ARRIVED if item is _PUSH_WAKE else item


def _prefill_job(session: InferenceSession, hidden: Tensor) -> Tensor:
    out = session.step(_compute.to_span(hidden, session.span))
    return _compute.to_wire(out, hidden.dtype)
