"""One test per kind of bad input: each raises its own ProtocolError subclass,
with a message saying what was wrong, and leaves the connection in ERROR."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from libpipe.errors import (
    BadMagicError,
    ConfigError,
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
from libpipe.wire import (
    NEED_DATA,
    ConnectionEnded,
    FrameKind,
    Limits,
    Request,
    Role,
    StreamData,
    WireConnection,
)

K = FrameKind


def _reject(pair, tools, data, error, match):
    conn = pair.acceptor
    with pytest.raises(error, match=match):
        tools.feed(conn, data)
    assert conn.errored
    # fail fast afterwards, whatever comes
    with pytest.raises(ProtocolError, match="ERROR state"):
        conn.next_event()


def test_bad_magic(pair, tools):
    _reject(
        pair, tools, tools.raw_frame(K.PING, {"nonce": 1}, magic=b"HTTP"), BadMagicError, "4854"
    )


def test_bad_magic_is_seen_from_the_first_bytes(make_pair):
    pair = make_pair(handshake=False)
    pair.acceptor.receive_data(b"\x16\x03")  # a TLS record where a frame should be
    with pytest.raises(BadMagicError):
        pair.acceptor.next_event()


def test_unknown_version(pair, tools):
    frame = tools.raw_frame(K.PING, {"nonce": 1}, version=2)
    _reject(pair, tools, frame, UnsupportedVersionError, "version 2")


def test_unknown_kind(pair, tools):
    _reject(pair, tools, tools.raw_frame(200, {}), UnknownFrameKindError, "kind 200")


def test_unknown_flags(pair, tools):
    frame = tools.raw_frame(K.PING, {"nonce": 1}, flags=0x8000)
    _reject(pair, tools, frame, InvalidMessageError, "flag")


def test_oversized_metadata_length_rejected_before_allocation(make_pair, tools):
    pair = make_pair(limits=Limits(max_metadata_bytes=1024))
    frame = tools.raw_frame(K.NOTIFY, {}, meta_len=2**32 - 1)
    _reject(pair, tools, frame[:24], LimitExceededError, "metadata of 4294967295")


def test_oversized_payload_length_rejected_before_allocation(pair, tools):
    frame = tools.raw_frame(K.REQUEST, {"method": "m"}, stream_id=1, payload_len=2**63)
    _reject(pair, tools, frame, LimitExceededError, "payload of")


def test_payload_on_a_kind_without_tensors(pair, tools):
    frame = tools.raw_frame(K.PING, {"nonce": 1}, b"12345678")
    _reject(pair, tools, frame, PayloadMismatchError, "PING carries no payload")


@pytest.mark.parametrize("cut", [0, 3, 10, 24, 30])
def test_truncated_frame(pair, tools, cut):
    frame = tools.raw_frame(K.NOTIFY, {"method": "gossip", "meta": {"x": "y" * 20}})
    conn = pair.acceptor
    if cut:
        conn.receive_data(frame[:cut])
        assert conn.next_event() is NEED_DATA
        conn.receive_data(b"")
        with pytest.raises(TruncatedFrameError, match="connection ended"):
            conn.next_event()
    else:
        conn.receive_data(b"")
        assert type(conn.next_event()).__name__ == "ConnectionEnded"


def test_malformed_msgpack(pair, tools):
    frame = tools.raw_frame(K.NOTIFY, meta_bytes=b"\xc1\xc1\xc1")
    _reject(pair, tools, frame, MalformedMetadataError, "not valid msgpack")


def test_msgpack_with_trailing_bytes(pair, tools):
    frame = tools.raw_frame(K.NOTIFY, meta_bytes=msgpack.packb({"method": "x"}) + b"\x00")
    _reject(pair, tools, frame, MalformedMetadataError, "not valid msgpack")


def test_metadata_not_a_map(pair, tools):
    _reject(pair, tools, tools.raw_frame(K.NOTIFY, [1, 2]), InvalidMessageError, "must be a map")


def test_metadata_missing_field(pair, tools):
    _reject(pair, tools, tools.raw_frame(K.PING, {}), InvalidMessageError, "lacks 'nonce'")


@pytest.mark.parametrize(
    ("kind", "meta", "stream_id", "match"),
    [
        (K.PING, {"nonce": -1}, 0, "nonce"),
        (K.NOTIFY, {"method": 7}, 0, "method"),
        (K.NOTIFY, {"method": "x", "meta": [1]}, 0, "meta"),
        (K.REQUEST, {"method": ""}, 1, "method"),
        (K.ERROR, {"kind": "", "message": "x"}, 0, "kind"),
        (K.GO_AWAY, {"last_stream_id": "x"}, 0, "last_stream_id"),
        (K.PING, {"nonce": 1}, 4, "stream 0"),
        (K.REQUEST, {"method": "m"}, 0, "stream 0"),
    ],
)
def test_metadata_of_the_wrong_shape(pair, tools, kind, meta, stream_id, match):
    frame = tools.raw_frame(kind, meta, stream_id=stream_id)
    _reject(pair, tools, frame, InvalidMessageError, match)


def _tensor_frame(tools, descriptors, payload):
    return tools.raw_frame(K.REQUEST, {"method": "m", "tensors": descriptors}, payload, stream_id=1)


def test_payload_size_disagrees_with_dtype_and_shape(pair, tools):
    frame = _tensor_frame(tools, [["f16", [2, 3], "raw", 10]], bytes(10))
    _reject(pair, tools, frame, PayloadMismatchError, "10 bytes on the wire for f16")


def test_payload_longer_than_its_tensors(pair, tools):
    frame = _tensor_frame(tools, [["f16", [2], "raw", 4]], bytes(12))
    _reject(pair, tools, frame, PayloadMismatchError, "take 4 bytes but the payload has 12")


def test_payload_without_descriptors(pair, tools):
    frame = tools.raw_frame(K.REQUEST, {"method": "m"}, bytes(8), stream_id=1)
    _reject(pair, tools, frame, PayloadMismatchError, "take 0 bytes")


@pytest.mark.parametrize(
    ("desc", "match"),
    [
        (["f8", [1], "raw", 1], "unknown dtype"),
        (["f16", [-1], "raw", 0], "shape"),
        (["f16", [1], "lz4", 2], "unknown codec"),
        (["f16", [1], "raw"], "descriptor"),
        (["u8", [1], "shuffle-zstd", 1], "shuffle of a 1-byte"),
    ],
)
def test_bad_tensor_descriptor(pair, tools, desc, match):
    frame = _tensor_frame(tools, [desc], bytes(8))
    _reject(pair, tools, frame, InvalidMessageError, match)


def test_bool_tensor_with_other_bytes(pair, tools):
    frame = _tensor_frame(tools, [["bool", [2], "raw", 2]], b"\x01\x02")
    _reject(pair, tools, frame, InvalidMessageError, "bool")


def test_huge_extent_of_an_empty_tensor(pair, tools):
    frame = _tensor_frame(tools, [["f16", [0, 2**40], "raw", 0]], b"")
    _reject(pair, tools, frame, LimitExceededError, "extent")


def test_too_many_tensors(make_pair, tools):
    pair = make_pair(limits=Limits(max_tensors=2))
    frame = _tensor_frame(tools, [["u8", [0], "raw", 0]] * 3, b"")
    _reject(pair, tools, frame, LimitExceededError, "3 tensors")


def test_too_many_dims(make_pair, tools):
    pair = make_pair(limits=Limits(max_tensor_dims=2))
    frame = _tensor_frame(tools, [["u8", [1, 1, 1], "raw", 1]], b"\x01")
    _reject(pair, tools, frame, LimitExceededError, "3 dims")


def test_decoded_size_over_the_payload_limit(make_pair, tools):
    # a shape that claims far more than the limit, with a tiny compressed body
    pair = make_pair(limits=Limits(max_payload_bytes=1 << 20))
    frame = tools.raw_frame(
        K.REQUEST,
        {"method": "m", "tensors": [["f16", [1 << 10, 1 << 10], "shuffle-zstd", 8]]},
        bytes(8),
        stream_id=1,
        flags=1,
    )
    _reject(pair, tools, frame, LimitExceededError, "once decoded")


def test_local_send_limits(make_pair):
    pair = make_pair(limits=Limits(max_tensors=1, max_tensor_dims=2, max_metadata_bytes=128))
    with pytest.raises(LimitExceededError):
        pair.dialer.send(Request(1, "m", {}, (torch.ones(1), torch.ones(1))))
    with pytest.raises(LimitExceededError):
        pair.dialer.send(Request(1, "m", {}, (torch.ones(1, 1, 1),)))
    with pytest.raises(LimitExceededError):
        pair.dialer.send(Request(1, "m", {"x": "y" * 200}))
    with pytest.raises(InvalidMessageError, match="cannot be encoded"):
        pair.dialer.send(Request(1, "m", {"x": object()}))
    with pytest.raises(InvalidMessageError, match="cannot travel"):
        pair.dialer.send(Request(1, "m", {}, (torch.ones(1, dtype=torch.complex64),)))
    # none of it changed the state: stream 1 can still be opened
    assert not pair.dialer.errored
    pair.dialer.send(Request(1, "m"))
    assert 1 in pair.dialer.open_streams


@pytest.mark.parametrize(
    "build",
    [
        lambda: Request(0, "m"),
        lambda: Request(1, ""),
        lambda: Request(1, "m", {1: 2}),
        lambda: Request(1, "m", {}, ("not a tensor",)),
        lambda: StreamData(2**32, {}),
    ],
)
def test_events_validate_themselves(build):
    with pytest.raises(InvalidMessageError):
        build()


def test_limits_validate_themselves():
    with pytest.raises(ConfigError):
        Limits(max_tensors=0)
    with pytest.raises(ConfigError):
        Limits(max_payload_bytes=True)


def test_frames_before_hello(make_pair, tools):
    pair = make_pair(handshake=False)
    frame = tools.raw_frame(K.PING, {"nonce": 1})
    _reject(pair, tools, frame, StreamStateError, "before Hello")


@settings(
    deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200), prefix=st.booleans())
def test_fuzz_parses_or_raises_protocol_error(tools, data, prefix):
    """Random bytes, or random bytes after a valid header prefix: the decoder
    returns events or NEED_DATA, or raises a ProtocolError; nothing else."""
    conn = WireConnection(Role.ACCEPTOR, Limits(max_payload_bytes=4096))
    if prefix:
        data = tools.raw_frame(K.HELLO, {"version": 1, "peer_id": "p", "role": "dialer"}) + data
    _drain_to_eof(conn, data)


@settings(
    deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pos=st.integers(0, 10_000), value=st.integers(0, 255))
def test_fuzz_single_byte_corruption_of_a_tensor_frame(make_pair, pos, value):
    pair = make_pair()
    event = Request(1, "m", {"a": [1, 2]}, (torch.arange(12).half().view(3, 4), torch.ones(2)))
    data = bytearray(b"".join(bytes(b) for b in pair.dialer.send(event)))
    pos %= len(data)
    data[pos] = value
    _drain_to_eof(pair.acceptor, bytes(data))


def _drain_to_eof(conn, data):
    """Feed ``data`` then EOF; a bounded number of events may come out."""
    if data:
        conn.receive_data(data)
    try:
        for _ in range(len(data) + 1):
            if conn.next_event() is NEED_DATA:
                break
        else:
            pytest.fail("the decoder produced more events than it had bytes")
        conn.receive_data(b"")
        assert isinstance(conn.next_event(), ConnectionEnded)
    except ProtocolError:
        pass
