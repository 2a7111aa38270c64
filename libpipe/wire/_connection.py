"""WireConnection: one side of a connection as a sans-io state machine.

Theory of operation. Bytes arrive through ``receive_data`` or, to save a
copy, through ``get_buffer``/``buffer_updated`` (the caller reads from the
socket straight into our buffer). Until a whole header is there, bytes sit in
a small staging buffer. A frame found whole in staging is decoded from it
(its payload copied out, since staging is reused). Otherwise, once its header
is parsed and every declared length checked against ``Limits``, the frame's
body gets a buffer of its own, exactly its size: the rest of the frame lands
there, and the tensors of the event view that buffer. A continued message
(head frame, then CONTINUATION slices, other streams' frames between them)
gets such a buffer for its whole payload at the head frame, each slice's
bytes land in it, and the event comes out with the last one.

Every frame, sent or received, goes through the one stream table in
``_state``. Frames racing a stream's end are expected and dropped, not
errors: those on a stream this side ended abruptly (it sent Cancel or
ErrorReply, or the last frame, while the peer was still sending), a late
Cancel for a stream the peer opened and that has already ended, and opens
above our GoAway's ``last_stream_id``.

A ``ProtocolError`` from decoding puts the receiving side in an ERROR state:
every later ``next_event`` raises at once, and ``send`` accepts only the
ErrorReply on stream 0 that tells the peer why it is being dropped. Local
misuse (sending a frame the state forbids) raises without changing anything.
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack
import numpy as np

from ..errors import (
    BadMagicError,
    ConnectionClosedError,
    DecompressionError,
    InvalidMessageError,
    LimitExceededError,
    MalformedMetadataError,
    PayloadMismatchError,
    ProtocolError,
    StreamStateError,
    TruncatedFrameError,
    UnknownFrameKindError,
    UnsupportedVersionError,
)
from ._events import (
    Cancel,
    ConnectionEnded,
    ErrorReply,
    Event,
    GoAway,
    Hello,
    Notify,
    Ping,
    Pong,
    Request,
    Response,
    StreamClose,
    StreamData,
    StreamOpen,
)
from ._frame import (
    FLAG_COMPRESSED,
    FLAG_CONTINUED,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAGIC,
    PROTOCOL_VERSION,
    FrameKind,
    Limits,
    Role,
)
from ._state import CONNECTION_KINDS, OPENING, TRANSITIONS, Party, StreamState
from ._tensors import TensorEncoder, decode_tensors


class Sentinel:
    """A named marker returned in place of an event (compare with ``is``)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = Sentinel("NEED_DATA")

# The feature a Hello lists to offer zstd payloads.
FEATURE_ZSTD = "zstd"
# The feature a Hello lists to take payloads cut into CONTINUATION frames.
FEATURE_CONTINUATION = "continuation"

_TENSOR_KINDS = frozenset(
    {FrameKind.REQUEST, FrameKind.RESPONSE, FrameKind.STREAM_OPEN, FrameKind.STREAM_DATA}
)
_PAYLOAD_KINDS = _TENSOR_KINDS | {FrameKind.CONTINUATION}
_KINDS = {int(k): k for k in FrameKind}
_PADDING = bytes(8)
# Staging holds headers and small frames; it grows only if asked for more.
_STAGING_SIZE = 64 * 1024


class _Verdict(enum.Enum):
    ACCEPT = 1
    DISCARD = 2


class _Stream:
    __slots__ = ("ours", "state")

    def __init__(self, state: StreamState, ours: bool) -> None:
        self.state = state
        self.ours = ours  # this side opened it


def _pack_metadata(event: Event, descriptors: list[list[Any]] | None) -> dict[str, Any]:
    """The metadata map of ``event`` (proto/PROTOCOL.md, "Frame kinds")."""
    match event:
        case Request() | StreamOpen():
            meta: dict[str, Any] = {"method": event.method, "meta": event.meta}
        case Response() | StreamData() | StreamClose():
            meta = {"meta": event.meta}
        case Hello():
            return {
                "version": event.version,
                "peer_id": event.peer_id,
                "role": event.role,
                "model_id": event.model_id,
                "features": sorted(event.features),
                "info": event.info,
            }
        case ErrorReply():
            return {"kind": event.kind, "message": event.message, "details": event.details}
        case Cancel():
            return {}
        case Notify():
            return {"method": event.method, "meta": event.meta}
        case Ping() | Pong():
            return {"nonce": event.nonce}
        case GoAway():
            return {"last_stream_id": event.last_stream_id, "reason": event.reason}
        case _:
            raise InvalidMessageError(f"{type(event).__name__} is not a wire event")
    if descriptors:
        meta["tensors"] = descriptors
    return meta


def _field(meta: dict[str, Any], name: str, kind: FrameKind) -> Any:
    """A field the frame must carry (optional ones are read with ``get``)."""
    value = meta.get(name, ...)
    if value is ...:
        raise InvalidMessageError(f"{kind.name} metadata lacks {name!r}")
    return value


def _build_event(
    kind: FrameKind, stream_id: int, meta: dict[str, Any], tensors: tuple[Any, ...]
) -> Event:
    """The event a frame's metadata describes; the event validates the fields.
    Stream messages first: they are most of the frames (a decode step each)."""
    f = _field
    get = meta.get
    if kind is FrameKind.STREAM_DATA:
        return StreamData(stream_id, get("meta", {}), tensors)
    if kind is FrameKind.RESPONSE:
        return Response(stream_id, get("meta", {}), tensors)
    if kind is FrameKind.REQUEST:
        return Request(stream_id, f(meta, "method", kind), get("meta", {}), tensors)
    if kind is FrameKind.STREAM_OPEN:
        return StreamOpen(stream_id, f(meta, "method", kind), get("meta", {}), tensors)
    if kind is FrameKind.STREAM_CLOSE:
        return StreamClose(stream_id, get("meta", {}))
    if kind is FrameKind.ERROR:
        return ErrorReply(stream_id, f(meta, "kind", kind), get("message", ""), get("details", {}))
    if kind is FrameKind.CANCEL:
        return Cancel(stream_id)
    if kind is FrameKind.HELLO:
        return Hello(
            f(meta, "version", kind),
            f(meta, "peer_id", kind),
            f(meta, "role", kind),
            get("model_id", ""),
            get("features", []),
            get("info", {}),
        )
    if kind is FrameKind.NOTIFY:
        return Notify(f(meta, "method", kind), get("meta", {}))
    if kind is FrameKind.PING:
        return Ping(f(meta, "nonce", kind))
    if kind is FrameKind.PONG:
        return Pong(f(meta, "nonce", kind))
    return GoAway(f(meta, "last_stream_id", kind), get("reason", ""))


class WireConnection:
    """One side of a libpipe connection: events in and out, bytes in and out,
    no I/O. ``compression`` allows zstd payloads when both Hellos offer it."""

    def __init__(
        self, role: Role, limits: Limits | None = None, *, compression: bool = True
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {type(role).__name__}")
        self.role = role
        self.limits = limits if limits is not None else Limits()
        self.compression = compression
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        self._encoder = TensorEncoder()
        # connection state
        self.local_hello: Hello | None = None
        self.peer_hello: Hello | None = None
        self._compress_out = False
        self._accept_compressed = False
        self._continue_out = False  # both Hellos list "continuation"
        self._accept_continued = False  # ours does
        self._goaway_sent: int | None = None
        self._goaway_received: int | None = None
        self._error: ProtocolError | None = None
        # streams
        self._streams: dict[int, _Stream] = {}
        self._peer_open = 0
        self._ended_by_us: dict[int, None] = {}  # insertion-ordered, bounded FIFO
        self._ended_cap = 2 * self.limits.max_open_streams
        # receive buffers
        self._staging = bytearray(_STAGING_SIZE)
        self._start = 0
        self._end = 0
        # A frame too large for staging: its own buffer, filled up to
        # _body_filled; the frame ends at _body_end (the buffer's end, or,
        # for a CONTINUATION frame, where its slice of _message ends).
        self._body: np.ndarray | None = None
        self._body_filled = 0
        self._body_end = 0
        self._body_header: tuple[FrameKind, int, int, int, int, _Verdict] | None = None
        # The continued message in progress (at most one): its stream, its
        # head's header, and a buffer for its metadata and whole payload.
        self._continued: int | None = None
        self._message: np.ndarray | None = None
        self._message_filled = 0
        self._message_header: tuple[FrameKind, int, int, int, int, _Verdict] | None = None
        self._eof = False

    # --- public state ----------------------------------------------------------

    @property
    def compression_active(self) -> bool:
        """Whether payloads this side sends may be compressed."""
        return self._compress_out

    @property
    def open_streams(self) -> dict[int, StreamState]:
        """Open streams and their state (a copy; for tests and diagnostics)."""
        return {sid: s.state for sid, s in self._streams.items()}

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The state of one stream, ``None`` once it has ended (or never was)."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    @property
    def errored(self) -> bool:
        return self._error is not None

    # --- sending -----------------------------------------------------------------

    def send(self, event: Event) -> list[bytes | memoryview]:
        """The buffers that put ``event`` on the wire, in order. Tensor payloads
        are memoryviews of the tensors' storage, not copies."""
        return self._encode(event, None)[0]

    def send_frames(self, event: Event, slice_bytes: int) -> list[list[bytes | memoryview]]:
        """The frames that put ``event`` on the wire, each as its buffers.

        One frame, as ``send`` makes, unless the peer takes continuation
        frames and the payload exceeds ``slice_bytes``: then a head frame
        (metadata only) and CONTINUATION frames of at most ``slice_bytes``
        payload each. Frames of other streams may be sent between them, so
        a small frame need not wait for a whole bulk payload; nothing else
        of this stream, and no other continued message, may (the stream
        state has moved already, as for one frame)."""
        if slice_bytes < 1:
            raise ValueError(f"slice_bytes must be positive, not {slice_bytes}")
        return self._encode(event, slice_bytes)

    def _encode(self, event: Event, slice_bytes: int | None) -> list[list[bytes | memoryview]]:
        kind = getattr(type(event), "frame_kind", None)
        if kind is None:
            raise InvalidMessageError(f"{type(event).__name__} is not a wire event")
        stream_id = getattr(event, "stream_id", 0)
        if self._error is not None and not (kind is FrameKind.ERROR and stream_id == 0):
            raise ProtocolError(f"connection is in the ERROR state after: {self._error}")
        transition = self._check_send(event, kind, stream_id)
        tensors = getattr(event, "tensors", ())
        if tensors:
            descriptors, payload, payload_len, compressed = self._encoder.encode(
                tensors, self._compress_out, self.limits
            )
        else:
            descriptors, payload, payload_len, compressed = None, [], 0, False
        try:
            meta = self._packer.pack(_pack_metadata(event, descriptors))
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidMessageError(
                f"{type(event).__name__} metadata cannot be encoded: {exc}"
            ) from exc
        if len(meta) > self.limits.max_metadata_bytes:
            raise LimitExceededError(
                f"metadata of {len(meta)} bytes, limit {self.limits.max_metadata_bytes}",
                size=len(meta),
                limit=self.limits.max_metadata_bytes,
            )
        flags = FLAG_COMPRESSED if compressed else 0
        if slice_bytes is not None and payload_len > slice_bytes and self._continue_out:
            flags |= FLAG_CONTINUED
            head = HEADER.pack(
                MAGIC, PROTOCOL_VERSION, kind, flags, stream_id, len(meta), payload_len
            )
            frames: list[list[bytes | memoryview]] = [[head + meta]]
            for piece, size in _cut(payload, slice_bytes):
                header = HEADER.pack(
                    MAGIC, PROTOCOL_VERSION, FrameKind.CONTINUATION, 0, stream_id, 0, size
                )
                frames.append([header, *piece])
        else:
            head = HEADER.pack(
                MAGIC, PROTOCOL_VERSION, kind, flags, stream_id, len(meta), payload_len
            )
            if payload_len:
                head = b"".join((head, meta, _PADDING[: -len(meta) % 8]))
                frames = [[head, *payload]]
            else:
                frames = [[head + meta]]
        self._apply_send(event, kind, stream_id, transition)
        return frames

    def _check_send(self, event: Event, kind: FrameKind, stream_id: int) -> StreamState | None:
        """The stream's next state, or raise for a frame this side may not send."""
        if kind is FrameKind.HELLO:
            if self.local_hello is not None:
                raise StreamStateError("Hello was already sent")
            assert isinstance(event, Hello)
            if event.role != self.role.value:
                raise InvalidMessageError(f"this side is the {self.role.value}, not {event.role}")
            return None
        if self.local_hello is None and not (kind is FrameKind.ERROR and stream_id == 0):
            raise StreamStateError(f"{kind.name} before Hello")
        if kind in CONNECTION_KINDS or stream_id == 0:
            return None
        stream = self._streams.get(stream_id)
        if stream is not None:
            if kind in OPENING:
                raise StreamStateError(f"stream {stream_id} is already open")
            party = Party.OPENER if stream.ours else Party.RESPONDER
            nxt = TRANSITIONS.get((stream.state, party, kind))
            if nxt is None:
                raise StreamStateError(
                    f"the {party.value} may not send {kind.name} on stream {stream_id} "
                    f"in state {stream.state.value}"
                )
            return nxt
        if kind in OPENING:
            if not self.role.owns(stream_id):
                raise StreamStateError(
                    f"the {self.role.value} cannot open stream {stream_id} (wrong parity)"
                )
            if self._goaway_sent is not None or self._goaway_received is not None:
                raise StreamStateError("no new streams after GoAway")
            return OPENING[kind]
        raise StreamStateError(f"{kind.name} on stream {stream_id}, which is not open")

    def _apply_send(
        self, event: Event, kind: FrameKind, stream_id: int, transition: StreamState | None
    ) -> None:
        if kind is FrameKind.HELLO:
            assert isinstance(event, Hello)
            self.local_hello = event
            self._accept_compressed = self.compression and FEATURE_ZSTD in event.features
            self._accept_continued = FEATURE_CONTINUATION in event.features
            self._update_compression()
        elif kind is FrameKind.GO_AWAY:
            assert isinstance(event, GoAway)
            self._goaway_sent = event.last_stream_id
        elif transition is not None:
            if kind in OPENING:
                self._streams[stream_id] = _Stream(transition, ours=True)
            else:
                self._move(stream_id, transition, by_us=True)

    def _update_compression(self) -> None:
        self._compress_out = (
            self._accept_compressed
            and self.peer_hello is not None
            and FEATURE_ZSTD in self.peer_hello.features
        )
        self._continue_out = (
            self._accept_continued
            and self.peer_hello is not None
            and FEATURE_CONTINUATION in self.peer_hello.features
        )

    def _move(self, stream_id: int, state: StreamState, *, by_us: bool) -> None:
        stream = self._streams[stream_id]
        if state is not StreamState.CLOSED:
            stream.state = state
            return
        del self._streams[stream_id]
        if not stream.ours:
            self._peer_open -= 1
        if by_us:
            self._remember_ended(stream_id)

    def _remember_ended(self, stream_id: int) -> None:
        self._ended_by_us[stream_id] = None
        if len(self._ended_by_us) > self._ended_cap:
            del self._ended_by_us[next(iter(self._ended_by_us))]

    # --- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its end."""
        if self._eof:
            raise ConnectionClosedError("data received after EOF")
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n == 0:
            self._eof = True
            return
        if self._body is not None and self._body_filled < self._body_end:
            room = self._body_end - self._body_filled
            take = min(room, n)
            memoryview(self._body)[self._body_filled : self._body_filled + take] = data[:take]
            self._body_filled += take
            if take == n:
                return
            data = memoryview(data)[take:]
            n -= take
        self._make_room(n)
        self._staging[self._end : self._end + n] = data
        self._end += n

    def get_buffer(self, min_size: int) -> memoryview:
        """Writable memory for the next bytes from the peer; report how many
        were written with ``buffer_updated``. Inside a large frame it is the
        rest of that frame's own buffer, whatever ``min_size`` says."""
        if self._eof:
            raise ConnectionClosedError("get_buffer after EOF")
        if self._body is not None and self._body_filled < self._body_end:
            return memoryview(self._body)[self._body_filled : self._body_end]
        self._make_room(max(min_size, 1))
        return memoryview(self._staging)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        in_body = self._body is not None and self._body_filled < self._body_end
        if in_body:
            room = self._body_end - self._body_filled
        else:
            room = len(self._staging) - self._end
        if not 0 < nbytes <= room:
            raise ValueError(f"buffer_updated({nbytes}) but the buffer offered {room} bytes")
        if in_body:
            self._body_filled += nbytes
        else:
            self._end += nbytes

    def _make_room(self, n: int) -> None:
        """At least ``n`` free bytes after ``_end``. Never resizes the
        bytearray in place: a caller may still hold a view of it."""
        if len(self._staging) - self._end >= n:
            return
        unread = self._end - self._start
        if len(self._staging) - unread >= n and self._start:
            self._staging[:unread] = self._staging[self._start : self._end]
        else:
            grown = bytearray(max(2 * len(self._staging), unread + n))
            grown[:unread] = self._staging[self._start : self._end]
            self._staging = grown
        self._start, self._end = 0, unread

    def next_event(self) -> Event | ConnectionEnded | Sentinel:
        """The next event, ``NEED_DATA``, or ``ConnectionEnded`` after a clean
        EOF. Raises a ``ProtocolError`` subclass for anything malformed."""
        if self._error is not None:
            raise ProtocolError(f"connection is in the ERROR state after: {self._error}")
        try:
            while True:
                event = self._next_frame()
                if event is not _DISCARDED:
                    return event
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_frame(self) -> Event | ConnectionEnded | Sentinel:
        if self._body is not None:
            if self._body_filled < self._body_end:
                if self._eof:
                    raise TruncatedFrameError(
                        f"connection ended {self._body_end - self._body_filled} bytes "
                        "before the end of a frame"
                    )
                return NEED_DATA
            if self._body is self._message:
                # a CONTINUATION frame is in
                self._body, self._message_filled = None, self._body_filled
                return self._finish_message()
            assert self._body_header is not None
            body, header = self._body, self._body_header
            self._body, self._body_header = None, None
            # The header was judged when it arrived; frames this side sent
            # since (Cancel, ErrorReply, GoAway) may have ended the stream.
            kind, flags, meta_len, payload_len, stream_id, _ = header
            verdict = self._check_receive(kind, stream_id)
            header = (kind, flags, meta_len, payload_len, stream_id, verdict)
            return self._decode(header, memoryview(body), copy_payload=False)
        available = self._end - self._start
        if available < HEADER_SIZE:
            if available:
                start = self._staging[self._start : self._start + min(available, len(MAGIC))]
                if not MAGIC.startswith(start):
                    raise BadMagicError(f"frame starts with {start.hex()}, not {MAGIC.hex()}")
            if self._eof:
                if available == 0 and self._continued is None:
                    return ConnectionEnded()
                if available == 0:
                    raise TruncatedFrameError(
                        f"connection ended inside the continued message of stream {self._continued}"
                    )
                raise TruncatedFrameError(
                    f"connection ended inside a frame header ({available} bytes)"
                )
            return NEED_DATA
        header = self._parse_header()
        if header[0] is FrameKind.CONTINUATION:
            return self._take_slice(header[3])
        if header[1] & FLAG_CONTINUED:
            return self._start_continued(header)
        meta_len, payload_len = header[2], header[3]
        body_len = meta_len + (payload_len and (-meta_len % 8) + payload_len)
        frame_end = self._start + HEADER_SIZE + body_len
        if frame_end <= self._end:
            view = memoryview(self._staging)[self._start + HEADER_SIZE : frame_end]
            self._start = frame_end
            if self._start == self._end:
                self._start = self._end = 0
            try:
                return self._decode(header, view, copy_payload=True)
            finally:
                view.release()
        # Uninitialised: every byte will be written by the peer's data, and
        # zero-filling a large payload would cost as much as receiving it.
        body = np.empty(body_len, dtype=np.uint8)
        have = self._end - self._start - HEADER_SIZE
        memoryview(body)[:have] = self._staging[self._start + HEADER_SIZE : self._end]
        self._start = self._end = 0
        self._body, self._body_filled, self._body_header = body, have, header
        self._body_end = body_len
        if self._eof:
            raise TruncatedFrameError(
                f"connection ended {body_len - have} bytes before the end of a frame"
            )
        return NEED_DATA

    def _start_continued(self, header: tuple[FrameKind, int, int, int, int, _Verdict]) -> Sentinel:
        """A continued message's head frame: its metadata now, a buffer for
        the whole declared payload (checked against the limits already)."""
        meta_len, payload_len, stream_id = header[2], header[3], header[4]
        frame_end = self._start + HEADER_SIZE + meta_len
        if frame_end > self._end:
            if self._eof:
                raise TruncatedFrameError("connection ended inside a frame's metadata")
            return NEED_DATA  # staging grows to hold the metadata
        filled = meta_len + (-meta_len % 8)
        message = np.empty(filled + payload_len, dtype=np.uint8)
        memoryview(message)[:meta_len] = self._staging[self._start + HEADER_SIZE : frame_end]
        self._start = frame_end
        if self._start == self._end:
            self._start = self._end = 0
        self._message, self._message_filled = message, filled
        self._message_header, self._continued = header, stream_id
        return _DISCARDED  # nothing to deliver until the payload is whole

    def _take_slice(self, size: int) -> Event | Sentinel:
        """A CONTINUATION frame: what has arrived of it goes to the message's
        buffer now, the rest straight from the socket (``get_buffer``)."""
        assert self._message is not None
        start = self._start + HEADER_SIZE
        have = min(self._end - start, size)
        filled = self._message_filled
        memoryview(self._message)[filled : filled + have] = self._staging[start : start + have]
        self._message_filled = filled + have
        self._start = start + have
        if self._start == self._end:
            self._start = self._end = 0
        if have < size:
            self._body, self._body_header = self._message, None
            self._body_filled, self._body_end = filled + have, filled + size
            return NEED_DATA
        return self._finish_message()

    def _finish_message(self) -> Event | Sentinel:
        """Deliver the continued message once its payload is whole; until
        then the loop goes on to the next frame."""
        message, header = self._message, self._message_header
        assert message is not None and header is not None
        if self._message_filled < len(message):
            return _DISCARDED
        self._message, self._message_header, self._continued = None, None, None
        # The stream's state was judged at the head; frames this side sent
        # since (Cancel, ErrorReply, GoAway) may have ended it.
        kind, flags, meta_len, payload_len, stream_id, _ = header
        verdict = self._check_receive(kind, stream_id)
        header = (kind, flags, meta_len, payload_len, stream_id, verdict)
        return self._decode(header, memoryview(message), copy_payload=False)

    def _parse_header(self) -> tuple[FrameKind, int, int, int, int, _Verdict]:
        """Check a header before anything is allocated for its frame."""
        magic, version, raw_kind, flags, stream_id, meta_len, payload_len = HEADER.unpack_from(
            self._staging, self._start
        )
        if magic != MAGIC:
            raise BadMagicError(f"frame starts with {magic.hex()}, not {MAGIC.hex()}")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersionError(
                f"frame of protocol version {version}, this side speaks {PROTOCOL_VERSION}",
                version=version,
            )
        kind = _KINDS.get(raw_kind)
        if kind is None:
            raise UnknownFrameKindError(f"unknown frame kind {raw_kind}", frame_kind=raw_kind)
        if flags & ~KNOWN_FLAGS:
            raise InvalidMessageError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#06x}")
        if meta_len > self.limits.max_metadata_bytes:
            raise LimitExceededError(
                f"metadata of {meta_len} bytes, limit {self.limits.max_metadata_bytes}",
                size=meta_len,
                limit=self.limits.max_metadata_bytes,
            )
        if payload_len > self.limits.max_payload_bytes:
            raise LimitExceededError(
                f"payload of {payload_len} bytes, limit {self.limits.max_payload_bytes}",
                size=payload_len,
                limit=self.limits.max_payload_bytes,
            )
        if payload_len and kind not in _PAYLOAD_KINDS:
            raise PayloadMismatchError(f"{kind.name} carries no payload, got {payload_len} bytes")
        if self._continued is not None and stream_id == self._continued:
            if kind is not FrameKind.CONTINUATION:
                raise StreamStateError(
                    f"{kind.name} on stream {stream_id}, whose continued message is incomplete"
                )
            return self._check_slice(flags, meta_len, payload_len, stream_id)
        if kind is FrameKind.CONTINUATION:
            raise StreamStateError(f"CONTINUATION on stream {stream_id}, which continues nothing")
        if flags & FLAG_CONTINUED:
            if kind not in _TENSOR_KINDS or not payload_len:
                raise InvalidMessageError(f"CONTINUED flag on a {kind.name} without payload")
            if not self._accept_continued:
                raise InvalidMessageError("continued payload, but this side did not offer it")
            if self._continued is not None:
                raise StreamStateError(
                    f"a continued message on stream {stream_id} while the one on stream "
                    f"{self._continued} is incomplete"
                )
        if flags & FLAG_COMPRESSED:
            if kind not in _TENSOR_KINDS or not payload_len:
                raise InvalidMessageError(f"COMPRESSED flag on a {kind.name} without payload")
            if not self._accept_compressed:
                raise DecompressionError("compressed payload, but this side did not offer zstd")
        verdict = self._check_receive(kind, stream_id)
        return kind, flags, meta_len, payload_len, stream_id, verdict

    def _check_slice(
        self, flags: int, meta_len: int, payload_len: int, stream_id: int
    ) -> tuple[FrameKind, int, int, int, int, _Verdict]:
        """A CONTINUATION frame of the message in progress: payload only, no
        more than the message still lacks. Its stream's state was judged at
        the head frame and is judged again when the message is whole."""
        assert self._message is not None
        if flags or meta_len or not payload_len:
            raise InvalidMessageError(
                "CONTINUATION frames carry payload only: no flags, no metadata, not empty"
            )
        missing = len(self._message) - self._message_filled
        if payload_len > missing:
            raise PayloadMismatchError(
                f"CONTINUATION of {payload_len} bytes, the message lacks only {missing}"
            )
        return FrameKind.CONTINUATION, flags, meta_len, payload_len, stream_id, _Verdict.ACCEPT

    def _check_receive(self, kind: FrameKind, stream_id: int) -> _Verdict:
        """May the peer send this frame now? Nothing changes until it is decoded."""
        if kind in CONNECTION_KINDS:
            if stream_id != 0:
                raise InvalidMessageError(f"{kind.name} must be on stream 0, not {stream_id}")
            if kind is FrameKind.HELLO:
                if self.peer_hello is not None:
                    raise StreamStateError("a second Hello")
                return _Verdict.ACCEPT
        elif kind is FrameKind.ERROR and stream_id == 0:
            return _Verdict.ACCEPT
        elif stream_id == 0:
            raise InvalidMessageError(f"{kind.name} on stream 0")
        if self.peer_hello is None:
            raise StreamStateError(f"{kind.name} before Hello")
        if kind in CONNECTION_KINDS:
            return _Verdict.ACCEPT
        stream = self._streams.get(stream_id)
        if stream is not None:
            if kind in OPENING:
                raise StreamStateError(f"stream {stream_id} is already open")
            party = Party.RESPONDER if stream.ours else Party.OPENER
            if (stream.state, party, kind) not in TRANSITIONS:
                raise StreamStateError(
                    f"the {party.value} may not send {kind.name} on stream {stream_id} "
                    f"in state {stream.state.value}"
                )
            return _Verdict.ACCEPT
        if stream_id in self._ended_by_us:
            return _Verdict.DISCARD
        if kind in OPENING:
            if self.role.owns(stream_id):
                raise StreamStateError(f"the peer cannot open stream {stream_id} (wrong parity)")
            if self._goaway_sent is not None and stream_id > self._goaway_sent:
                return _Verdict.DISCARD
            if self._peer_open >= self.limits.max_open_streams:
                raise LimitExceededError(
                    f"the peer opened more than {self.limits.max_open_streams} streams",
                    limit=self.limits.max_open_streams,
                )
            return _Verdict.ACCEPT
        if kind is FrameKind.CANCEL and not self.role.owns(stream_id):
            return _Verdict.DISCARD
        raise StreamStateError(f"{kind.name} on stream {stream_id}, which is not open")

    def _decode(
        self,
        header: tuple[FrameKind, int, int, int, int, _Verdict],
        body: memoryview,
        *,
        copy_payload: bool,
    ) -> Event | Sentinel:
        kind, flags, meta_len, payload_len, stream_id, verdict = header
        try:
            meta = msgpack.unpackb(body[:meta_len], raw=False, use_list=True)
        except Exception as exc:
            raise MalformedMetadataError(
                f"{kind.name} metadata is not valid msgpack: {exc}"
            ) from exc
        if type(meta) is not dict:
            raise InvalidMessageError(
                f"{kind.name} metadata must be a map, not {type(meta).__name__}"
            )
        descriptors = meta.get("tensors")
        if kind in _TENSOR_KINDS and (descriptors is not None or payload_len):
            payload_offset = meta_len + (-meta_len % 8)
            if copy_payload:
                payload: bytearray | memoryview = bytearray(
                    body[payload_offset : payload_offset + payload_len]
                )
                payload_offset = 0
            else:
                payload = body
            tensors = decode_tensors(
                descriptors if descriptors is not None else [],
                payload,
                payload_offset,
                payload_len,
                bool(flags & FLAG_COMPRESSED),
                self.limits,
            )
        else:
            tensors = ()
        event = _build_event(kind, stream_id, meta, tensors)
        if verdict is _Verdict.DISCARD:
            if kind in OPENING:
                # refused (above our GoAway): what the peer sends on it until
                # it learns so is dropped too
                self._remember_ended(stream_id)
            return _DISCARDED
        self._apply_receive(event, kind, stream_id)
        return event

    def _apply_receive(self, event: Event, kind: FrameKind, stream_id: int) -> None:
        if kind is FrameKind.HELLO:
            assert isinstance(event, Hello)
            if event.role == self.role.value:
                raise InvalidMessageError(f"the peer says it is the {event.role} too")
            self.peer_hello = event
            self._update_compression()
        elif kind is FrameKind.GO_AWAY:
            assert isinstance(event, GoAway)
            self._goaway_received = event.last_stream_id
            # Our streams above it were refused: the peer sends nothing on them.
            for sid in [
                s for s, st in self._streams.items() if st.ours and s > event.last_stream_id
            ]:
                del self._streams[sid]
        elif kind in OPENING:
            self._streams[stream_id] = _Stream(OPENING[kind], ours=False)
            self._peer_open += 1
        elif stream_id != 0:
            stream = self._streams[stream_id]
            party = Party.RESPONDER if stream.ours else Party.OPENER
            self._move(stream_id, TRANSITIONS[(stream.state, party, kind)], by_us=False)


_DISCARDED = Sentinel("DISCARDED")


def _cut(buffers: list[Any], size: int) -> list[tuple[list[bytes | memoryview], int]]:
    """``buffers`` as consecutive pieces of ``size`` bytes (the last may be
    shorter), each a list of views of the same memory and its length."""
    pieces: list[tuple[list[bytes | memoryview], int]] = []
    piece: list[bytes | memoryview] = []
    room = size
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while view.nbytes:
            take = view[:room]
            piece.append(take)
            room -= take.nbytes
            view = view[take.nbytes :]
            if not room:
                pieces.append((piece, size))
                piece, room = [], size
    if piece:
        pieces.append((piece, size - room))
    return pieces
