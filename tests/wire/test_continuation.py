"""Continued messages: a payload cut into CONTINUATION frames, other
streams' frames between them, and every way a peer can get them wrong."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from libpipe.errors import (
    InvalidMessageError,
    LimitExceededError,
    PayloadMismatchError,
    StreamStateError,
    TruncatedFrameError,
)
from libpipe.wire import (
    NEED_DATA,
    FrameKind,
    Limits,
    Ping,
    Request,
    StreamData,
    StreamOpen,
)
from libpipe.wire._frame import FLAG_CONTINUED

SLICE = 64 * 1024
FEED_MODES = ("whole", "bytewise", "get_buffer", "trailing")


def _frames(sender: Any, event: Any, slice_bytes: int = SLICE) -> list[bytes]:
    return [b"".join(bytes(b) for b in frame) for frame in sender.send_frames(event, slice_bytes)]


def _open_stream(pair: Any) -> None:
    assert pair.deliver(pair.dialer, StreamOpen(1, "session")) == StreamOpen(1, "session")


def _big() -> torch.Tensor:
    """400 000 bytes that zstd cannot shrink below a slice."""
    return torch.randn(4, 25_000, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", FEED_MODES)
def test_a_continued_message_arrives_whole(make_pair: Any, tools: Any, mode: str) -> None:
    pair = make_pair(compression=(False, False))
    _open_stream(pair)
    tensor = _big()  # 400 000 bytes: a head and 7 slices
    frames = _frames(pair.dialer, StreamData(1, {"step": 3}, (tensor,)))
    assert len(frames) == 1 + -(-tensor.nbytes // SLICE)
    events = tools.feed(pair.acceptor, b"".join(frames), mode)
    assert len(events) == 1
    assert events[0].meta == {"step": 3}
    assert torch.equal(events[0].tensors[0], tensor)


def test_other_streams_frames_go_between_slices(pair: Any, tools: Any) -> None:
    _open_stream(pair)
    tensor = _big()
    frames = _frames(pair.dialer, StreamData(1, {}, (tensor,)))
    small = _frames(pair.dialer, Request(3, "decode", {"n": 1}))
    ping = _frames(pair.dialer, Ping(7))
    data = b"".join([frames[0], *small, frames[1], *ping, *frames[2:]])
    events = tools.feed(pair.acceptor, data, "whole")
    assert events[:2] == [Request(3, "decode", {"n": 1}), Ping(7)]
    assert torch.equal(events[2].tensors[0], tensor)


def test_the_payload_lands_in_one_buffer_without_a_copy(pair: Any) -> None:
    """Slices that are not yet there are read into the message's buffer
    itself, and the tensor is a view of it."""
    _open_stream(pair)
    tensor = _big()
    head, *slices = _frames(pair.dialer, StreamData(1, {}, (tensor,)))
    acceptor = pair.acceptor
    acceptor.receive_data(head + slices[0][:100])
    assert acceptor.next_event() is NEED_DATA
    buffer = acceptor.get_buffer(1)
    assert len(buffer) == len(slices[0]) - 100  # the rest of this slice only
    rest = b"".join(slices)[100:]
    buffer[:] = rest[: len(buffer)]
    acceptor.buffer_updated(len(buffer))
    acceptor.receive_data(rest[len(buffer) :])
    event = acceptor.next_event()
    assert torch.equal(event.tensors[0], tensor)
    assert not event.tensors[0].untyped_storage().resizable()  # a view of the numpy buffer


def test_a_peer_that_did_not_offer_it_gets_one_frame(make_pair: Any) -> None:
    pair = make_pair(continuation=(True, False))
    _open_stream(pair)
    frames = pair.dialer.send_frames(StreamData(1, {}, (_big(),)), SLICE)
    assert len(frames) == 1
    small = pair.dialer.send_frames(StreamData(1, {}, (torch.ones(8),)), SLICE)
    assert len(small) == 1


def test_slice_bytes_must_be_positive(pair: Any) -> None:
    with pytest.raises(ValueError):
        pair.dialer.send_frames(StreamData(1, {}, ()), 0)


def _bad(pair: Any, tools: Any, data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        tools.feed(pair.acceptor, data, "whole")


def test_wrong_continuations_are_protocol_errors(make_pair: Any, tools: Any) -> None:
    def fresh() -> tuple[Any, list[bytes]]:
        pair = make_pair()
        _open_stream(pair)
        return pair, _frames(pair.dialer, StreamData(1, {}, (_big(),)))

    def cont(stream_id: int, payload: bytes, **kw: Any) -> bytes:
        return tools.raw_frame(
            FrameKind.CONTINUATION, None, payload, stream_id=stream_id, meta_bytes=b"", **kw
        )

    pair, frames = fresh()
    _bad(pair, tools, cont(1, b"x" * 8), StreamStateError, "continues nothing")
    pair, frames = fresh()
    _bad(pair, tools, frames[0] + cont(3, b"x" * 8), StreamStateError, "continues nothing")
    pair, frames = fresh()
    too_much = b"x" * (_big().nbytes + 1)
    _bad(pair, tools, frames[0] + cont(1, too_much), PayloadMismatchError, "lacks only")
    pair, frames = fresh()
    other = _frames(pair.dialer, StreamData(1, {"late": 1}))
    _bad(pair, tools, frames[0] + b"".join(other), StreamStateError, "is incomplete")
    pair, frames = fresh()
    flagged = cont(1, b"x" * 8, flags=1)
    _bad(pair, tools, frames[0] + flagged, InvalidMessageError, "payload only")
    pair, frames = fresh()
    _bad(pair, tools, frames[0] + cont(1, b""), InvalidMessageError, "payload only")


def test_a_second_continued_message_must_wait(make_pair: Any, tools: Any) -> None:
    pair = make_pair()
    _open_stream(pair)
    assert pair.deliver(pair.dialer, StreamOpen(3, "other")) == StreamOpen(3, "other")
    first = _frames(pair.dialer, StreamData(1, {}, (_big(),)))
    second = _frames(pair.dialer, StreamData(3, {}, (_big(),)))
    with pytest.raises(StreamStateError, match="is incomplete"):
        tools.feed(pair.acceptor, first[0] + second[0], "whole")


def test_the_flag_needs_an_offer_and_a_payload(make_pair: Any, tools: Any) -> None:
    pair = make_pair(continuation=(True, False))
    _open_stream(pair)
    head = tools.raw_frame(
        FrameKind.STREAM_DATA, {"meta": {}}, b"", stream_id=1, flags=FLAG_CONTINUED, payload_len=64
    )
    with pytest.raises(InvalidMessageError, match="did not offer"):
        tools.feed(pair.acceptor, head, "whole")
    pair = make_pair()
    _open_stream(pair)
    head = tools.raw_frame(
        FrameKind.STREAM_DATA, {"meta": {}}, b"", stream_id=1, flags=FLAG_CONTINUED
    )
    with pytest.raises(InvalidMessageError, match="without payload"):
        tools.feed(pair.acceptor, head, "whole")


def test_the_declared_total_is_checked_before_anything_is_allocated(
    make_pair: Any, tools: Any
) -> None:
    pair = make_pair(limits=Limits(max_payload_bytes=1 << 20))
    _open_stream(pair)
    head = tools.raw_frame(
        FrameKind.STREAM_DATA,
        {"meta": {}},
        b"",
        stream_id=1,
        flags=FLAG_CONTINUED,
        payload_len=1 << 40,
    )
    with pytest.raises(LimitExceededError):
        tools.feed(pair.acceptor, head, "whole")


def test_the_connection_ending_inside_a_continued_message_is_truncation(pair: Any) -> None:
    _open_stream(pair)
    frames = _frames(pair.dialer, StreamData(1, {}, (_big(),)))
    pair.acceptor.receive_data(b"".join(frames[:2]))
    assert pair.acceptor.next_event() is NEED_DATA
    pair.acceptor.receive_data(b"")
    with pytest.raises(TruncatedFrameError):
        pair.acceptor.next_event()
