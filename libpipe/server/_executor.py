"""The compute queue of one device: priorities and continuous batching.

Theory of operation: every piece of model work a request needs becomes a
job in one priority queue, and a single dispatcher task runs the jobs one
batch at a time on the device's compute thread (``_worker.ComputeThread``),
so the event loop keeps answering pings and moving bytes while a long
prefill computes. When a batch is done the loop wakes its callers directly,
not through the dispatcher; and a job that finds the thread idle, nothing
queued and no batch to wait for is started by its caller: the dispatcher
would decide the same one task switch later.

Inline decode steps: a lone session's decode step does not go to the
thread at all but runs on the event loop thread, in its caller's task. The
hand-off costs ~0.45 ms per step (the thread's wake-up, ``run_sync_soon``
waking the loop, the caller's task switch: measured, a quarter of a hop's
overhead beyond compute on loopback), and for one session nothing can
overlap its pass anyway. The price: while that pass computes, the loop
answers nothing else (pings, pushes, other connections' bytes wait), so a
client's RTT probe of a server busy with one session reads up to a pass
long (``bench/server.py --part inline`` measures it). So a
step runs inline only when (1) it is a decode step that would start at
once anyway (thread idle, nothing queued); (2) it is lone: the last pass
of its sub-span was this session's alone and no other open session was
in any sub-span's last pass, so no batch is forgone and nobody else waits
on it; and (3) that last pass took at most ``inline_max`` seconds, which
bounds how late the loop answers anything else (0 turns inlining off).
A session's first decode step thus goes to the thread and is timed
there. A step of another session arriving during an inline pass is
queued for the dispatcher rather than started at once when its sub-span's
last pass was someone else's, so the steps that piled up during the pass
go as one batch and continuous batching forms as before. An inline step
fails exactly as on the thread (same ``_execute``: out of memory is
``BusyError``, a bad step fails its own session). Threads: torch's thread
counts (``--threads``) are process-wide and each thread takes them on
its first parallel region; a span's tensors carry their device, so a
CUDA step does not depend on the thread's current device. On a GPU the
inline pass includes the copy back to the host (it waits for the
kernels), which the bound counts since it is part of the timed pass.
Priorities: interactive decode steps first, then prefill chunks of
sessions, then bulk forward/backward; FIFO within a priority.

Priorities alone would starve bulk work under a steady stream of decode
steps, so a job that has waited longer than ``max_wait`` seconds goes
first, whatever its priority (oldest first). The jobs of a request cut into
several (a chunked backward) age from the request's arrival (``since``).

Continuous batching: when the dispatcher takes a decode step, it also
takes every other decode step queued at that moment for the same sub-span
(``BlockSpan.decode_batch`` needs one), up to ``max_batch`` sessions, and
runs them as one pass. Steps that arrive while a batch computes queue up
and form the next batch, so under load batches grow by themselves. Left
alone, sessions in lockstep settle into two passes per round: the first
step to come back runs alone, the rest queue behind it. So when fewer
steps are queued for a sub-span than its last batch held, the dispatcher
waits a little for the others: at most ``gather_window`` seconds and
``gather_fraction`` of the last pass, a small price in latency for a
whole pass saved. Only sessions of that batch still open count: a session
left alone on its sub-span never waits (``gather_target``). If a batched
pass fails, its members run again one by one, so a bad step fails only its
own session.

A job that its caller abandons (cancellation) before it starts is dropped;
one that already runs is waited for, shielded, so no job ever touches a
session's cache after its handler has let go of it.
"""

from __future__ import annotations

import enum
import functools
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from torch import Tensor

from ..errors import BusyError, DrainingError
from ..model import InferenceSession
from ._compute import to_span, to_wire
from ._worker import ComputeThread

logger = logging.getLogger("libpipe.server")


# A bulk call waits at most this long behind interactive work: long enough
# that decode latency is untouched by occasional bulk calls, short against
# a client's call timeout.
DEFAULT_MAX_WAIT = 2.0
# Waiting for the rest of a batch: bounded in absolute terms (a few ms is
# noise next to a network hop) and relative to a pass (a quarter of it
# costs less than the second pass it saves).
DEFAULT_GATHER_WINDOW = 0.005
DEFAULT_GATHER_FRACTION = 0.25
# A lone session's decode step runs on the event loop when its last pass
# took at most this long. The loop then answers pings and pushes at most
# this late: a WAN round trip's jitter, and 1% of the LAN gossip preset's
# 3 s probe timeout. It covers a few blocks of a large model on a GPU, or
# bench/e2e.py's 8 small blocks on a CPU (~16 ms) with room for load;
# each step so run saves the thread hand-off (~0.45 ms per hop per token).
DEFAULT_INLINE_MAX = 0.03


class Priority(enum.IntEnum):
    DECODE = 0  # one position of an inference session: a user waits on it
    PREFILL = 1  # a chunk of a session's prompt
    BULK = 2  # forward and backward calls


@dataclass(eq=False)
class _Job:
    priority: int
    seq: int
    queued_at: float
    fn: Callable[[], Any] | None = None
    session: InferenceSession | None = None
    hidden: Tensor | None = None
    done: trio.Event = field(default_factory=trio.Event)
    started: bool = False
    abandoned: bool = False
    result: Any = None
    error: BaseException | None = None

    def __lt__(self, other: _Job) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)

    @property
    def batch_key(self) -> tuple[int, int, int] | None:
        s = self.session
        return None if s is None else (id(s.span), s.start, s.end)


@dataclass
class ExecutorStats:
    """Counters for ``info``-style introspection, tests and benchmarks."""

    jobs: int = 0
    batches: int = 0  # decode passes
    batched_steps: int = 0  # decode steps run inside those passes
    largest_batch: int = 0
    direct: int = 0  # jobs that found the thread idle and nothing queued: no dispatcher trip
    inline: int = 0  # decode steps of a lone session run on the event loop thread


class Executor:
    """One device's queue; ``await nursery.start(executor.run)`` before use."""

    def __init__(
        self,
        *,
        batching: bool = True,
        max_batch: int = 64,
        max_wait: float = DEFAULT_MAX_WAIT,
        gather_window: float = DEFAULT_GATHER_WINDOW,
        gather_fraction: float = DEFAULT_GATHER_FRACTION,
        inline_max: float = DEFAULT_INLINE_MAX,
    ) -> None:
        self.batching = batching
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.gather_window = gather_window
        self.gather_fraction = gather_fraction
        self.inline_max = inline_max
        # Per sub-span: the sessions of its last decode batch and how long it took.
        self._last_batch: dict[tuple[int, int, int], tuple[list[InferenceSession], float]] = {}
        self.stats = ExecutorStats()
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._wakeup = trio.Event()
        self._running = False
        self._thread: ComputeThread | None = None
        self._busy = False  # a batch is on the compute thread
        self._batch_done = trio.Event()

    @property
    def queued(self) -> int:
        return sum(not j.abandoned for j in self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch jobs until cancelled; jobs still queued then fail with DrainingError."""
        self._thread = ComputeThread()
        self._thread.start()
        self._running = True
        task_status.started()
        try:
            while True:
                if not self._busy and self._heap:
                    await self._gather()
                    batch = self._take_batch()
                    if batch:
                        self._start(batch)
                    continue
                self._wakeup = trio.Event()
                await self._wakeup.wait()
        finally:
            self._running = False
            # The batch on the thread may be using sessions whose handlers
            # wait for it (shielded) before they free the cache: let it end.
            with trio.CancelScope(shield=True):
                while self._busy:
                    await self._batch_done.wait()
            self._thread.stop()
            stopping = DrainingError("the server is stopping")
            for job in self._heap:
                if not job.done.is_set():
                    job.error = job.error or stopping
                    job.done.set()
            self._heap.clear()

    def _start(self, batch: list[_Job]) -> None:
        """Hand ``batch`` to the compute thread; as it ends, the loop wakes its
        callers and the dispatcher."""
        assert self._thread is not None and not self._busy
        self._busy = True
        self._batch_done = trio.Event()
        for job in batch:
            job.started = True
        began = trio.current_time()

        def on_done(error: BaseException | None) -> None:  # on the event loop
            key = batch[0].batch_key
            if key is not None:
                sessions = [j.session for j in batch if j.session is not None]
                self._last_batch[key] = (sessions, trio.current_time() - began)
            for job in batch:
                if error is not None and job.error is None and job.result is None:
                    job.error = error
                job.done.set()
            self._busy = False
            self._batch_done.set()
            self._wakeup.set()

        self._thread.submit(functools.partial(self._execute, batch), on_done)

    async def call(
        self, priority: Priority, fn: Callable[[], Any], *, since: float | None = None
    ) -> Any:
        """Run ``fn()`` on the worker thread at ``priority``; its result or error.

        ``since`` (``trio.current_time()``, default now): when the job counts
        as queued for ``max_wait``; the later jobs of one request pass its
        arrival, so a request cut into many jobs waits ``max_wait`` in all,
        not per job."""
        queued_at = trio.current_time() if since is None else since
        return await self._submit(_Job(priority, next(self._seq), queued_at, fn=fn))

    async def decode(self, session: InferenceSession, hidden: Tensor) -> Tensor:
        """One position of ``session``, batched with its peers.

        ``hidden: [B, 1, D]`` as received (host, any accepted float dtype);
        the output comes back on the host in that dtype, ready to send."""
        job = _Job(
            Priority.DECODE, next(self._seq), trio.current_time(), session=session, hidden=hidden
        )
        return await self._submit(job)

    async def _submit(self, job: _Job) -> Any:
        if not self._running:
            raise DrainingError("the server is not running its compute queue")
        if self._starts_now(job):
            if self._runs_inline(job):
                self._run_inline(job)
                if job.error is not None:
                    raise job.error
                return job.result
            # What the dispatcher would decide, minus a trip through its task.
            self.stats.direct += 1
            self._start([job])
        else:
            heapq.heappush(self._heap, job)
            self._wakeup.set()
        try:
            await job.done.wait()
        except trio.Cancelled:
            if job.started:
                with trio.CancelScope(shield=True):
                    await job.done.wait()
            else:
                job.abandoned = True
            raise
        if job.error is not None:
            raise job.error
        return job.result

    # --- dispatcher side (event loop) ---------------------------------------------

    def gather_target(self, session: InferenceSession) -> int:
        """How many decode steps of ``session``'s sub-span the dispatcher waits
        to have queued before it runs them: those of its last batch's sessions
        that are still open (at most ``max_batch``). 1 means no wait."""
        last = self._last_batch.get((id(session.span), session.start, session.end))
        if not self.batching or last is None:
            return 1
        return max(1, min(self.max_batch, sum(not s.closed for s in last[0])))

    def _starts_now(self, job: _Job) -> bool:
        """A job goes straight to an idle thread when nothing is queued and it
        would not wait for a batch: the dispatcher would run it alone at once.
        A decode step whose sub-span last ran another open session's step
        goes through the dispatcher, so that steps arriving together (during
        an inline pass, say) batch."""
        if self._busy or self._heap:
            return False
        session = job.session
        if session is None or not self.batching:
            return True
        last = self._last_batch.get((id(session.span), session.start, session.end))
        # Every other session of the last batch closed: a gather target of 1.
        return last is None or all(s is session or s.closed for s in last[0])

    def _runs_inline(self, job: _Job) -> bool:
        """Whether a decode step that starts now runs on the loop thread
        (theory of operation): lone, and its sub-span's last pass was short."""
        session = job.session
        if session is None or not self.inline_max > 0:
            return False
        last = self._last_batch.get((id(session.span), session.start, session.end))
        if (
            last is None
            or last[1] > self.inline_max
            or len(last[0]) != 1
            or last[0][0] is not session
        ):
            return False
        return all(s is session or s.closed for ss, _ in self._last_batch.values() for s in ss)

    def _run_inline(self, job: _Job) -> None:
        """``job`` on this (the loop's) thread, as the compute thread would."""
        self.stats.inline += 1
        job.started = True
        began = time.perf_counter()
        try:
            self._execute([job])
        except Exception as exc:  # as ComputeThread reports it: the job fails
            logger.exception("an inline compute job raised")
            job.error = exc
        session = job.session
        assert session is not None
        key = (id(session.span), session.start, session.end)
        self._last_batch[key] = ([session], time.perf_counter() - began)

    async def _gather(self) -> None:
        """If the next job is a decode step whose sub-span's last batch had
        more open sessions than steps queued now, wait briefly for the rest."""
        live = [j for j in self._heap if not j.abandoned]
        if not self.batching or not live:
            return
        first = min(live)
        key = first.batch_key
        if key is None or first.session is None:
            return
        expected = self.gather_target(first.session)
        if expected <= 1:
            return
        window = min(self.gather_window, self.gather_fraction * self._last_batch[key][1])
        with trio.move_on_at(trio.current_time() + window):
            while sum(j.batch_key == key and not j.abandoned for j in self._heap) < expected:
                self._wakeup = trio.Event()
                await self._wakeup.wait()

    def _take_batch(self) -> list[_Job]:
        while self._heap and self._heap[0].abandoned:
            heapq.heappop(self._heap)
        if not self._heap:
            return []
        first = self._pop_first()
        key = first.batch_key
        if key is None or not self.batching:
            return [first]
        batch, rest = [first], []
        for job in self._heap:
            if job.abandoned:
                continue
            if len(batch) < self.max_batch and job.batch_key == key:
                batch.append(job)
            else:
                rest.append(job)
        if len(batch) > 1:
            batch.sort()
            heapq.heapify(rest)
            self._heap = rest
        return batch

    def _pop_first(self) -> _Job:
        """The most urgent job, unless one has waited past ``max_wait``."""
        oldest = min(self._heap, key=lambda j: (j.abandoned, j.queued_at, j.seq))
        if not oldest.abandoned and trio.current_time() - oldest.queued_at > self.max_wait:
            self._heap.remove(oldest)
            heapq.heapify(self._heap)
            return oldest
        return heapq.heappop(self._heap)

    # --- worker thread ------------------------------------------------------------------

    def _execute(self, batch: list[_Job]) -> None:
        self.stats.jobs += len(batch)
        if batch[0].fn is not None:
            _run_one(batch[0])
            return
        if len(batch) > 1:
            self.stats.batches += 1
            self.stats.batched_steps += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            first = batch[0].session
            assert first is not None
            span = first.span
            try:
                outs = span.decode_batch(
                    [j.session for j in batch],  # type: ignore[misc]
                    [to_span(j.hidden, span) for j in batch],  # type: ignore[arg-type]
                )
            except Exception as exc:
                # decode_batch advances no session unless all succeed; run
                # them alone so that only the faulty one hears of it.
                logger.info(
                    "batched decode of %d sessions failed (%s); running alone", len(batch), exc
                )
            else:
                for job, out in zip(batch, outs, strict=True):
                    _deliver(job, out)
                return
        for job in batch:
            _run_one(job)


def _run_one(job: _Job) -> None:
    try:
        if job.fn is not None:
            job.result = job.fn()
            return
        assert job.session is not None and job.hidden is not None
        out = job.session.step(to_span(job.hidden, job.session.span))
    except torch.OutOfMemoryError as exc:
        # Activations are not budgeted like caches: a request too big for
        # the device now is refused as busy (try another server), and the
        # server lives on.
        job.error = BusyError(f"out of device memory for this request: {exc}".splitlines()[0])
    except Exception as exc:
        job.error = exc
    else:
        _deliver(job, out)


def _deliver(job: _Job, out: Tensor) -> None:
    assert job.hidden is not None
    try:
        job.result = to_wire(out, job.hidden.dtype)
    except Exception as exc:  # fp16 overflow: this session's error only
        job.error = exc
