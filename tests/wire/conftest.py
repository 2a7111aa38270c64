"""Two codecs wired back to back, and ways of feeding them bytes.

Shared through fixtures (``pair``, ``make_pair``) because test modules are
imported with ``--import-mode=importlib`` and cannot import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from libpipe.wire import (
    NEED_DATA,
    ConnectionEnded,
    FrameKind,
    Hello,
    Limits,
    Ping,
    Role,
    WireConnection,
)
from libpipe.wire._frame import HEADER, MAGIC, PROTOCOL_VERSION

FEED_MODES = ("whole", "bytewise", "get_buffer", "trailing")


class ConnectionPair:
    """A dialer and an acceptor; ``deliver`` moves one event across."""

    def __init__(
        self,
        *,
        compression: tuple[bool, bool] = (True, True),
        limits: Limits | None = None,
        handshake: bool = True,
        continuation: tuple[bool, bool] = (True, True),
    ) -> None:
        self.dialer = WireConnection(Role.DIALER, limits, compression=compression[0])
        self.acceptor = WireConnection(Role.ACCEPTOR, limits, compression=compression[1])
        self.continuation = continuation
        if handshake:
            self.handshake(features=(compression[0], compression[1]))

    def other(self, conn: WireConnection) -> WireConnection:
        return self.acceptor if conn is self.dialer else self.dialer

    def handshake(self, features: tuple[bool, bool] = (True, True)) -> None:
        sides = zip((self.dialer, self.acceptor), features, self.continuation, strict=True)
        for conn, offer, continued in sides:
            offered = ({"zstd"} if offer else set()) | ({"continuation"} if continued else set())
            hello = Hello(
                1,
                f"peer-{conn.role.value}",
                conn.role.value,
                "test-model",
                frozenset(offered),
                {"max_open_streams": 256},
            )
            assert self.deliver(conn, hello) == hello

    def deliver(self, sender: WireConnection, event: Any, mode: str = "whole") -> Any:
        """Send ``event`` from ``sender`` and return what the other side decodes."""
        data = b"".join(bytes(b) for b in sender.send(event))
        events = feed(self.other(sender), data, mode)
        assert len(events) == 1, events
        return events[0]


def feed(conn: WireConnection, data: bytes, mode: str = "whole") -> list[Any]:
    """Feed ``data`` and collect every event until the codec needs more.

    "trailing" appends the start of a Ping frame (then completes it)."""
    events: list[Any] = []

    def drain() -> None:
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionEnded):
                return

    if mode == "whole":
        conn.receive_data(data)
        drain()
    elif mode == "trailing":
        # the first bytes of the next frame stay buffered until it completes
        ping = raw_frame(FrameKind.PING, {"nonce": 99})
        conn.receive_data(data + ping[:10])
        drain()
        conn.receive_data(ping[10:])
        assert conn.next_event() == Ping(99)
        assert conn.next_event() is NEED_DATA
    elif mode == "bytewise":
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
            drain()
    elif mode == "get_buffer":
        pos = 0
        while pos < len(data):
            buf = conn.get_buffer(7)
            n = min(len(buf), len(data) - pos, 4096)
            buf[:n] = data[pos : pos + n]
            del buf
            conn.buffer_updated(n)
            pos += n
            drain()
    else:
        raise ValueError(mode)
    return events


def raw_frame(
    kind: int,
    meta: Any = None,
    payload: bytes = b"",
    *,
    stream_id: int = 0,
    flags: int = 0,
    version: int = PROTOCOL_VERSION,
    magic: bytes = MAGIC,
    meta_bytes: bytes | None = None,
    payload_len: int | None = None,
    meta_len: int | None = None,
) -> bytes:
    """A frame built by hand, to say things the encoder never would."""
    packed = meta_bytes if meta_bytes is not None else msgpack.packb(meta, use_bin_type=True)
    pad = bytes(-len(packed) % 8) if payload else b""
    header = HEADER.pack(
        magic,
        version,
        kind,
        flags,
        stream_id,
        len(packed) if meta_len is None else meta_len,
        len(payload) if payload_len is None else payload_len,
    )
    return header + packed + pad + payload


@pytest.fixture
def pair() -> ConnectionPair:
    return ConnectionPair()


@pytest.fixture
def make_pair() -> Callable[..., ConnectionPair]:
    return ConnectionPair


@pytest.fixture
def tools() -> Any:
    """The helpers above, for test modules (they cannot import conftest)."""

    class Tools:
        feed = staticmethod(feed)
        raw_frame = staticmethod(raw_frame)

    return Tools
