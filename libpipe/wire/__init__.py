"""The wire protocol, sans-io: frames, messages and tensors (proto/PROTOCOL.md).

Bytes in, events out, in the manner of h11: ``WireConnection`` does no I/O,
so ``net/`` drives it over sockets and tests drive it over plain bytes.
"""

from ._connection import (
    FEATURE_CONTINUATION as FEATURE_CONTINUATION,
    FEATURE_ZSTD as FEATURE_ZSTD,
    NEED_DATA as NEED_DATA,
    Sentinel as Sentinel,
    WireConnection as WireConnection,
)
from ._events import (
    Cancel as Cancel,
    ConnectionEnded as ConnectionEnded,
    ErrorReply as ErrorReply,
    Event as Event,
    GoAway as GoAway,
    Hello as Hello,
    Notify as Notify,
    Ping as Ping,
    Pong as Pong,
    Request as Request,
    Response as Response,
    StreamClose as StreamClose,
    StreamData as StreamData,
    StreamOpen as StreamOpen,
)
from ._frame import (
    HEADER_SIZE as HEADER_SIZE,
    PROTOCOL_VERSION as PROTOCOL_VERSION,
    FrameKind as FrameKind,
    Limits as Limits,
    Role as Role,
)
from ._state import StreamState as StreamState
from ._tensors import cast_for_wire as cast_for_wire
