"""The stream state machine: one table, used for frames sent and received.

A stream is seen from its two parties, the OPENER (sent Request or
StreamOpen) and the RESPONDER, not from "us" and "them": the same table
then serves both directions, and both ends of a connection compute the same
state for every stream from the same frames.

Unary call:   OPEN_UNARY --Response/ErrorReply (responder)--> closed
                         --Cancel (opener)--> closed
Stream:       OPEN --StreamClose (opener)--> OPENER_DONE --StreamClose (responder)--> closed
                   --StreamClose (responder)--> RESPONDER_DONE --StreamClose (opener)--> closed
              ErrorReply (either) or Cancel (opener) closes it from any state.
"""

from __future__ import annotations

import enum

from ._frame import FrameKind


class StreamState(enum.Enum):
    OPEN_UNARY = "open-unary"
    OPEN = "open"
    OPENER_DONE = "opener-done"  # the opener half-closed; the responder may still send
    RESPONDER_DONE = "responder-done"
    CLOSED = "closed"

    # members are singletons: identity hashing is C code, Enum's is Python
    __hash__ = object.__hash__


class Party(enum.Enum):
    OPENER = "opener"
    RESPONDER = "responder"

    __hash__ = object.__hash__


_S, _P, _K = StreamState, Party, FrameKind

# (state, who sends, frame kind) -> next state. Anything absent is a
# StreamStateError. Opening frames are not here: they create the stream.
TRANSITIONS: dict[tuple[StreamState, Party, FrameKind], StreamState] = {
    (_S.OPEN_UNARY, _P.RESPONDER, _K.RESPONSE): _S.CLOSED,
    (_S.OPEN_UNARY, _P.RESPONDER, _K.ERROR): _S.CLOSED,
    (_S.OPEN_UNARY, _P.OPENER, _K.CANCEL): _S.CLOSED,
    (_S.OPEN, _P.OPENER, _K.STREAM_DATA): _S.OPEN,
    (_S.OPEN, _P.RESPONDER, _K.STREAM_DATA): _S.OPEN,
    (_S.OPEN, _P.OPENER, _K.STREAM_CLOSE): _S.OPENER_DONE,
    (_S.OPEN, _P.RESPONDER, _K.STREAM_CLOSE): _S.RESPONDER_DONE,
    (_S.OPEN, _P.OPENER, _K.ERROR): _S.CLOSED,
    (_S.OPEN, _P.RESPONDER, _K.ERROR): _S.CLOSED,
    (_S.OPEN, _P.OPENER, _K.CANCEL): _S.CLOSED,
    (_S.OPENER_DONE, _P.RESPONDER, _K.STREAM_DATA): _S.OPENER_DONE,
    (_S.OPENER_DONE, _P.RESPONDER, _K.STREAM_CLOSE): _S.CLOSED,
    (_S.OPENER_DONE, _P.OPENER, _K.ERROR): _S.CLOSED,
    (_S.OPENER_DONE, _P.RESPONDER, _K.ERROR): _S.CLOSED,
    (_S.OPENER_DONE, _P.OPENER, _K.CANCEL): _S.CLOSED,
    (_S.RESPONDER_DONE, _P.OPENER, _K.STREAM_DATA): _S.RESPONDER_DONE,
    (_S.RESPONDER_DONE, _P.OPENER, _K.STREAM_CLOSE): _S.CLOSED,
    (_S.RESPONDER_DONE, _P.OPENER, _K.ERROR): _S.CLOSED,
    (_S.RESPONDER_DONE, _P.RESPONDER, _K.ERROR): _S.CLOSED,
    (_S.RESPONDER_DONE, _P.OPENER, _K.CANCEL): _S.CLOSED,
}

OPENING: dict[FrameKind, StreamState] = {
    FrameKind.REQUEST: StreamState.OPEN_UNARY,
    FrameKind.STREAM_OPEN: StreamState.OPEN,
}

# Kinds that travel on stream 0 only.
CONNECTION_KINDS = frozenset(
    {FrameKind.HELLO, FrameKind.NOTIFY, FrameKind.PING, FrameKind.PONG, FrameKind.GO_AWAY}
)
