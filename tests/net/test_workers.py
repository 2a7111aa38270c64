"""WorkerPool: jobs on reused tasks, each job cancellable on its own."""

from __future__ import annotations

import trio
import trio.testing

from libpipe.net._workers import WorkerPool


async def test_a_finished_worker_takes_the_next_job() -> None:
    ran_on: list[trio.lowlevel.Task] = []

    async def run(job: int) -> None:
        ran_on.append(trio.lowlevel.current_task())

    pool = WorkerPool(run, max_idle=2)
    async with trio.open_nursery() as nursery:
        for job in range(3):
            pool.submit(nursery, job)
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(ran_on) == 3 and len(set(ran_on)) == 1


async def test_cancelling_one_job_leaves_the_others() -> None:
    gate = trio.Event()
    finished: list[int] = []
    cancelled: list[int] = []

    async def run(job: int) -> None:
        try:
            await gate.wait()
        except trio.Cancelled:
            cancelled.append(job)
            raise
        finished.append(job)

    pool = WorkerPool(run, max_idle=4)
    async with trio.open_nursery() as nursery:
        scopes = [pool.submit(nursery, job) for job in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        scopes[1].cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        # The cancelled worker is gone; the two others wait for work.
        assert len(pool._idle) == 2
        pool.submit(nursery, 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert cancelled == [1]
    assert sorted(finished) == [0, 2, 3]


async def test_a_job_cancelled_before_it_starts_is_cancelled() -> None:
    started: list[int] = []

    async def run(job: int) -> None:
        await trio.lowlevel.checkpoint()
        started.append(job)

    pool = WorkerPool(run, max_idle=1)
    async with trio.open_nursery() as nursery:
        pool.submit(nursery, 0)
        await trio.testing.wait_all_tasks_blocked()
        pool.submit(nursery, 1).cancel()  # handed to the idle worker, not yet run
        await trio.testing.wait_all_tasks_blocked()
        pool.submit(nursery, 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert started == [0, 2]


async def test_idle_workers_are_capped() -> None:
    gate = trio.Event()

    async def run(job: int) -> None:
        await gate.wait()

    pool = WorkerPool(run, max_idle=2)
    async with trio.open_nursery() as nursery:
        for job in range(6):
            pool.submit(nursery, job)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(pool._idle) == 2
        nursery.cancel_scope.cancel()
    assert pool._idle == []
