"""One multiplexed connection: the trio driver around ``wire.WireConnection``.

Theory of operation. The codec owns the byte format and the stream state
machine; this module owns time and tasks. One reader task pulls bytes into
the codec and dispatches each event: replies wake the caller waiting on that
stream id, requests go to a pooled handler task (``_workers``) or, for a
method registered ``unary_inline`` while the send turn is free, are
answered on the reader itself (one task hand-off less per call), stream
opens start a handler task, stream messages go to that stream's bounded
inbox.
Writers take the send turn (``_send_turn``: one frame at a time, small
frames before queued bulk ones) so a frame's buffers are written back to
back. A payload over ``SLICE_BYTES`` goes as a continued message whose
writer pauses between slices for the small frames waiting. A frame the
kernel takes whole is written without waiting (the common case, and the
fast one: no cancel scope, no scheduler trip). A frame whose
sender is cancelled while it waits for the kernel is never left half
written, which would break the connection for every stream: a task of its
own (``_finish_frame``) writes the rest, holding the turn, and the stream is
then cancelled (``_drop``). Whatever ends the connection (EOF, a protocol
error, a socket error, a keepalive timeout, ``aclose``) goes through
``_end``, which records the reason once, closes the socket and fails
everything still waiting with that reason.

Decisions about a frame that arrives are made by ``_dispatch`` without I/O
beyond the reply it queues; calls by the application never touch the
socket except through ``_send``.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import trio

from ..errors import (
    AuthenticationError,
    BusyError,
    ConfigError,
    ConnectionBrokenError,
    ConnectionClosedError,
    DeadlineExceededError,
    IncompatiblePeerError,
    InvalidRequestError,
    LibpipeError,
    ProtocolError,
    RemoteError,
    error_from_remote,
)
from ..wire import (
    FEATURE_CONTINUATION,
    FEATURE_ZSTD,
    NEED_DATA,
    PROTOCOL_VERSION,
    Cancel,
    ConnectionEnded,
    ErrorReply,
    Event,
    GoAway,
    Hello,
    Limits,
    Notify,
    Ping,
    Pong,
    Request,
    Response,
    Role,
    StreamClose,
    StreamData,
    StreamOpen,
    WireConnection,
)
from ._identity import short_peer_id
from ._rpc import (
    END_OF_STREAM,
    CallContext,
    InlineHandler,
    Message,
    Router,
    Stream,
    _EndOfStream,
    fresh_error,
)
from ._send_turn import SendTurn
from ._transport import COALESCE_BYTES, SocketStream
from ._workers import WorkerPool

logger = logging.getLogger("libpipe.net")

# Bytes asked of the codec per read: large enough that a 16 MiB payload
# arrives in few syscalls, small enough to stay in cache for small frames.
READ_SIZE = 256 * 1024
# A frame carrying more tensor bytes than this is bulk (a prefill chunk, a
# weight transfer) and waits behind small ones (decode steps of up to a few
# dozen sequences, control frames) for the send turn.
BULK_FRAME_BYTES = 256 * 1024
# Payload bytes per CONTINUATION frame of a bulk message: a small frame
# waits for at most one slice (about 1 ms at 1 GB/s, instead of ~15 ms for
# a whole 16 MiB frame), at the cost of a 24-byte header and a turn check
# per MiB.
SLICE_BYTES = 1024 * 1024
# Handler tasks kept parked per connection for the next unary call: enough
# for a client's pipelined decode steps, few enough to cost nothing idle.
IDLE_UNARY_WORKERS = 8
# First bytes of a TLS record (handshake or alert, version 3.x): what a TLS
# server answers to a plaintext hello.
_TLS_RECORD_STARTS = (b"\x15\x03", b"\x16\x03")


@dataclass(frozen=True)
class ConnectionConfig:
    """Timing and buffering of a connection; every field has a reason."""

    limits: Limits = field(default_factory=Limits)
    compression: bool = True
    # Offer continued messages (bulk payloads in SLICE_BYTES slices, small
    # frames between them); used when both Hellos offer them.
    continuation: bool = True
    # A NAT forgets an idle TCP flow after ~30-120 s; a ping every 15 s keeps
    # it alive and measures RTT on the way.
    keepalive_interval: float = 15.0
    # Four missed keepalives: the peer is gone even if TCP has not noticed.
    idle_timeout: float = 60.0
    # Messages queued per stream before the reader stops reading (an
    # inference session exchanges one message per step, so a few suffice).
    stream_buffer: int = 8
    # How long a graceful close waits for in-flight calls to finish.
    close_grace: float = 30.0

    def __post_init__(self) -> None:
        for name in ("keepalive_interval", "idle_timeout", "close_grace"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.idle_timeout <= self.keepalive_interval:
            raise ConfigError("idle_timeout must exceed keepalive_interval")
        if self.stream_buffer < 1:
            raise ConfigError("stream_buffer must be at least 1")


class _PendingCall:
    """A call waiting for its reply. The caller parks its own task and the
    reader reschedules it directly: an RPC pays for every object and hop on
    its path, and a ``trio.Event`` would add both."""

    __slots__ = ("done", "error", "reply", "waiter")

    def __init__(self) -> None:
        self.done = False
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.waiter: trio.lowlevel.Task | None = None

    def finish(self, reply: Message | None, error: BaseException | None) -> None:
        self.done, self.reply, self.error = True, reply, error
        if self.waiter is not None:
            trio.lowlevel.reschedule(self.waiter)
            self.waiter = None

    async def wait(self) -> None:
        if self.done:
            return
        self.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class Connection:
    """A connection to one peer, carrying many concurrent calls and streams.

    ``connect``, ``serve`` and ``ConnectionPool`` make them over sockets; made
    directly over any ``trio.abc.Stream`` (e.g. ``memory_stream_pair()``),
    ``await run()`` drives it (``nursery.start(conn.run)`` returns after
    the hellos)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        role: Role,
        local_peer_id: str,
        address: str,
        verified_peer_id: str | None = None,
        expected_peer_id: str | None = None,
        router: Router | None = None,
        config: ConnectionConfig | None = None,
        model_id: str = "",
        info: Mapping[str, Any] | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.config = config or ConnectionConfig()
        self.address = address
        self.role = role
        self._stream = stream
        self._wire = WireConnection(role, self.config.limits, compression=self.config.compression)
        self._router = router or Router()
        self._local_peer_id = local_peer_id
        self._verified_peer_id = verified_peer_id
        self._expected_peer_id = expected_peer_id
        self._model_id = model_id
        self._info = dict(info or {})
        self._handshake_timeout = handshake_timeout
        # One frame at a time; small frames overtake queued bulk ones. Not a
        # trio.Lock: the common uncontended frame takes the turn with one
        # flag, no parking-lot bookkeeping.
        self._turn = SendTurn()
        self._ids = itertools.count(1 if role is Role.DIALER else 2, 2)
        self._nonces = itertools.count(1)
        self._calls: dict[int, _PendingCall] = {}
        self._streams: dict[int, Stream] = {}
        self._opened_by_us: set[int] = set()
        self._handlers: dict[int, trio.CancelScope] = {}
        self._unary_workers = WorkerPool(self._run_unary, max_idle=IDLE_UNARY_WORKERS)
        self._pings: dict[int, trio.Event] = {}
        self._highest_peer_stream = 0
        self._going_away = False  # we sent GoAway
        self._peer_going_away: int | None = None  # the peer's last_stream_id
        self._error: LibpipeError | None = None
        self._closed = trio.Event()
        self._quiet = trio.Event()
        self._last_received = 0.0
        self._stalled = False  # the reader waits for room in a stream's inbox
        self._first_bytes = b""
        self._nursery: trio.Nursery | None = None
        self.peer_hello: Hello | None = None
        self.rtt: float | None = None

    # --- identity -------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        """Verified under TLS; the peer's claim under ``--insecure``."""
        if self._verified_peer_id is not None:
            return self._verified_peer_id
        assert self.peer_hello is not None
        return self.peer_hello.peer_id

    @property
    def peer_verified(self) -> bool:
        return self._verified_peer_id is not None

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    @property
    def is_usable(self) -> bool:
        """Open, and neither side is winding it down: new calls may start."""
        return self._error is None and not self._going_away and self._peer_going_away is None

    @property
    def in_flight(self) -> int:
        return len(self._calls) + len(self._streams) + len(self._handlers)

    @functools.cached_property
    def peer_max_streams(self) -> int:
        """From the peer's hello (checked before every call we open: cached)."""
        assert self.peer_hello is not None
        value = self.peer_hello.info.get("max_open_streams")
        return value if isinstance(value, int) and value > 0 else Limits().max_open_streams

    def __repr__(self) -> str:
        who = short_peer_id(self.peer_id) if self.peer_hello else "?"
        return f"<Connection {who}@{self.address} in_flight={self.in_flight}>"

    # --- lifetime ---------------------------------------------------------------

    async def run(
        self, task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Exchange hellos, report started, then serve until the connection ends.

        Raises only before ``started`` (admission failed); afterwards the
        reason the connection ended is in ``error``, for calls to re-raise."""
        try:
            try:
                await self._exchange_hello()
            except LibpipeError as exc:
                await self._report_to_peer(exc)
                self._end(exc)
                raise
            task_status.started(self)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._keepalive)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._end(ConnectionClosedError("connection closed"))
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    @property
    def error(self) -> LibpipeError | None:
        return self._error

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self, reason: str = "closing") -> None:
        """Graceful close: tell the peer (GoAway), let in-flight calls and
        streams finish (up to ``close_grace``), then close."""
        if self._error is None and not self._going_away:
            self._going_away = True
            try:
                with trio.CancelScope(shield=True):
                    await self._send(GoAway(self._highest_peer_stream, reason))
            except LibpipeError:
                pass
        with trio.move_on_after(self.config.close_grace) as scope:
            scope.shield = True
            while self.in_flight and self._error is None:
                self._quiet = trio.Event()
                await self._quiet.wait()
        self._end(ConnectionClosedError(f"connection closed ({reason})"))

    def abort(self, error: LibpipeError | None = None) -> None:
        """Close at once; everything in flight fails with ``error``."""
        self._end(error or ConnectionClosedError("connection aborted"))

    def _end(self, error: LibpipeError) -> None:
        if self._error is not None:
            return
        self._error = error
        # A socket closes at once and wakes its blocked tasks; other streams
        # are closed by ``run`` once its tasks are cancelled.
        if isinstance(self._stream, SocketStream):
            self._stream.close()
        for call in self._calls.values():
            call.finish(None, error)
        for stream in self._streams.values():
            stream.fail(error)
        for scope in self._handlers.values():
            scope.cancel()
        for pong in self._pings.values():
            pong.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self._quiet.set()
        self._closed.set()

    def _check_quiet(self) -> None:
        if not self.in_flight:
            self._quiet.set()

    # --- sending ------------------------------------------------------------------

    async def _send(self, event: Event, *, only_if_open: bool = False) -> None:
        """Write one frame. ``only_if_open``: skip it if the stream ended while
        we waited for the turn (a Cancel overtaken by the peer's reply)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._turn.take_now():
            await self._turn.wait(getattr(event, "stream_id", 0), _is_bulk(event))
        handed_off = False
        try:
            if self._error is not None:
                raise fresh_error(self._error)
            if only_if_open and self._wire.stream_state(getattr(event, "stream_id", 0)) is None:
                return
            # One frame, or a continued message's head and its slices.
            later = self._wire.send_frames(event, SLICE_BYTES)
            buffers = later.pop(0)
            sid = getattr(event, "stream_id", 0)
            try:
                if isinstance(self._stream, SocketStream):
                    # Most frames go whole at once: no cancel scope, no wait.
                    rest = self._stream.send_now(buffers)
                    if rest or later:
                        try:
                            await self._write_rest(rest, later, sid)
                        except trio.Cancelled:
                            if self._nursery is not None and self._error is None:
                                # The caller gives up; the frame cannot (half
                                # a frame would break the connection for
                                # every stream). A task finishes it, holding
                                # the turn, while the cancel goes on.
                                self._nursery.start_soon(self._finish_frame, rest, later, sid)
                                handed_off = True
                            raise
                else:
                    # Any trio stream (tests' memory streams): a small frame
                    # is shielded, a large one cut by a cancel breaks the
                    # connection below.
                    for i, frame in enumerate([buffers, *later]):
                        if i:
                            await self._turn.pause(sid)
                        small = sum(memoryview(b).nbytes for b in frame) <= COALESCE_BYTES
                        with trio.CancelScope(shield=small):
                            await self._stream.send_all(b"".join(frame))
            except BaseException as exc:
                if handed_off:
                    raise
                # Part of the frame may be on the wire: nothing can follow it.
                self._end(_as_broken(exc, "sending"))
                if isinstance(exc, trio.Cancelled):
                    raise
                raise fresh_error(self._error) from exc
        finally:
            if not handed_off:
                self._turn.release()

    async def _write_rest(self, rest: list[memoryview], later: list[list[Any]], sid: int) -> None:
        """Finish the frame begun (``rest``), then the continued message's
        ``later`` frames, pausing between them for waiting small frames.
        Both lists are consumed in place: if this is cancelled, they hold
        what is still to write."""
        assert isinstance(self._stream, SocketStream)
        while True:
            if rest:
                await self._stream.send_rest(rest)
            if not later:
                return
            await self._turn.pause(sid)
            rest[:] = self._stream.send_now(later.pop(0))

    async def _finish_frame(self, rest: list[memoryview], later: list[list[Any]], sid: int) -> None:
        """Write the rest of a frame (and of its continued message) whose
        sender was cancelled, then pass the turn on. Cancelled only when the
        connection ends."""
        try:
            await self._write_rest(rest, later, sid)
        except BaseException as exc:
            self._end(_as_broken(exc, "sending"))
            if not isinstance(exc, LibpipeError):
                raise
        finally:
            self._turn.release()

    async def _send_quietly(self, event: Event) -> None:
        """For frames whose failure the connection already records."""
        try:
            with trio.CancelScope(shield=True):
                await self._send(event)
        except LibpipeError:
            pass

    async def _drop(self, sid: int) -> None:
        """Our call or stream ``sid`` ends on our side: cancel it if the peer
        knows of it (its opening frame was encoded: written, or being
        finished by ``_finish_frame``), else just forget it.

        The id stays registered until the Cancel is written, so a reply that
        arrives meanwhile is known as this call's (and dropped), the peer's
        stream cap is respected (it counts the stream until it reads the
        Cancel), and a graceful close waits for the Cancel. When another
        frame (perhaps a bulk one) is being written, the Cancel waits for it
        in a task of its own: the caller that gave up does not."""
        if self._wire.stream_state(sid) is None or self._nursery is None:
            self._finish_call(sid)
            self._forget_stream(sid)
        elif self._turn.busy:
            self._nursery.start_soon(self._cancel_and_forget, sid)
        else:
            with trio.CancelScope(shield=True):
                await self._cancel_and_forget(sid)

    async def _cancel_and_forget(self, sid: int) -> None:
        try:
            # Not sent if the peer's last frame on it arrived meanwhile.
            await self._send(Cancel(sid), only_if_open=True)
        except LibpipeError:
            pass
        finally:
            self._finish_call(sid)
            self._forget_stream(sid)

    async def _report_to_peer(self, exc: LibpipeError) -> None:
        """Tell the peer why we drop it (best effort, bounded)."""
        if self._error is not None:
            return
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await self._send(ErrorReply(0, exc.kind, exc.message, _plain(exc.details)))
            except (LibpipeError, ValueError, TypeError):
                pass

    # --- receiving ------------------------------------------------------------------

    async def _next_event(self) -> object:
        while True:
            event = self._wire.next_event()
            if event is not NEED_DATA:
                return event
            await self._receive_more()

    async def _receive_more(self) -> None:
        """Feed the codec what the peer sent next (waiting for it)."""
        if isinstance(self._stream, SocketStream):
            buffer = self._wire.get_buffer(READ_SIZE)
            n = await self._stream.receive_into(buffer)
            self._last_received = trio.current_time()
            if len(self._first_bytes) < 2:
                self._first_bytes += bytes(buffer[: 2 - len(self._first_bytes)][:n])
            if n:
                self._wire.buffer_updated(n)
            else:
                self._wire.receive_data(b"")
        else:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _as_broken(exc, "receiving") from exc
            self._last_received = trio.current_time()
            if len(self._first_bytes) < 2:
                self._first_bytes += data[: 2 - len(self._first_bytes)]
            self._wire.receive_data(data)

    async def _exchange_hello(self) -> None:
        features = frozenset(
            name
            for name, offered in (
                (FEATURE_ZSTD, self.config.compression),
                (FEATURE_CONTINUATION, self.config.continuation),
            )
            if offered
        )
        hello = Hello(
            version=PROTOCOL_VERSION,
            peer_id=self._local_peer_id,
            role="dialer" if self.role is Role.DIALER else "acceptor",
            model_id=self._model_id,
            features=features,
            info={**self._info, "max_open_streams": self.config.limits.max_open_streams},
        )
        with trio.move_on_after(self._handshake_timeout) as scope:
            await self._send(hello)
            try:
                event = await self._next_event()
            except ConnectionBrokenError as exc:
                raise ConnectionBrokenError(
                    f"{self.address} dropped us before its hello "
                    f"(does it require TLS, or did it refuse us?): {exc}"
                ) from exc
            except ProtocolError as exc:
                if self._first_bytes in _TLS_RECORD_STARTS:
                    raise AuthenticationError(
                        f"{self.address} speaks TLS and we are --insecure"
                    ) from exc
                raise
        if scope.cancelled_caught:
            raise ProtocolError(f"{self.address} sent no hello within {self._handshake_timeout} s")
        if isinstance(event, ConnectionEnded):
            raise ConnectionBrokenError(
                f"{self.address} closed the connection before its hello "
                "(does it require TLS, or did it refuse us?)"
            )
        if isinstance(event, ErrorReply):
            raise error_from_remote(event.kind, event.message, event.details)
        if not isinstance(event, Hello):
            raise ProtocolError(f"{self.address} sent {type(event).__name__} before its hello")
        if event.version != PROTOCOL_VERSION:
            raise IncompatiblePeerError(
                f"{self.address} speaks protocol {event.version}, we speak {PROTOCOL_VERSION}",
                peer_version=event.version,
            )
        claimed = event.peer_id
        if self._verified_peer_id is not None and claimed != self._verified_peer_id:
            raise AuthenticationError(
                f"{self.address} claims to be {short_peer_id(claimed)} but its certificate "
                f"is {short_peer_id(self._verified_peer_id)}"
            )
        if self._expected_peer_id is not None and claimed != self._expected_peer_id:
            raise AuthenticationError(
                f"{self.address} is {short_peer_id(claimed)}, "
                f"expected {short_peer_id(self._expected_peer_id)}"
            )
        self.peer_hello = event

    async def _read_loop(self) -> None:
        try:
            while True:
                event = self._wire.next_event()
                if event is NEED_DATA:
                    # Read, then ask the codec again: asking first would
                    # parse nothing twice per frame.
                    await self._receive_more()
                    continue
                if isinstance(event, ConnectionEnded):
                    self._end(
                        ConnectionClosedError("connection closed")
                        if self._going_away or self._peer_going_away is not None
                        else ConnectionBrokenError(f"{self.address} closed the connection")
                    )
                    return
                # The two frames of every unary call, and a stream message
                # its inbox has room for, skip the dispatcher's coroutine: on
                # a small RPC or a decode step its creation is a visible cost.
                kind = type(event)
                if kind is Response:
                    self._finish_call(event.stream_id, reply=_message(event))
                elif kind is Request:
                    self._start_handler(event)
                elif kind is StreamData:
                    stream = self._streams.get(event.stream_id)
                    if stream is not None:
                        message = _message(event)
                        if not stream.deliver_nowait(message):
                            await self._deliver_when_room(stream, message)
                else:
                    await self._dispatch(event)
        except ProtocolError as exc:
            logger.warning("dropping %r: %s", self, exc)
            await self._report_to_peer(exc)
            self._end(exc)
        except LibpipeError as exc:
            self._end(exc)
        except _PeerFailed as exc:
            self._end(exc.error)
        except Exception as exc:
            # A bug here must cost this connection only, never the server or
            # pool whose nursery runs it.
            logger.exception("internal error on %r", self)
            self._end(ConnectionBrokenError(f"internal error: {type(exc).__name__}: {exc}"))

    async def _dispatch(self, event: object) -> None:
        match event:
            case Request() | StreamOpen():
                self._start_handler(event)
            case Response(stream_id=sid):
                self._finish_call(sid, reply=_message(event))
            case StreamClose(stream_id=sid) if sid in self._streams:
                stream = self._streams[sid]
                if not stream.deliver_nowait(END_OF_STREAM):
                    await self._deliver_when_room(stream, END_OF_STREAM)
                stream.receive_closed = True
                if stream.send_closed:
                    self._forget_stream(sid)
            case ErrorReply(stream_id=0):
                raise _PeerFailed(error_from_remote(event.kind, event.message, event.details))
            case ErrorReply(stream_id=sid):
                error = error_from_remote(event.kind, event.message, event.details)
                if sid in self._calls:
                    self._finish_call(sid, error=error)
                elif sid in self._streams:
                    self._streams[sid].fail(error)
                    self._forget_stream(sid)
            case Cancel(stream_id=sid):
                if sid in self._handlers:
                    self._handlers[sid].cancel()
                if sid in self._streams:
                    self._streams[sid].fail(ConnectionClosedError("the peer cancelled the stream"))
                    self._forget_stream(sid)
            case Notify(method=method):
                handler = self._router.notify_handlers.get(method)
                if handler is not None:
                    ctx = self._context(method, 0)
                    assert self._nursery is not None
                    self._nursery.start_soon(_contained, handler(ctx, dict(event.meta)), method)
            case Ping(nonce=nonce):
                await self._send_quietly(Pong(nonce))
            case Pong(nonce=nonce) if nonce in self._pings:
                self._pings[nonce].set()
            case GoAway(last_stream_id=last):
                self._peer_going_away = last
                refused = ConnectionClosedError("the peer is closing and did not take this call")
                for sid in [s for s in self._opened_by_us if s > last]:
                    if sid in self._calls:
                        self._finish_call(sid, error=refused)
                    elif sid in self._streams:
                        self._streams[sid].fail(refused)
                        self._forget_stream(sid)
            case _:
                # Replies for calls that were cancelled meanwhile: nobody waits.
                pass

    async def _deliver_when_room(self, stream: Stream, item: Message | _EndOfStream) -> None:
        """Wait for room in ``stream``'s inbox. While a full inbox holds the
        reader, the peer is not silent: we are not listening. Keepalive must
        not count that time."""
        self._stalled = True
        try:
            await stream.deliver(item)
        finally:
            self._stalled = False
            self._last_received = trio.current_time()

    # --- the peer's calls -------------------------------------------------------------

    def _context(self, method: str, stream_id: int) -> CallContext:
        assert self.peer_hello is not None
        return CallContext(
            peer_id=self.peer_id,
            peer_verified=self.peer_verified,
            address=self.address,
            method=method,
            stream_id=stream_id,
            peer_info=self.peer_hello.info,
        )

    def _start_handler(self, event: Request | StreamOpen) -> None:
        sid, method = event.stream_id, event.method
        self._highest_peer_stream = max(self._highest_peer_stream, sid)
        assert self._nursery is not None
        opening = _message(event)
        if isinstance(event, Request):
            inline = self._router.inline_handlers.get(method)
            if (
                inline is not None
                and isinstance(self._stream, SocketStream)
                and self._error is None
                and self._turn.take_now()
            ):
                self._answer_inline(sid, method, inline, opening)
                return
            self._handlers[sid] = self._unary_workers.submit(self._nursery, (sid, method, opening))
        else:
            scope = trio.CancelScope()
            self._handlers[sid] = scope
            stream = Stream(self, sid, method, opening, self.config.stream_buffer)
            self._streams[sid] = stream
            self._nursery.start_soon(self._run_stream, scope, stream)

    def _answer_inline(
        self, sid: int, method: str, handler: InlineHandler, request: Message
    ) -> None:
        """Answer a call on the reader task, holding the send turn (taken by
        the caller, free: the reader never waits for it, since a peer that
        waits for us to read would then wait for ever). Nothing yields
        between the request and its reply, so no Cancel can come between."""
        try:
            try:
                result = handler(self._context(method, sid), request)
                reply: Response | ErrorReply = _response(sid, method, result)
            except Exception as exc:
                reply = _error_reply(sid, method, exc)
            try:
                buffers = self._wire.send(reply)
            except (LibpipeError, ValueError, TypeError) as exc:
                logger.warning("reply to %s could not be encoded: %s", method, exc)
                buffers = self._wire.send(
                    ErrorReply(sid, RemoteError.kind, f"unencodable reply: {exc}", {})
                )
            assert isinstance(self._stream, SocketStream)
            rest = self._stream.send_now(buffers)
        except BaseException:
            self._turn.release()
            raise
        if rest:
            # The kernel's buffer is full: a task finishes the frame, holding
            # the turn, while the reader goes on reading.
            assert self._nursery is not None
            self._nursery.start_soon(self._finish_frame, rest)
        else:
            self._turn.release()
        self._check_quiet()

    async def _run_unary(self, job: tuple[int, str, Message]) -> None:
        """One peer call, on a pooled worker whose scope the peer's Cancel
        cancels (then the reply, if any, is not sent)."""
        sid, method, request = job
        try:
            try:
                # No check for our GoAway here: the codec drops opens above
                # its last_stream_id, so a call that got here is one it
                # promised to finish.
                handler = self._router.unary_handlers.get(method)
                if handler is None:
                    raise InvalidRequestError(f"unknown method {method!r}")
                result = await handler(self._context(method, sid), request)
                reply: Response | ErrorReply = _response(sid, method, result)
            except Exception as exc:
                reply = _error_reply(sid, method, exc)
            finally:
                del self._handlers[sid]
            await self._send_reply(reply, sid, method)
        finally:
            self._check_quiet()

    async def _run_stream(self, scope: trio.CancelScope, stream: Stream) -> None:
        sid, method = stream.stream_id, stream.method
        reply: Response | ErrorReply | None = None
        with scope:
            try:
                handler = self._router.stream_handlers.get(method)
                if handler is None:
                    raise InvalidRequestError(f"unknown stream method {method!r}")
                await handler(self._context(method, sid), stream)
                if not stream.send_closed:
                    await stream.close_send()
            except Exception as exc:
                reply = _error_reply(sid, method, exc)
        del self._handlers[sid]
        # Whatever the peer still sends on this stream is dropped, not queued.
        stream.discard()
        if reply is not None and not scope.cancelled_caught and sid in self._streams:
            self._forget_stream(sid)
            await self._send_reply(reply, sid, method)
        self._check_quiet()

    async def _send_reply(self, reply: Response | ErrorReply, sid: int, method: str) -> None:
        try:
            # The peer may have cancelled while the reply was being made:
            # then nobody waits for it, and it is dropped unencoded.
            await self._send(reply, only_if_open=True)
        except (LibpipeError, ValueError, TypeError) as exc:
            if self._error is None:
                # The handler's answer cannot be encoded: the caller hears
                # why instead of waiting forever.
                logger.warning("reply to %s could not be encoded: %s", method, exc)
                await self._send_quietly(
                    ErrorReply(sid, RemoteError.kind, f"unencodable reply: {exc}", {})
                )

    # --- our calls -----------------------------------------------------------------

    def _open_stream_id(self) -> int:
        if self._error is not None:
            raise fresh_error(self._error)
        if self._going_away or self._peer_going_away is not None:
            raise ConnectionClosedError("connection is closing; use another one")
        if len(self._opened_by_us) >= self.peer_max_streams:
            raise BusyError(
                f"{self.address} takes at most {self.peer_max_streams} concurrent streams",
                limit=self.peer_max_streams,
            )
        sid = next(self._ids)
        self._opened_by_us.add(sid)
        return sid

    def _finish_call(
        self, sid: int, *, reply: Message | None = None, error: BaseException | None = None
    ) -> None:
        call = self._calls.pop(sid, None)
        self._opened_by_us.discard(sid)
        if call is not None:
            call.finish(reply, error)
        self._check_quiet()

    def _forget_stream(self, sid: int) -> None:
        self._streams.pop(sid, None)
        self._opened_by_us.discard(sid)
        self._check_quiet()

    async def call(
        self,
        method: str,
        meta: dict[str, Any] | None = None,
        tensors: tuple[torch.Tensor, ...] = (),
        *,
        timeout: float | None = None,
    ) -> Message:
        """A unary call. Raises the peer's error as its own class,
        ``DeadlineExceededError`` after ``timeout`` seconds (the peer is told
        to stop), and lets the caller's cancel scope abandon the call; either
        way only this call ends, not the connection."""
        sid = self._open_stream_id()
        call = _PendingCall()
        self._calls[sid] = call
        try:
            if timeout is None:
                # Without a deadline there is no cancel scope to pay for.
                await self._send(Request(sid, method, meta or {}, tuple(tensors)))
                await call.wait()
            else:
                with trio.move_on_after(timeout) as scope:
                    await self._send(Request(sid, method, meta or {}, tuple(tensors)))
                    await call.wait()
                if scope.cancelled_caught:
                    raise DeadlineExceededError(
                        f"{method} did not finish within {timeout} s", method=method
                    )
        finally:
            if not call.done:
                await self._drop(sid)
        if call.error is not None:
            raise fresh_error(call.error)
        assert call.reply is not None
        return call.reply

    @asynccontextmanager
    async def open_stream(
        self,
        method: str,
        meta: dict[str, Any] | None = None,
        tensors: tuple[torch.Tensor, ...] = (),
    ) -> AsyncIterator[Stream]:
        """A bidirectional stream. Leaving the block half-closes our side and
        abandons what the peer has not sent yet; leaving it by an exception
        or cancellation cancels the stream (only the stream)."""
        sid = self._open_stream_id()
        stream = Stream(
            self, sid, method, Message(meta or {}, tuple(tensors)), self.config.stream_buffer
        )
        self._streams[sid] = stream
        try:
            await self._send(StreamOpen(sid, method, meta or {}, tuple(tensors)))
        except BaseException:
            stream.discard()
            await self._drop(sid)
            raise
        clean = False
        try:
            yield stream
            clean = True
        finally:
            stream.discard()
            if clean and stream.receive_closed and sid in self._streams and self._error is None:
                with trio.CancelScope(shield=True):
                    await stream.close_send()
                self._forget_stream(sid)
            else:
                # What the peer sends meanwhile meets a discarded inbox.
                await self._drop(sid)

    async def send_stream_data(
        self, sid: int, meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]
    ) -> None:
        await self._send(StreamData(sid, meta, tuple(tensors)))

    async def send_stream_close(self, sid: int, meta: dict[str, Any]) -> None:
        await self._send(StreamClose(sid, meta))
        stream = self._streams.get(sid)
        if stream is not None and stream.receive_closed:
            self._forget_stream(sid)

    async def notify(self, method: str, meta: dict[str, Any] | None = None) -> None:
        """A one-way message (gossip piggybacking): no reply, no stream."""
        if self._error is not None:
            raise fresh_error(self._error)
        await self._send(Notify(method, meta or {}))

    async def ping(self) -> float:
        """Round-trip time in seconds, measured with a Ping frame."""
        nonce = next(self._nonces)
        pong = trio.Event()
        self._pings[nonce] = pong
        try:
            start = trio.current_time()
            await self._send(Ping(nonce))
            await pong.wait()
            if self._error is not None:
                raise fresh_error(self._error)
            self.rtt = trio.current_time() - start
            return self.rtt
        finally:
            del self._pings[nonce]

    async def _keepalive(self) -> None:
        interval, idle_timeout = self.config.keepalive_interval, self.config.idle_timeout
        while self._error is None:
            silent = 0.0 if self._stalled else trio.current_time() - self._last_received
            if silent >= idle_timeout:
                self._end(ConnectionBrokenError(f"{self.address} silent for {silent:.1f} s"))
                return
            if silent >= interval:
                try:
                    await self._send(Ping(next(self._nonces)))
                except LibpipeError:
                    return
            await trio.sleep(min(interval, idle_timeout - silent))


class _PeerFailed(Exception):
    """The peer reported a connection-level error (stream 0) and hangs up.

    Not a ``LibpipeError``, so that it is never mistaken for our own error."""

    def __init__(self, error: LibpipeError) -> None:
        super().__init__(str(error))
        self.error = error


def _is_bulk(event: Event) -> bool:
    """Whether ``event`` is a bulk frame that small ones may overtake."""
    tensors = getattr(event, "tensors", ())
    return sum(t.numel() * t.element_size() for t in tensors) > BULK_FRAME_BYTES


def _message(event: Request | Response | StreamOpen | StreamData) -> Message:
    """A received event as a Message. Its meta is the dict msgpack made for
    it, held by nobody else: no copy."""
    return Message(cast(dict[str, Any], event.meta), event.tensors)


def _response(sid: int, method: str, result: object) -> Response:
    if not isinstance(result, Message):
        raise TypeError(f"handler for {method!r} returned {type(result).__name__}, not Message")
    return Response(sid, result.meta, result.tensors)


def _error_reply(sid: int, method: str, exc: Exception) -> ErrorReply:
    if isinstance(exc, LibpipeError):
        return ErrorReply(sid, exc.kind, exc.message, _plain(exc.details))
    logger.exception("handler for %s failed", method, exc_info=exc)
    return ErrorReply(sid, RemoteError.kind, f"{type(exc).__name__}: {exc}", {})


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    """Details that msgpack can carry; others become their repr."""
    plain_types = (str, int, float, bool, type(None), list, dict)
    return {k: v if isinstance(v, plain_types) else repr(v) for k, v in details.items()}


def _as_broken(exc: BaseException, doing: str) -> LibpipeError:
    if isinstance(exc, LibpipeError):
        return exc
    if isinstance(exc, trio.Cancelled):
        return ConnectionBrokenError(f"a send was cancelled mid-frame while {doing}")
    return ConnectionBrokenError(f"connection failed while {doing}: {exc}")


async def _contained(awaitable: Any, method: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("notify handler for %s failed", method)
