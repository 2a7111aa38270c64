"""The wire protocol, sans-io: frames, messages and tensors (proto/PROTOCOL.md).

Bytes in, events out, in the manner of h11: ``WireConnection`` does no I/O,
so ``net/`` drives it over sockets and tests drive it over plain bytes.
"""

from ._connection import FEATURE_ZSTD as FEATURE_ZSTD
from ._connection import NEED_DATA as NEED_DATA
from ._connection import Sentinel as Sentinel
from ._connection import WireConnection as WireConnection
from ._events import Cancel as Cancel
from ._events import ConnectionEnded as ConnectionEnded
from ._events import ErrorReply as ErrorReply
from ._events import Event as Event
from ._events import GoAway as GoAway
from ._events import Hello as Hello
from ._events import Notify as Notify
from ._events import Ping as Ping
from ._events import Pong as Pong
from ._events import Request as Request
from ._events import Response as Response
from ._events import StreamClose as StreamClose
from ._events import StreamData as StreamData
from ._events import StreamOpen as StreamOpen
from ._frame import HEADER_SIZE as HEADER_SIZE
from ._frame import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._frame import FrameKind as FrameKind
from ._frame import Limits as Limits
from ._frame import Role as Role
from ._state import StreamState as StreamState
from ._tensors import cast_for_wire as cast_for_wire
