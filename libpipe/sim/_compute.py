"""A simulated server's compute: one queue, run one batch at a time.

Theory of operation
-------------------
This mirrors the live server's executor (``libpipe/server/_executor.py``):
one queue per device and one compute thread that runs one batch at a time,
to its end (no preemption). So the model is a non-preemptive single-server
queue with batching, not processor sharing: processor sharing would have
two sessions' steps progress together, each slowed to half speed, where
the executor runs one pass while the other step waits, whole, behind it
(the first to arrive finishes at its lone time, the second at the sum);
and it would have no batching, where the executor merges steps that meet
in its queue into one pass that costs far less than their sum.

- Decode steps go before prefill (the executor's priorities), first come
  first served within each; a job that has waited ``max_wait`` goes first
  whatever its priority (the executor's guard against starvation), oldest
  first.
- When the thread takes a decode step it also takes every other decode
  step queued at that moment for the same sub-span, up to ``max_batch``,
  and runs them as one pass. Steps arriving during a pass wait for the
  next. (The executor also waits up to 5 ms for the rest of a batch it saw
  last time; that is left out: the window is a fraction of one pass.)
- A pass of n decode steps over k blocks costs k * (tau_decode + (n - 1) *
  tau_row): one lone step's time (reading the weights, the per-call work),
  announced by the server as its decode throughput, plus, per extra
  session, ``tau_row``. By default that is one token of bulk forward, the
  other figure a server announces (``ServerSpec.forward_time``: a long
  pass, where the fixed cost is spread thin, so the arithmetic of one more
  row), which fits a GPU, whose decode passes are bound by reading the
  weights. Where a batched row costs more than its arithmetic (on a CPU,
  with each session's attention over its own cache, a row of the loopback
  bench's model costs 0.2-0.6 of a lone step, a forward token 0.05), a
  scenario gives ``batch_row`` measured on the same software
  (``bench/sim_vs_live.py`` times the span's batched pass around its
  runs), never fitted to the run being predicted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import ConfigError

# The live executor's defaults (libpipe/server/_executor.py: DEFAULT_MAX_WAIT,
# Executor.max_batch); the simulator has no import path to the server.
MAX_WAIT = 2.0
MAX_BATCH = 64


@dataclass(frozen=True)
class PassCost:
    """Seconds per block: a lone decode step (``tau_decode``) and each
    further session batched into the same pass (``tau_row``)."""

    tau_decode: float
    tau_row: float

    def decode(self, blocks: int, sessions: int) -> float:
        """One pass of ``sessions`` decode steps over ``blocks`` blocks."""
        return blocks * (self.tau_decode + (sessions - 1) * self.tau_row)


class Job:
    """One hop of one session's step, waiting for (or in) a pass.

    ``key`` is the sub-span ``(start, end)`` of a decode step (steps batch
    only with steps of the same key); ``None`` for a prefill, which runs
    alone and costs ``seconds``."""

    __slots__ = ("blocks", "key", "owner", "queued_at", "seconds")

    def __init__(
        self,
        owner: int,
        queued_at: float,
        blocks: int,
        key: tuple[int, int] | None,
        seconds: float = 0.0,
    ) -> None:
        self.owner = owner
        self.queued_at = queued_at
        self.blocks = blocks
        self.key = key
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Job(owner={self.owner}, key={self.key}, queued_at={self.queued_at})"


class ComputeQueue:
    """The queue and the compute thread of one server.

    ``submit`` queues a job; ``take(now)``, when the thread is idle, starts
    the next pass and returns (its jobs, its seconds), or ``None`` when
    nothing waits; ``finish()`` marks the pass over. The caller owns the
    clock: it calls ``finish`` at start + seconds."""

    __slots__ = ("_decode", "_prefill", "busy", "cost", "max_batch", "max_wait")

    def __init__(
        self, cost: PassCost, *, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait >= 0:
            raise ConfigError(f"max_wait must be >= 0, got {max_wait}")
        self.cost = cost
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.busy = False
        self._decode: deque[Job] = deque()
        self._prefill: deque[Job] = deque()

    @property
    def queued(self) -> int:
        return len(self._decode) + len(self._prefill)

    def submit(self, job: Job) -> None:
        """Queue ``job`` (jobs arrive in time order: each line stays FIFO)."""
        (self._prefill if job.key is None else self._decode).append(job)

    def take(self, now: float) -> tuple[list[Job], float] | None:
        if self.busy or not (self._decode or self._prefill):
            return None
        self.busy = True
        if self._prefill and (
            not self._decode
            or (
                now - self._prefill[0].queued_at > self.max_wait
                and self._prefill[0].queued_at < self._decode[0].queued_at
            )
        ):
            job = self._prefill.popleft()
            return [job], job.seconds
        first = self._decode.popleft()
        batch = [first]
        if self._decode and self.max_batch > 1:
            rest: deque[Job] = deque()
            for job in self._decode:
                if len(batch) < self.max_batch and job.key == first.key:
                    batch.append(job)
                else:
                    rest.append(job)
            self._decode = rest
        return batch, self.cost.decode(first.blocks, len(batch))

    def finish(self) -> None:
        self.busy = False
