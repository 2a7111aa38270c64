"""Whose frame goes on the wire next: one at a time, small ones first.

A frame cannot be interrupted once its first byte is written, so a 16 MiB
prefill frame holds the connection for its whole transfer (tens of ms on
loopback, seconds on a slow link). What can be chosen is the order of the
frames waiting: a small frame (a decode step, a Cancel, a reply) overtakes
bulk frames queued ahead of it on other streams, so it waits for at most
the one bulk frame in progress, not for every one queued. A bulk payload
sent as a continued message (head frame, then CONTINUATION slices) pauses
between slices (``pause``): the small frames waiting then go, and a small
frame waits for one slice, not the whole payload.

Overtaking is bounded: after ``MAX_OVERTAKES`` turns in a row went past
the oldest waiter, the oldest goes, so a steady flow of small frames (many
sessions decoding) cannot starve a bulk frame for ever.

Order within a stream is kept (a StreamClose never passes its stream's
data, a Cancel never passes its Request), and frames on stream 0 (Ping,
Notify, GoAway) keep their place behind everything queued before them: a
GoAway passing one of our queued opens would make that open illegal.
"""

from __future__ import annotations

import trio

# Turns in a row that may pass the oldest waiter. A small frame carries at
# most 256 KiB (BULK_FRAME_BYTES in _connection), so a bulk frame waits for
# at most 8 MiB of small frames, half a 16 MiB prefill frame; at the usual
# 8 KiB decode step, 32 steps of other sessions.
MAX_OVERTAKES = 32


class _Waiter:
    __slots__ = ("bulk", "stream_id", "task")

    def __init__(self, task: trio.lowlevel.Task, stream_id: int, bulk: bool) -> None:
        self.task = task
        self.stream_id = stream_id
        self.bulk = bulk


class SendTurn:
    """``take_now()`` or ``await wait(...)``, then ``release()`` exactly once."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[_Waiter] = []
        self._overtakes = 0  # turns in a row given past the oldest waiter

    @property
    def busy(self) -> bool:
        """A frame is being written (or waits to be)."""
        return self._busy

    def take_now(self) -> bool:
        """Take the turn if nobody holds it (the common, uncontended case)."""
        if self._busy:
            return False
        self._busy = True
        return True

    async def wait(self, stream_id: int, bulk: bool) -> None:
        """Wait until the turn is handed to us."""
        waiter = _Waiter(trio.lowlevel.current_task(), stream_id, bulk)
        self._waiting.append(waiter)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiting.remove(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def release(self) -> None:
        """Hand the turn to the next waiter, or free it."""
        if not self._waiting:
            self._busy = False
            return
        waiter = self._waiting.pop(self._pick())
        trio.lowlevel.reschedule(waiter.task)

    async def pause(self, stream_id: int) -> None:
        """Between two frames of one continued message, holding the turn:
        let the small frames now waiting go (as ``release`` picks them,
        overtakes counted), then take the turn back ahead of every other
        waiter, bulk ones included: one continued message ends before
        another begins. Not cancellable, as the message must be finished:
        a cancel lands at the writer's next wait for the kernel."""
        if not self._waiting:
            return
        self._waiting.insert(0, _Waiter(trio.lowlevel.current_task(), stream_id, True))
        i = self._pick()
        waiter = self._waiting.pop(i)
        if i == 0:
            return
        trio.lowlevel.reschedule(waiter.task)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _pick(self) -> int:
        """The index of the waiter that goes next, overtakes bounded."""
        i = self._next()
        if i and self._overtakes < MAX_OVERTAKES:
            self._overtakes += 1
        else:
            i, self._overtakes = 0, 0
        return i

    def _next(self) -> int:
        """The first small frame on a stream with no bulk frame ahead of it;
        failing that, the oldest waiter."""
        held: set[int] = set()
        for i, waiter in enumerate(self._waiting):
            if waiter.stream_id == 0:
                # Nothing passes it, and it passes nothing: all before it
                # are held, so the oldest goes.
                return 0
            if waiter.bulk:
                held.add(waiter.stream_id)
            elif waiter.stream_id not in held:
                return i
        return 0
