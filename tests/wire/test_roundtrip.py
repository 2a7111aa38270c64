"""Every event survives the trip, however the bytes are cut."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import libpipe.wire as wire
from libpipe.errors import InvalidMessageError
from libpipe.wire import (
    Cancel,
    ConnectionEnded,
    ErrorReply,
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
from libpipe.wire._tensors import DTYPES

MODES = ["whole", "bytewise", "get_buffer", "trailing"]


def test_public_surface():
    assert set(wire.__all__ if hasattr(wire, "__all__") else dir(wire)) >= {
        "PROTOCOL_VERSION",
        "NEED_DATA",
        "Limits",
        "Role",
        "WireConnection",
        "Hello",
        "Request",
        "Response",
        "StreamOpen",
        "StreamData",
        "StreamClose",
        "ErrorReply",
        "Cancel",
        "Notify",
        "Ping",
        "Pong",
        "GoAway",
        "ConnectionEnded",
        "cast_for_wire",
        "FrameKind",
    }
    assert wire.PROTOCOL_VERSION == 1


def _same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name == "tensors":
            assert len(x) == len(y)
            for s, t in zip(x, y, strict=True):
                assert s.dtype == t.dtype and s.shape == t.shape
                assert torch.equal(s, t)
        else:
            assert x == y, name


@pytest.mark.parametrize("mode", MODES)
def test_unary_call_every_feed_mode(pair, mode):
    t = torch.randn(1, 3, 8).half()
    req = Request(1, "forward", {"span": [0, 4], "x": None}, (t, torch.arange(5)))
    _same(pair.deliver(pair.dialer, req, mode), req)
    resp = Response(1, {"ok": True}, (t * 2,))
    _same(pair.deliver(pair.acceptor, resp, mode), resp)
    assert pair.dialer.open_streams == {} == pair.acceptor.open_streams


@pytest.mark.parametrize("mode", MODES)
def test_stream_and_connection_events_every_feed_mode(pair, mode):
    events = [
        (pair.dialer, StreamOpen(3, "session", {"max_length": 16})),
        (pair.acceptor, StreamData(3, {"step": 0}, (torch.ones(2, 2, dtype=torch.bfloat16),))),
        (pair.dialer, StreamData(3, {}, ())),
        (pair.dialer, StreamClose(3, {"why": "done"})),
        (pair.acceptor, StreamClose(3)),
        (pair.dialer, Notify("gossip", {"records": [b"\x00\x01"]})),
        (pair.acceptor, Ping(2**64 - 1)),
        (pair.dialer, Pong(2**64 - 1)),
        (pair.dialer, Request(5, "m")),
        (pair.acceptor, ErrorReply(5, "cache_full", "no room", {"free": 3})),
        (pair.dialer, Request(7, "m")),
        (pair.dialer, Cancel(7)),
        (pair.acceptor, ErrorReply(0, "protocol", "bye")),
        (pair.acceptor, GoAway(7, "draining")),
    ]
    for sender, event in events:
        _same(pair.deliver(sender, event, mode), event)


def test_eof_at_frame_boundary_is_connection_ended(pair):
    pair.acceptor.receive_data(b"")
    assert isinstance(pair.acceptor.next_event(), ConnectionEnded)


def test_send_returns_tensor_memory_not_a_copy(pair):
    t = torch.randn(4, 1024).half()
    buffers = pair.dialer.send(Request(1, "m", {}, (t,)))
    views = [b for b in buffers if isinstance(b, memoryview)]
    assert len(views) == 1 and views[0].nbytes == t.numel() * 2
    t[0, 0] = 7.0  # the buffer aliases the tensor
    assert bytes(views[0][:2]) == t[0, :1].numpy().tobytes()


def test_large_frame_via_get_buffer_lands_in_place(make_pair):
    """Bytes written into get_buffer's memory are the tensor's memory: the
    payload is not copied again after the "recv_into"."""
    pair = make_pair(compression=(False, False))
    t = torch.randn(256, 1024).half()
    data = b"".join(bytes(b) for b in pair.dialer.send(Request(1, "m", {}, (t,))))
    conn = pair.acceptor
    pos = 0
    last_region = None
    while pos < len(data):
        assert conn.next_event() is wire.NEED_DATA
        buf = conn.get_buffer(64 * 1024)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
        region = np.frombuffer(buf, dtype=np.uint8)
        last_region = (region.ctypes.data, region.ctypes.data + len(buf))
        del buf, region
    event = conn.next_event()
    received = event.tensors[0]
    assert torch.equal(received, t)
    # the last write covered the rest of the frame: the tensor's end lies in it
    end = received.data_ptr() + received.numel() * 2
    assert last_region[0] < end <= last_region[1]
    # received tensors are writable and 8-byte aligned
    received[0, 0] = 1.0
    assert received.data_ptr() % 8 == 0


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@settings(
    deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), shapes), max_size=4),
    meta=st.dictionaries(
        st.text(max_size=5),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=8)
        | st.binary(max_size=8)
        | st.floats(allow_nan=False),
        max_size=4,
    ),
    cut=st.lists(st.integers(1, 200), max_size=6),
)
def test_tensors_of_every_dtype_and_shape_at_any_split(make_pair, specs, meta, cut):
    pair = make_pair()
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for name, shape in specs:
        dtype = DTYPES[name]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        elif dtype is torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            t = torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=gen).to(dtype)
        tensors.append(t)
    event = StreamOpen(1, "s", meta, tuple(tensors))
    data = b"".join(bytes(b) for b in pair.dialer.send(event))
    pieces, pos = [], 0
    for c in cut:
        pieces.append(data[pos : pos + c])
        pos += c
    pieces.append(data[pos:])
    got = []
    for piece in pieces:
        if piece:
            got += [e for e in _feed_piece(pair.acceptor, piece)]
    assert len(got) == 1
    _same(got[0], event)
    for t in got[0].tensors:
        assert math.prod(t.shape) == t.numel()


def _feed_piece(conn, piece):
    conn.receive_data(piece)
    out = []
    while (e := conn.next_event()) is not wire.NEED_DATA:
        out.append(e)
    return out


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)
maps = st.dictionaries(st.text(max_size=6), values, max_size=4)
names = st.text(min_size=1, max_size=12)
connection_events = st.one_of(
    st.builds(Notify, names, maps),
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.builds(Pong, st.integers(0, 2**64 - 1)),
    st.builds(ErrorReply, st.just(0), names, st.text(max_size=20), maps),
)


@settings(
    deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=st.lists(connection_events, min_size=1, max_size=4),
    request_meta=maps,
    mode=st.sampled_from(MODES),
)
def test_messages_round_trip(make_pair, events, request_meta, mode):
    pair = make_pair()
    for event in events:
        _same(pair.deliver(pair.acceptor, event, mode), event)
    _same(
        pair.deliver(pair.dialer, Request(1, "m", request_meta), mode),
        Request(1, "m", request_meta),
    )
    reply = Response(1, request_meta)
    _same(pair.deliver(pair.acceptor, reply, mode), reply)


@settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    peer_id=names,
    model_id=st.text(max_size=10),
    features=st.frozensets(names, max_size=3),
    info=maps,
)
def test_hello_round_trip(make_pair, peer_id, model_id, features, info):
    pair = make_pair(handshake=False)
    hello = Hello(1, peer_id, "dialer", model_id, features, info)
    _same(pair.deliver(pair.dialer, hello), hello)


def test_non_contiguous_and_fp32_tensors_are_sent_as_their_values(pair):
    t = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # a transposed view
    assert not t.is_contiguous()
    got = pair.deliver(pair.dialer, Request(1, "m", {}, (t, t[::2])))
    assert torch.equal(got.tensors[0], t) and torch.equal(got.tensors[1], t[::2])


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_travels_in_every_shape_without_a_copy(pair, name):
    """The one-torch-call encoding (``numpy()``, read off the array) and the
    general one (bf16) give the same bytes; scalars, empty tensors and views
    into the middle of a storage keep their values and shapes."""
    dtype = DTYPES[name]
    base = (torch.arange(40) % 2 if dtype is torch.bool else torch.arange(40)).to(dtype)
    cases = (base[7:19].view(3, 4), base[5], base[:0].view(0, 4), base.view(2, 4, 5))
    buffers = pair.dialer.send(Request(1, "m", {}, cases))
    for t in cases[:2]:
        # the tensor's own storage goes out, not a copy of it
        assert any(
            isinstance(b, memoryview)
            and b.nbytes == t.numel() * t.element_size()
            and np.frombuffer(b, dtype=np.uint8).ctypes.data == t.data_ptr()
            for b in buffers
        )
    pair.acceptor.receive_data(b"".join(bytes(b) for b in buffers))
    got = pair.acceptor.next_event()
    for sent, received in zip(cases, got.tensors, strict=True):
        assert received.dtype is dtype and received.shape == sent.shape
        assert torch.equal(received, sent)


def test_a_dtype_numpy_has_and_the_wire_does_not_is_refused(pair):
    # numpy() succeeds for uint16: the dtype must still be judged
    with pytest.raises(InvalidMessageError, match="cannot travel"):
        pair.dialer.send(Request(1, "m", {}, (torch.ones(2, dtype=torch.uint16),)))
