"""Reusable handler tasks: a job handed to a parked task instead of a new one.

A unary RPC used to cost a task spawn and a cancel-scope entry on the
server, about as much as the rest of its round trip's Python (measured with
bench/transport.py). Here a worker task enters one cancel scope for its
whole life and runs job after job; between jobs it parks, and the next job
wakes it with a plain reschedule. Cancelling one job (the peer's Cancel)
cancels that worker's scope: the job ends, and so does the worker, since a
cancelled scope cannot be reused; a new worker is spawned when needed.
Cancels are rare, so the common call pays for neither spawn nor scope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

Job = TypeVar("Job")


class _Worker(Generic[Job]):
    __slots__ = ("job", "scope", "task")

    def __init__(self, job: Job) -> None:
        self.job: Job | None = job
        self.scope = trio.CancelScope()
        self.task: trio.lowlevel.Task | None = None


class WorkerPool(Generic[Job]):
    """Runs ``run(job)`` on pooled tasks; at most ``max_idle`` wait for work."""

    def __init__(self, run: Callable[[Job], Awaitable[None]], max_idle: int) -> None:
        self._run = run
        self._max_idle = max_idle
        self._idle: list[_Worker[Job]] = []

    def submit(self, nursery: trio.Nursery, job: Job) -> trio.CancelScope:
        """Start ``job`` soon; cancelling the returned scope cancels it."""
        if self._idle:
            worker = self._idle.pop()
            worker.job = job
            assert worker.task is not None
            trio.lowlevel.reschedule(worker.task)
        else:
            worker = _Worker(job)
            nursery.start_soon(self._work, worker)
        return worker.scope

    async def _work(self, worker: _Worker[Job]) -> None:
        worker.task = trio.lowlevel.current_task()
        with worker.scope:
            while True:
                job, worker.job = worker.job, None
                assert job is not None
                await self._run(job)
                if worker.scope.cancel_called or len(self._idle) >= self._max_idle:
                    return
                await self._park(worker)

    async def _park(self, worker: _Worker[Job]) -> None:
        self._idle.append(worker)

        def abort(_: object) -> trio.lowlevel.Abort:
            # Cancelled while idle (the connection is ending): leave the pool.
            self._idle.remove(worker)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
