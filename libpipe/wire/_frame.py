"""The fixed frame header, the frame kinds, and the named limits.

Every frame is a 24-byte little-endian header, a msgpack metadata map,
zero padding up to a multiple of 8 bytes from the frame start, then the raw
payload (``proto/PROTOCOL.md``, "Frame layout"). 24 bytes keep the payload,
and so every tensor in it, 8-byte aligned however the frame is buffered.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields

from ..errors import ConfigError

PROTOCOL_VERSION = 1

MAGIC = b"LPW\x00"

# magic, version, kind, flags, stream id, metadata length, payload length.
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE = HEADER.size

# The payload starts at the next multiple of this many bytes after the metadata.
PAYLOAD_ALIGN = 8
# Each tensor inside the payload starts at a multiple of this offset: a cache
# line, so that received tensors can be viewed in place by vectorised kernels.
TENSOR_ALIGN = 64

# Stream ids are 32-bit; 0 is the connection itself.
MAX_STREAM_ID = 2**32 - 1


class FrameKind(enum.IntEnum):
    """Append-only: a value, once released, keeps its meaning."""

    # Enum's own __hash__ is Python code; kinds are hashed on every frame.
    __hash__ = int.__hash__

    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    STREAM_OPEN = 4
    STREAM_DATA = 5
    STREAM_CLOSE = 6
    ERROR = 7
    CANCEL = 8
    NOTIFY = 9
    PING = 10
    PONG = 11
    GO_AWAY = 12
    CONTINUATION = 13


# At least one tensor of the payload is zstd-compressed; a receiver that did
# not offer "zstd" rejects the frame from the header alone. Plain ints: flags
# are tested on every frame.
FLAG_COMPRESSED = 0x0001
# The frame's payload follows in CONTINUATION frames (it carries only its
# metadata); payload_len is the whole payload's. Only to a peer whose Hello
# lists "continuation".
FLAG_CONTINUED = 0x0002
KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_CONTINUED


class Role(enum.Enum):
    """Who opened the TCP connection decides the parity of stream ids, so the
    two sides never pick the same id without talking."""

    DIALER = "dialer"  # odd stream ids
    ACCEPTOR = "acceptor"  # even stream ids

    __hash__ = object.__hash__  # members are singletons; C-level hash

    def owns(self, stream_id: int) -> bool:
        return stream_id % 2 == (1 if self is Role.DIALER else 0)


@dataclass(frozen=True)
class Limits:
    """Every length a peer declares is checked against these before anything
    is allocated for it. The defaults fit a 70B-class model's prefill chunk
    (2048 tokens x 8192 x fp16 = 32 MiB) with a wide margin."""

    max_metadata_bytes: int = 1 << 20
    max_payload_bytes: int = 512 << 20
    max_tensors: int = 16
    max_tensor_dims: int = 8
    max_open_streams: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Limits.{f.name} must be a positive int, not {value!r}")
        if self.max_metadata_bytes > 0xFFFF_FFFF:
            raise ConfigError("Limits.max_metadata_bytes must fit the 32-bit length field")
