"""The compute thread of one device: a long-lived thread fed by a queue.

Why not ``trio.to_thread.run_sync`` per batch: every call picks a cached
thread, renames it, copies the context, acquires a limiter and wraps the
outcome, and its result reaches the caller only after the loop has
rescheduled the waiting task. On a 2-core VM that is ~30 us more per call
than this thread, and ``bench/e2e.py`` pays it on every hop of every
decode step. Here a job goes into a ``SimpleQueue``; when it is done the
thread hands ``on_done`` to the event loop with ``TrioToken.run_sync_soon``,
so the loop wakes the waiting tasks itself in one step.

Jobs never raise into the thread (the executor records each job's error
in the job); should one raise anyway, ``on_done`` gets that error so its
jobs fail instead of hanging.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import trio

logger = logging.getLogger("libpipe.server")

_STOP = None
# Seconds ``stop`` waits for the thread to exit.
STOP_WAIT = 5.0


class ComputeThread:
    """Runs ``submit``-ted functions one at a time, in order, off the event loop.

    ``start`` from inside ``trio.run``; ``stop`` lets the thread finish its
    current job and exit."""

    def __init__(self, name: str = "libpipe-compute") -> None:
        self.name = name
        self._inbox: queue.SimpleQueue[
            tuple[Callable[[], None], Callable[[BaseException | None], None]] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._loop, args=(token,), name=self.name, daemon=True
        )
        self._thread.start()

    def submit(
        self, fn: Callable[[], None], on_done: Callable[[BaseException | None], None]
    ) -> None:
        """Queue ``fn``; then ``on_done(error)`` runs on the event loop
        (``error`` is ``None`` if ``fn`` returned)."""
        self._inbox.put((fn, on_done))

    def stop(self) -> None:
        """Ask the thread to exit and wait for it (briefly: callers stop it
        idle). A daemon thread still alive when the interpreter finalizes
        can abort the process ("terminate called without an active
        exception", exit status -6) instead of a clean exit."""
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT)

    def _loop(self, token: trio.lowlevel.TrioToken) -> None:
        while (item := self._inbox.get()) is not _STOP:
            fn, on_done = item
            error: BaseException | None = None
            try:
                fn()
            except BaseException as exc:  # reported to the jobs' callers, not lost
                logger.exception("a compute job raised")
                error = exc
            try:
                token.run_sync_soon(on_done, error)
            except trio.RunFinishedError:
                return
