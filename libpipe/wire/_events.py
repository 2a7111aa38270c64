"""The messages of the protocol, as frozen dataclasses that validate themselves.

The same checks run whether an application builds an event to send or the
decoder builds one from a peer's metadata, so a bad field is reported the
same way (``InvalidMessageError``) from either side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import InvalidMessageError
from ._frame import MAX_STREAM_ID, FrameKind


def _check_stream_id(event: object, stream_id: object, *, zero_ok: bool = False) -> None:
    if (
        type(stream_id) is not int
        or not (stream_id > 0 or zero_ok)
        or not 0 <= stream_id <= MAX_STREAM_ID
    ):
        raise InvalidMessageError(
            f"{type(event).__name__}.stream_id must be an int in "
            f"[{0 if zero_ok else 1}, {MAX_STREAM_ID}], not {stream_id!r}"
        )


def _check_str(event: object, name: str, value: object, *, empty_ok: bool = True) -> None:
    if type(value) is not str or (not empty_ok and not value):
        raise InvalidMessageError(
            f"{type(event).__name__}.{name} must be a{'' if empty_ok else ' non-empty'} str, "
            f"not {value!r}"
        )


def _check_map(event: object, name: str, value: object) -> None:
    # A plain dict first: the ABC check costs more than the rest of an event.
    if type(value) is dict or isinstance(value, Mapping):
        for k in value:
            if type(k) is not str:
                break
        else:
            return
    raise InvalidMessageError(
        f"{type(event).__name__}.{name} must be a dict with str keys, not {type(value).__name__}"
    )


def _check_tensors(event: object, tensors: object) -> None:
    if type(tensors) is not tuple:
        if isinstance(tensors, list):
            # Frozen, but a list is the natural thing to pass: keep a tuple.
            tensors = tuple(tensors)
            object.__setattr__(event, "tensors", tensors)
        else:
            raise InvalidMessageError(
                f"{type(event).__name__}.tensors must be a tuple of tensors, "
                f"not {type(tensors).__name__}"
            )
    for t in tensors:  # type: ignore[union-attr]
        if not isinstance(t, torch.Tensor):
            raise InvalidMessageError(
                f"{type(event).__name__}.tensors holds a {type(t).__name__}, not a torch.Tensor"
            )


def _check_body(event: object, stream_id: object, meta: object, tensors: object) -> None:
    """The stream id, meta and tensors of a message event: one call with
    the common case inline, since every RPC builds four such events."""
    if type(stream_id) is not int or not 0 < stream_id <= MAX_STREAM_ID:
        _check_stream_id(event, stream_id)
    if type(meta) is dict:
        for k in meta:
            if type(k) is not str:
                _check_map(event, "meta", meta)
    else:
        _check_map(event, "meta", meta)
    if type(tensors) is not tuple or tensors:
        _check_tensors(event, tensors)


def _check_u64(event: object, name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value < 2**64:
        raise InvalidMessageError(
            f"{type(event).__name__}.{name} must be an unsigned 64-bit int, not {value!r}"
        )


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame from each side, on stream 0. ``features`` lists the
    optional parts of the protocol the sender speaks ("zstd")."""

    frame_kind: ClassVar[FrameKind] = FrameKind.HELLO
    version: int
    peer_id: str
    role: str
    model_id: str = ""
    features: frozenset[str] = frozenset()
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.version) is not int or not 0 <= self.version <= 0xFF:
            raise InvalidMessageError(
                f"Hello.version must be an int in [0, 255], not {self.version!r}"
            )
        _check_str(self, "peer_id", self.peer_id, empty_ok=False)
        if self.role not in ("dialer", "acceptor"):
            raise InvalidMessageError(
                f"Hello.role must be 'dialer' or 'acceptor', not {self.role!r}"
            )
        _check_str(self, "model_id", self.model_id)
        features = self.features
        if not isinstance(features, set | frozenset | list | tuple) or not all(
            type(f) is str for f in features
        ):
            raise InvalidMessageError("Hello.features must be a set of str")
        if not isinstance(features, frozenset):
            object.__setattr__(self, "features", frozenset(features))
        _check_map(self, "info", self.info)


@dataclass(frozen=True, slots=True)
class Request:
    """Opens a unary call on a new stream; answered by Response or ErrorReply."""

    frame_kind: ClassVar[FrameKind] = FrameKind.REQUEST
    stream_id: int
    method: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        _check_body(self, self.stream_id, self.meta, self.tensors)
        if type(self.method) is not str or not self.method:
            _check_str(self, "method", self.method, empty_ok=False)


@dataclass(frozen=True, slots=True)
class Response:
    """Ends a unary call successfully."""

    frame_kind: ClassVar[FrameKind] = FrameKind.RESPONSE
    stream_id: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        _check_body(self, self.stream_id, self.meta, self.tensors)


@dataclass(frozen=True, slots=True)
class StreamOpen:
    """Opens a bidirectional stream on a new stream id."""

    frame_kind: ClassVar[FrameKind] = FrameKind.STREAM_OPEN
    stream_id: int
    method: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        _check_body(self, self.stream_id, self.meta, self.tensors)
        if type(self.method) is not str or not self.method:
            _check_str(self, "method", self.method, empty_ok=False)


@dataclass(frozen=True, slots=True)
class StreamData:
    """One message on an open stream, in either direction."""

    frame_kind: ClassVar[FrameKind] = FrameKind.STREAM_DATA
    stream_id: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        _check_body(self, self.stream_id, self.meta, self.tensors)


@dataclass(frozen=True, slots=True)
class StreamClose:
    """The sender is done sending on the stream (half-close)."""

    frame_kind: ClassVar[FrameKind] = FrameKind.STREAM_CLOSE
    stream_id: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_stream_id(self, self.stream_id)
        _check_map(self, "meta", self.meta)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Ends a call or stream with an error; on stream 0, the sender is about
    to close the connection. ``kind`` is a ``libpipe.errors`` kind."""

    frame_kind: ClassVar[FrameKind] = FrameKind.ERROR
    stream_id: int
    kind: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_stream_id(self, self.stream_id, zero_ok=True)
        _check_str(self, "kind", self.kind, empty_ok=False)
        _check_str(self, "message", self.message)
        _check_map(self, "details", self.details)


@dataclass(frozen=True, slots=True)
class Cancel:
    """The opener abandons a call or stream; the other side stops and sends
    nothing more on it."""

    frame_kind: ClassVar[FrameKind] = FrameKind.CANCEL
    stream_id: int

    def __post_init__(self) -> None:
        _check_stream_id(self, self.stream_id)


@dataclass(frozen=True, slots=True)
class Notify:
    """A one-way message on stream 0 (gossip piggybacks on it)."""

    frame_kind: ClassVar[FrameKind] = FrameKind.NOTIFY
    method: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self, "method", self.method, empty_ok=False)
        _check_map(self, "meta", self.meta)


@dataclass(frozen=True, slots=True)
class Ping:
    frame_kind: ClassVar[FrameKind] = FrameKind.PING
    nonce: int

    def __post_init__(self) -> None:
        _check_u64(self, "nonce", self.nonce)


@dataclass(frozen=True, slots=True)
class Pong:
    frame_kind: ClassVar[FrameKind] = FrameKind.PONG
    nonce: int

    def __post_init__(self) -> None:
        _check_u64(self, "nonce", self.nonce)


@dataclass(frozen=True, slots=True)
class GoAway:
    """Graceful close: the sender opens no new streams and accepts none above
    ``last_stream_id``; streams in flight finish."""

    frame_kind: ClassVar[FrameKind] = FrameKind.GO_AWAY
    last_stream_id: int
    reason: str = ""

    def __post_init__(self) -> None:
        if type(self.last_stream_id) is not int or not 0 <= self.last_stream_id <= MAX_STREAM_ID:
            raise InvalidMessageError(
                f"GoAway.last_stream_id must be an int in [0, {MAX_STREAM_ID}], "
                f"not {self.last_stream_id!r}"
            )
        _check_str(self, "reason", self.reason)


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """The peer closed its end cleanly, at a frame boundary."""


Event = (
    Hello
    | Request
    | Response
    | StreamOpen
    | StreamData
    | StreamClose
    | ErrorReply
    | Cancel
    | Notify
    | Ping
    | Pong
    | GoAway
)
