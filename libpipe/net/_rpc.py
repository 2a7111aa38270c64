"""What RPC handlers and callers see: messages, call context, the router
and bidirectional streams. No bytes here; the connection moves them."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import trio
from outcome import Value

from ..errors import ConfigError, ConnectionClosedError, LibpipeError

if TYPE_CHECKING:
    from ._connection import Connection


def fresh_error(error: BaseException) -> BaseException:
    """A new error of the same class, message and details as ``error``, for
    one of the several tasks a failure reaches (a connection's end fails
    every call on it). Raising one object in many tasks would chain each
    task's traceback onto the last and let one handler's edits show in all.
    The cause, the underlying reason, is shared: nothing raises it again."""
    if not isinstance(error, LibpipeError):
        return error
    copy = type(error)(error.message, **error.details)
    copy.remote = error.remote
    copy.__cause__ = error.__cause__
    return copy


@dataclass(frozen=True, slots=True)
class Message:
    """One message: a msgpack-able metadata map and tensors sent raw."""

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling, for handlers that log, authorise or ban.

    ``peer_verified`` is False on an insecure connection, where ``peer_id``
    is only what the peer claimed in its hello."""

    peer_id: str
    peer_verified: bool
    address: str
    method: str
    stream_id: int
    peer_info: Mapping[str, Any]


UnaryHandler = Callable[[CallContext, Message], Awaitable[Message]]
InlineHandler = Callable[[CallContext, Message], Message]
StreamHandler = Callable[[CallContext, "Stream"], Awaitable[None]]
NotifyHandler = Callable[[CallContext, dict[str, Any]], Awaitable[None]]


class Router:
    """Method name -> handler, for one server (or a client that also serves)."""

    def __init__(self) -> None:
        self.unary_handlers: dict[str, UnaryHandler] = {}
        self.inline_handlers: dict[str, InlineHandler] = {}
        self.stream_handlers: dict[str, StreamHandler] = {}
        self.notify_handlers: dict[str, NotifyHandler] = {}

    def unary(self, method: str, handler: UnaryHandler) -> None:
        self._check_free(method)
        self.unary_handlers[method] = handler

    def unary_inline(self, method: str, handler: InlineHandler) -> None:
        """A unary method answered by a plain function on the connection's
        reader task, without handing the call to a handler task: for answers
        made from memory (an info or ping reply). It must not block (while it
        runs the connection reads nothing); anything that waits belongs in
        ``unary``. When a frame is being written the call goes to a handler
        task like any other, since the reader never waits to send."""
        self._check_free(method)
        self.inline_handlers[method] = handler

        async def on_handler_task(ctx: CallContext, request: Message) -> Message:
            return handler(ctx, request)

        self.unary_handlers[method] = on_handler_task

    def stream(self, method: str, handler: StreamHandler) -> None:
        self._check_free(method)
        self.stream_handlers[method] = handler

    def notify(self, method: str, handler: NotifyHandler) -> None:
        if method in self.notify_handlers:
            raise ConfigError(f"notify method {method!r} is registered twice")
        self.notify_handlers[method] = handler

    def _check_free(self, method: str) -> None:
        if not method or method in self.unary_handlers or method in self.stream_handlers:
            raise ConfigError(f"method {method!r} is empty or registered twice")


class _EndOfStream:
    """Queued after the last message when the peer half-closes."""


END_OF_STREAM = _EndOfStream()


class Stream:
    """A bidirectional stream of messages within one connection.

    ``receive()`` raises ``trio.EndOfChannel`` once the peer has closed its
    side, and the peer's error (as its ``libpipe.errors`` class) if it
    ended the stream with one. Messages queue in a bounded inbox; when it
    is full the connection stops reading, so the sender is slowed down
    rather than memory growing.

    The inbox is a deque and the parked tasks, not a trio memory channel:
    a decode step crosses it once per hop each way, and a message that
    finds its receiver waiting is handed straight to that task (one
    ``reschedule``, no channel bookkeeping). Only the connection's reader
    delivers, so at most one delivery waits for room at a time."""

    def __init__(
        self, connection: Connection, stream_id: int, method: str, opening: Message, buffer: int
    ) -> None:
        self.stream_id = stream_id
        self.method = method
        self.opening = opening
        self._connection = connection
        self.send_closed = False
        self.receive_closed = False
        self._failure: BaseException | None = None
        self._capacity = buffer
        self._queue: deque[Message | _EndOfStream] = deque()
        self._receivers: deque[trio.lowlevel.Task] = deque()  # parked in receive
        # The reader, parked with the message that found the inbox full.
        self._deliverer: trio.lowlevel.Task | None = None
        self._held: Message | _EndOfStream | None = None
        self._ended = False  # fail(): nothing more arrives after what is queued
        self._discarded = False  # discard(): nobody here listens any more

    async def send(
        self, meta: dict[str, Any] | None = None, tensors: tuple[torch.Tensor, ...] = ()
    ) -> None:
        if self._failure is not None:
            # The peer ended the stream (its error, or its Cancel) or the
            # connection ended: say that, not that the frame is out of turn.
            raise fresh_error(self._failure)
        if self.send_closed:
            raise ConnectionClosedError(f"stream {self.stream_id} is closed for sending")
        await self._connection.send_stream_data(self.stream_id, meta or {}, tensors)

    async def close_send(self, meta: dict[str, Any] | None = None) -> None:
        """Half-close: this side sends nothing more (the peer sees end of stream)."""
        if self._failure is not None and not self.send_closed:
            raise fresh_error(self._failure)
        if not self.send_closed:
            self.send_closed = True
            await self._connection.send_stream_close(self.stream_id, meta or {})

    async def receive(self) -> Message:
        """The next message: a checkpoint whether or not one is waiting, as
        a channel's ``receive`` is; a cancelled wait loses no message."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._queue:
            item = self._take()
            await trio.lowlevel.cancel_shielded_checkpoint()
        elif self._ended or self._discarded:
            item = _CLOSED
        else:
            task = trio.lowlevel.current_task()
            self._receivers.append(task)

            def abort(_: object) -> trio.lowlevel.Abort:
                self._receivers.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            item = await trio.lowlevel.wait_task_rescheduled(abort)
        if item is _CLOSED:
            if self._failure is not None:
                raise fresh_error(self._failure) from None
            raise trio.EndOfChannel
        if isinstance(item, _EndOfStream):
            self.receive_closed = True
            self._close_inbox()
            raise trio.EndOfChannel
        return item

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def deliver_nowait(self, item: Message | _EndOfStream) -> bool:
        """Hand ``item`` to a waiting receiver or queue it; False (and
        nothing done) when the inbox is full. An item for an inbox nobody
        listens to any more is dropped (True)."""
        if self._ended or self._discarded:
            return True
        if self._receivers:
            trio.lowlevel.reschedule(self._receivers.popleft(), Value(item))
            return True
        if len(self._queue) < self._capacity:
            self._queue.append(item)
            return True
        return False

    async def deliver(self, item: Message | _EndOfStream) -> None:
        """Called by the connection's reader; blocks while the inbox is
        full. A message that fits is handed over without a schedule point:
        the reader goes on to its next frame at once."""
        if self.deliver_nowait(item):
            return
        assert self._deliverer is None, "only the connection's reader delivers"
        self._deliverer, self._held = trio.lowlevel.current_task(), item

        def abort(_: object) -> trio.lowlevel.Abort:
            self._deliverer = self._held = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _take(self) -> Message | _EndOfStream:
        item = self._queue.popleft()
        if self._deliverer is not None:
            # Room again: the held message joins the queue, the reader reads on.
            assert self._held is not None
            self._queue.append(self._held)
            self._wake_deliverer()
        return item

    def _wake_deliverer(self) -> None:
        if self._deliverer is not None:
            trio.lowlevel.reschedule(self._deliverer)
            self._deliverer = self._held = None

    def fail(self, error: BaseException) -> None:
        """End the inbox with ``error`` after what is queued (connection
        teardown; never blocks). A message waiting for room is dropped."""
        if self._failure is None:
            self._failure = error
        self._ended = True
        self._wake_deliverer()
        while self._receivers:
            trio.lowlevel.reschedule(self._receivers.popleft(), Value(_CLOSED))

    def discard(self) -> None:
        """Nobody here listens any more: what is queued and what still
        arrives is dropped."""
        self._close_inbox()

    def _close_inbox(self) -> None:
        self._discarded = True
        self._queue.clear()
        self._wake_deliverer()
        while self._receivers:
            trio.lowlevel.reschedule(self._receivers.popleft(), Value(_CLOSED))


# What a parked receiver is woken with when the inbox ends.
_CLOSED: Any = object()
