"""A multi-hop inference session that survives its servers.

Theory of operation. A session holds one ``inference`` stream per hop of
its route; the hops cover blocks ``[0, L)``. Every hop keeps every input it
was sent (its *history*, positions ``0 .. position``), so that any hop can
be rebuilt elsewhere. Invariant between steps: each hop's server caches
exactly the positions ``[0, position)`` of its history.

A step sends the new positions through the hops in order. When hop ``i``
fails (connection lost, timeout, an error, draining), the session:

1. bans its server in the swarm view, counts the failure (``FailureLedger``:
   backoff, and a bound that ends in ``RetriesExhaustedError``);
2. closes hops ``i..`` and keeps hop ``i``'s history up to ``position``:
   the *replay input* at block ``hops[i].start``;
3. routes again from that block to ``L``, opens a session on each new hop
   and sends it the replay input in one step at position 0 (its output is
   the next new hop's replay input), so the new servers rebuild their KV
   caches;
4. carries on with the step that failed, from hop ``i``.

A failure during 3 is handled the same way from the hop that failed. The
servers compute the same blocks on the same inputs, so the outputs, and
the tokens chosen from them, are exactly those of a run without failures.

Forwarding (on by default, RPC.md "Forwarding"): when every later hop
took a push token, a step goes server to server. Hop 1 gets the input,
the others an announcement, all at once; each server pushes its output
to the next and answers us too, so the histories above are kept as
before, and a hop whose push failed gets its input from us. A failure
at hop ``i`` resumes from hop ``i``'s input, which we hold by then, so
failover is the same as without forwarding.
Rolling back (``rollback(p)``) only moves ``position``: the next step is
sent at ``p`` and each server rolls its cache back itself (RPC.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import trio
from torch import Tensor

from ..errors import (
    CacheFullError,
    ConfigError,
    DeadlineExceededError,
    InvalidRequestError,
    LibpipeError,
    RemoteError,
    SessionError,
    sole_error,
)
from ..net import Message, Stream
from ..wire import cast_for_wire
from ._context import SwarmContext, hop_error, same_on_every_server
from ._failover import FailureLedger
from ._hidden import check_finite_answer, check_hidden
from ._routing import PlannedHop
from ._train_routing import AdapterDirectory, plan_training_route
from ._view import ServerEntry

logger = logging.getLogger("libpipe.client")

# Seconds we wait for a server to acknowledge a graceful close before
# cancelling the stream (either way it frees the cache).
CLOSE_GRACE = 1.0
# How long a failed send waits for the server's reason to be readable.
WHY_ENDED_WAIT = 0.1
# A forwarded step waits this long for a hop's answer before it also
# watches the hop before it for a failed push (``_reply_watching``): almost
# every answer comes sooner, and watching costs a nursery and two tasks
# per hop per step. A push refused at once is then carried by us after
# this delay instead of at once; an unanswered one takes the pushing
# server 1 s to give up anyway (RPC.md, "Forwarding").
WATCH_PUSH_AFTER = 0.25


class _HopFailed(Exception):
    """Hop ``index`` of the session failed with ``error`` (internal).

    ``resume``: the hop's input for the step that failed, when the step
    got past earlier hops by forwarding (the caller resumes there).
    ``stale``: the error answered a step already given up (a cancelled
    one): the stream is gone, but the server is not to blame."""

    def __init__(
        self,
        index: int,
        hop: PlannedHop,
        error: LibpipeError,
        *,
        resume: Tensor | None = None,
        stale: bool = False,
    ) -> None:
        super().__init__(str(error))
        self.index, self.hop, self.error = index, hop, error
        self.resume, self.stale = resume, stale


@dataclass
class _Hop:
    """One server's part of the session: its stream and its input history."""

    planned: PlannedHop
    stream: Stream
    exits: contextlib.AsyncExitStack
    chunks: list[tuple[int, Tensor]]  # (position, input [B, t, H]), in order
    # The server's push token (RPC.md, "Forwarding"); None: it takes no pushes.
    token: str | None = None
    # Whether a step came back from it: only then are its past failures
    # forgiven (a server with a stuck device may still open sessions).
    served: bool = False

    @property
    def start(self) -> int:
        return self.planned.start

    @property
    def end(self) -> int:
        return self.planned.end

    def remember(self, position: int, hidden: Tensor) -> None:
        """Keep ``hidden`` as the input at ``position``, forgetting whatever
        was kept from ``position`` on (a rollback overwrites)."""
        if position != self.length:  # a rollback or a replay; appending is O(1)
            self.chunks = _truncate(self.chunks, position)
        self.chunks.append((position, hidden))

    @property
    def length(self) -> int:
        """Positions kept."""
        if not self.chunks:
            return 0
        begin, chunk = self.chunks[-1]
        return begin + chunk.shape[1]

    def history(self, position: int) -> Tensor | None:
        """Inputs for positions ``[0, position)``, or None when empty."""
        kept = _truncate(self.chunks, position)
        if not kept:
            return None
        return torch.cat([c for _, c in kept], dim=1)  # [B, position, H]


def _truncate(chunks: list[tuple[int, Tensor]], position: int) -> list[tuple[int, Tensor]]:
    out = []
    for begin, chunk in chunks:
        if begin >= position:
            break
        out.append((begin, chunk[:, : position - begin]))
    return out


class RemoteSession:
    """Hidden states in, hidden states out, over a chain of servers (see
    the module docstring). Use through ``Client.inference_session``."""

    def __init__(
        self, ctx: SwarmContext, *, max_length: int, batch: int, adapter: str | None = None
    ) -> None:
        for name, value in (("max_length", max_length), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise ConfigError(f"adapter must be a non-empty string or None, got {adapter!r}")
        self._ctx = ctx
        self.max_length = max_length
        self.batch = batch
        # A LoRA adapter every hop must have loaded (routing asks the servers
        # which they have, once per session: only adapter sessions pay it).
        self.adapter = adapter
        self._adapters = AdapterDirectory()
        # Steps go server to server where every later hop takes pushes
        # (RPC.md, "Forwarding"); False: the client carries every input.
        self.forwarding = ctx.forwarding
        # Hop inputs that reached their server by push (none: forwarding
        # is off, or no hop could take pushes).
        self.forwarded = 0
        self._hops: list[_Hop] = []
        self._position = 0
        # Input at block `_covered()` for positions [0, position) while the
        # chain is incomplete (after a failure).
        self._replay: Tensor | None = None
        self._steps = itertools.count()
        self._busy = False
        self._closed = False
        self.failovers = 0

    @property
    def position(self) -> int:
        """Positions the servers hold (the next input's position)."""
        return self._position

    @property
    def route(self) -> list[PlannedHop]:
        return [h.planned for h in self._hops]

    async def __aenter__(self) -> RemoteSession:
        ledger = FailureLedger(self._ctx.policy, "opening an inference session")
        try:
            await self._complete_chain(ledger)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        hops, self._hops = self._hops, []
        await _close_hops(hops)

    async def step(self, hidden: Tensor) -> Tensor:
        """Send ``hidden: [batch, t, H]`` (positions ``position ..``) through
        every block; returns the last block's outputs, same shape."""
        self._check_usable()
        check_hidden(hidden, self._ctx.hidden_size, self.batch)
        t = hidden.shape[1]
        if self._position + t > self.max_length:
            raise SessionError(
                f"{t} more positions would pass the session's max_length {self.max_length} "
                f"(at {self._position})"
            )
        self._busy = True
        try:
            out = await self._run(cast_for_wire(hidden, self._ctx.wire_dtype).contiguous())
        finally:
            self._busy = False
        self._position += t
        return out

    def rollback(self, position: int) -> None:
        """Forget positions ``>= position``; the next step starts there."""
        self._check_usable()
        if (
            isinstance(position, bool)
            or not isinstance(position, int)
            or not 0 <= position <= self._position
        ):
            raise InvalidRequestError(
                f"cannot roll back to {position!r}: session is at {self._position}"
            )
        self._position = position

    def _check_usable(self) -> None:
        if self._closed:
            raise SessionError("the inference session is closed")
        if self._busy:
            raise SessionError("a step of this session is already running")

    # --- the chain -------------------------------------------------------------------

    async def _run(self, x: Tensor) -> Tensor:
        """``x``: input of block 0 at ``position``; returns the last block's output."""
        ledger: FailureLedger | None = None  # made at the first failure: most steps have none
        i = 0
        while True:
            try:
                if i == len(self._hops):
                    if self._covered() == self._ctx.num_blocks:
                        return x
                    if ledger is None:
                        ledger = self._step_ledger()
                    await self._complete_chain(ledger)
                    continue
                if self._forwards_from(i):
                    x, i = await self._step_forwarded(i, x), len(self._hops)
                    continue
                x_next = await self._step_hop(i, x)
            except _HopFailed as failure:
                if ledger is None:
                    ledger = self._step_ledger()
                await self._fail(failure, ledger)
                if failure.resume is not None:
                    x, i = failure.resume, failure.index
                i = min(i, len(self._hops))
                continue
            x, i = x_next, i + 1

    def _step_ledger(self) -> FailureLedger:
        return FailureLedger(self._ctx.policy, f"step at position {self._position}")

    def _covered(self) -> int:
        return self._hops[-1].end if self._hops else 0

    async def _complete_chain(self, ledger: FailureLedger) -> None:
        """Route from the first uncovered block to the end, open the new
        hops and replay their histories into them."""
        while self._covered() < self._ctx.num_blocks:
            start = self._covered()
            plan = await plan_training_route(
                self._ctx,
                ledger,
                self._adapters,
                start=start,
                end=self._ctx.num_blocks,
                adapter=self.adapter,
                objective="latency",
                session_tokens=self.max_length,
                batch=self.batch,
            )
            try:
                if self._replay is None:
                    # Nothing to replay (a new session): open every hop at once.
                    await self._open_all(plan)
                else:
                    for planned in plan:
                        self._hops.append(await self._open_hop(planned, len(self._hops)))
                        self._replay = await self._replay_into(len(self._hops) - 1)
            except _HopFailed as failure:
                await self._fail(failure, ledger)
        self._replay = None

    async def _fail(self, failure: _HopFailed, ledger: FailureLedger) -> None:
        """Ban the server, drop hops from the failed one on, keep its input."""
        self.failovers += 1
        entry = failure.hop.server
        if not failure.stale:
            self._ctx.view.ban(entry.peer_id, str(failure.error))
        logger.warning(
            "hop %s failed (%s: %s); routing blocks %d.. again",
            failure.hop.describe(),
            type(failure.error).__name__,
            failure.error,
            failure.hop.start,
        )
        if failure.index < len(self._hops):
            dropped = self._hops[failure.index :]
            del self._hops[failure.index :]
            self._replay = dropped[0].history(self._position)
            await _close_hops(dropped)
        await ledger.record(failure.hop.describe(), failure.error)

    async def _open_all(self, plan: list[PlannedHop]) -> None:
        """Open the hops of ``plan`` concurrently: one round trip, not one per
        hop. Keeps those before the first failure; raises that failure."""
        base = len(self._hops)
        opened: list[_Hop | _HopFailed | None] = [None] * len(plan)

        async def one(i: int) -> None:
            try:
                opened[i] = await self._open_hop(plan[i], base + i)
            except _HopFailed as failure:
                opened[i] = failure

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(plan)):
                    nursery.start_soon(one, i)
        except BaseException:  # cancelled: let go of what did open
            for item in opened:
                if isinstance(item, _Hop):
                    await _shielded_close(item.exits)
            raise
        failure = next((o for o in opened if isinstance(o, _HopFailed)), None)
        for item in opened:
            if isinstance(item, _Hop):
                if failure is None or item.planned.start < failure.hop.start:
                    self._hops.append(item)
                else:
                    await _close_hop(item)
        if failure is not None:
            raise failure

    async def _open_hop(self, planned: PlannedHop, index: int) -> _Hop:
        exits = contextlib.AsyncExitStack()
        try:
            with trio.fail_after(self._ctx.policy.step_timeout):
                connection = await self._ctx.connect(planned.server)
                stream = await exits.enter_async_context(
                    connection.open_stream(
                        "inference",
                        _opening(planned, self.batch, self.max_length, self.adapter),
                    )
                )
                opened = await stream.receive()
            if opened.meta.get("position") != 0:
                raise RemoteError(f"session opened at {opened.meta.get('position')!r}, not 0")
        except BaseException as exc:
            await _shielded_close(exits)
            error = hop_error(exc)
            if error is None:
                raise
            _note_cache_full(self._ctx, planned.server, error)
            raise _HopFailed(index, planned, error) from None
        self._ctx.view.probed(planned.peer_id)
        token = opened.meta.get("push_token")
        return _Hop(planned, stream, exits, [], token if isinstance(token, str) else None)

    async def _replay_into(self, index: int) -> Tensor:
        """Give hop ``index`` the replay input (positions ``[0, position)``)."""
        assert self._replay is not None
        return await self._send(index, 0, self._replay)

    async def _step_hop(self, index: int, x: Tensor) -> Tensor:
        return await self._send(index, self._position, x)

    async def _send(self, index: int, position: int, x: Tensor) -> Tensor:
        hop = self._hops[index]
        hop.remember(position, x)
        step = next(self._steps)
        try:
            # One deadline for the request and its answer: a cancel scope
            # per await costs more than the rest of the bookkeeping.
            with trio.fail_after(self._ctx.policy.step_timeout):
                await self._post(hop, {"position": position, "step": step}, (x,))
                reply = await self._reply(hop, step)
            out = _check_reply(reply.meta, reply.tensors, position + x.shape[1], step, x)
        except BaseException as exc:
            raise _as_hop_failure(exc, index, hop, step) from None
        self._served(hop)
        return out

    def _served(self, hop: _Hop) -> None:
        """``hop`` answered a step: the view forgives its past failures (once
        per hop; every step would be a dict operation on the hot path)."""
        if not hop.served:
            hop.served = True
            self._ctx.view.answered(hop.planned.peer_id)

    def _forwards_from(self, index: int) -> bool:
        """Whether hops ``index..`` can run a step by forwarding: the
        session forwards, and every hop after the first takes pushes."""
        later = self._hops[index + 1 :]
        return self.forwarding and bool(later) and all(h.token is not None for h in later)

    async def _step_forwarded(self, first: int, x: Tensor) -> Tensor:
        """Hops ``first..`` run the step server to server: hop ``first``
        gets ``x``, each later one an announcement of its pushed input,
        all at once; each hop pushes its output to the next and answers us
        too, so every hop's input history stays here for failover. A hop
        whose pusher says the push failed gets its input from us
        (``_reply_watching``). On a failure, ``_HopFailed.resume`` is the
        failed hop's input (earlier hops' outputs arrive before it is raised).

        One cancel scope bounds the whole step, its deadline moved on at
        each hop (``step_timeout`` per hop, as a scope per await would
        give, for a fraction of the cost); ``waiting`` says whose answer
        was late when it expires."""
        position, hops = self._position, self._hops[first:]
        steps = [next(self._steps) for _ in hops]
        hops[0].remember(position, x)
        timeout = self._ctx.policy.step_timeout
        posted, failure, waiting = 0, None, 0
        inputs = x
        # Each hop's step message; later hops' are announced with `pushed`.
        metas: list[dict[str, Any]] = []
        for j, step in enumerate(steps):
            meta: dict[str, Any] = {"position": position, "step": step}
            if j + 1 < len(hops):
                meta["push_to"] = _push_target(hops[j + 1], steps[j + 1])
            metas.append(meta)
        with trio.CancelScope(deadline=trio.current_time() + timeout) as deadline:
            for j, hop in enumerate(hops):
                waiting = j
                try:
                    if j:
                        await self._post(hop, {**metas[j], "pushed": True}, ())
                    else:
                        await self._post(hop, metas[0], (x,))
                except BaseException as exc:
                    failure = _as_hop_failure(exc, first + j, hop, steps[j])
                    if failure is exc:
                        raise
                    break
                posted += 1
            for j in range(posted):
                hop = hops[j]
                waiting = j
                deadline.deadline = trio.current_time() + timeout
                try:
                    if j:
                        reply = await self._reply_watching(
                            hop, metas[j], hops[j - 1], steps[j - 1], inputs
                        )
                    else:
                        reply = await self._reply(hop, steps[j])
                    out = _check_reply(
                        reply.meta, reply.tensors, position + x.shape[1], steps[j], x
                    )
                except BaseException as exc:
                    raise _as_hop_failure(exc, first + j, hop, steps[j], inputs) from None
                self._served(hop)
                if j + 1 < len(hops):
                    hops[j + 1].remember(position, out)
                inputs = out
        if deadline.cancelled_caught:
            raise _HopFailed(
                first + waiting,
                hops[waiting].planned,
                DeadlineExceededError("the server did not answer in time"),
                # Late taking a later hop's announcement: its input is not here yet.
                resume=None if waiting == posted > 0 else inputs,
            )
        if failure is not None:
            failure.resume = inputs
            raise failure
        return inputs

    async def _reply_watching(
        self, hop: _Hop, meta: dict[str, Any], pusher: _Hop, pusher_step: int, pushed: Tensor
    ) -> Message:
        """``hop``'s answer to its step (``meta``: position, step id, and where
        it pushes next), whose input ``pusher`` pushes. If the pusher says its
        push failed (or its stream ends), we send ``hop`` that input ourselves,
        with the same ``meta`` so that it still pushes on to the hop after it;
        the hop runs the step on whichever comes first.
        The pusher is watched only once the answer is ``WATCH_PUSH_AFTER``
        late (a notice that came earlier waits in its inbox)."""
        step = meta["step"]
        with trio.move_on_after(WATCH_PUSH_AFTER):
            reply = await self._reply(hop, step)
            self.forwarded += 1
            return reply
        answers: list[Message] = []
        fell_back = False

        async def watch_pusher() -> None:
            nonlocal fell_back
            try:
                while True:
                    notice = await pusher.stream.receive()
                    if (
                        notice.meta.get("step") == pusher_step
                        and notice.meta.get("pushed") is False
                    ):
                        break
            except (LibpipeError, trio.EndOfChannel, trio.BrokenResourceError, OSError):
                pass  # the pusher is gone: whether its push went out is unknown
            fell_back = True
            await self._post(hop, meta, (pushed,))

        async def answer(done: trio.CancelScope) -> None:
            answers.append(await self._reply(hop, step))
            done.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_pusher)
                nursery.start_soon(answer, nursery.cancel_scope)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        self.forwarded += not fell_back
        return answers[0]

    async def _post(self, hop: _Hop, meta: dict[str, Any], tensors: tuple[Tensor, ...]) -> None:
        """Send a step message (the caller's cancel scope bounds it)."""
        try:
            await hop.stream.send(meta, tensors)
        except LibpipeError as exc:
            raise await _why_ended(hop.stream, exc) from None

    async def _reply(self, hop: _Hop, step: int) -> Message:
        """The hop's answer to ``step``, skipping answers to earlier steps
        (the caller's cancel scope bounds the wait)."""
        reply = await hop.stream.receive()
        while _is_stale(reply.meta, step):
            reply = await hop.stream.receive()
        return reply


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """One error out of a nursery's group: the first that is not a cancel."""
    leaves = [sole_error(e) for e in group.exceptions]
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


def _push_target(hop: _Hop, step: int) -> dict[str, Any]:
    return {
        "address": hop.planned.server.push_address,
        "peer_id": hop.planned.peer_id,
        "token": hop.token,
        "step": step,
    }


def _as_hop_failure(
    exc: BaseException, index: int, hop: _Hop, step: int, resume: Tensor | None = None
) -> BaseException:
    """What to raise for ``exc`` met by hop ``index`` during ``step``:
    the exception itself when it is no hop's fault, the error itself when
    any server would refuse the request alike, else a ``_HopFailed``."""
    error = hop_error(exc)
    if error is None:
        return exc
    stale = _is_stale(error.details, step) if error.remote else False
    if same_on_every_server(error) and not stale:
        return error
    return _HopFailed(index, hop.planned, error, resume=resume, stale=stale)


def _opening(
    planned: PlannedHop, batch: int, max_length: int, adapter: str | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "start": planned.start,
        "end": planned.end,
        "batch": batch,
        "max_length": max_length,
    }
    if adapter is not None:
        meta["adapter"] = adapter
    return meta


def _is_stale(meta: dict[str, Any], step: int) -> bool:
    """A reply to an earlier step: that step was cancelled by our caller after
    its send (step ids only grow), so its answer is still in the inbox."""
    earlier = meta.get("step")
    return isinstance(earlier, int) and not isinstance(earlier, bool) and earlier < step


def _check_reply(
    meta: dict[str, Any], tensors: tuple[Tensor, ...], position: int, step: int, x: Tensor
) -> Tensor:
    if meta.get("position") != position or meta.get("step", step) != step:
        raise RemoteError(
            f"server answered position {meta.get('position')!r} step {meta.get('step')!r}, "
            f"expected {position} step {step}"
        )
    if len(tensors) != 1 or tensors[0].shape != x.shape:
        raise RemoteError(
            f"server answered tensors {[list(t.shape) for t in tensors]}, expected {list(x.shape)}"
        )
    out = check_finite_answer(tensors[0], "the server")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _note_cache_full(ctx: SwarmContext, server: ServerEntry, error: LibpipeError) -> None:
    if isinstance(error, CacheFullError):
        free = error.details.get("free")
        ctx.view.note_cache_full(server.peer_id, free if isinstance(free, int) else 0)


async def _why_ended(stream: Stream, send_error: LibpipeError) -> LibpipeError:
    """Sending failed because the server had already ended the stream: its
    reason (idle timeout, draining) is waiting in the inbox and says more
    than our send's 'stream not open'."""
    with trio.move_on_after(WHY_ENDED_WAIT):
        try:
            await stream.receive()
        except LibpipeError as reason:
            return reason
        except (trio.EndOfChannel, trio.BrokenResourceError):
            pass
    return send_error


async def _close_hops(hops: list[_Hop]) -> None:
    """Close every hop at once: a close waits up to ``CLOSE_GRACE`` each."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for hop in hops:
                nursery.start_soon(_close_hop, hop)


async def _close_hop(hop: _Hop) -> None:
    """Half-close, give the server a moment to close too, then let go."""
    with trio.move_on_after(CLOSE_GRACE):
        try:
            await hop.stream.close_send()
            while True:
                await hop.stream.receive()
        except (LibpipeError, trio.EndOfChannel, trio.BrokenResourceError, OSError):
            pass
    await _shielded_close(hop.exits)


async def _shielded_close(exits: contextlib.AsyncExitStack) -> None:
    with trio.CancelScope(shield=True):
        try:
            await exits.aclose()
        except (LibpipeError, OSError, trio.BrokenResourceError):
            pass
