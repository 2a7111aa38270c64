"""The stream state table, from both ends of a connection."""

from __future__ import annotations

import pytest
import torch

from libpipe.errors import (
    BadMagicError,
    InvalidMessageError,
    LimitExceededError,
    ProtocolError,
    StreamStateError,
)
from libpipe.wire import (
    NEED_DATA,
    Cancel,
    ErrorReply,
    FrameKind,
    GoAway,
    Hello,
    Limits,
    Ping,
    Request,
    Response,
    Role,
    StreamClose,
    StreamData,
    StreamOpen,
    StreamState,
    WireConnection,
)
from libpipe.wire._state import TRANSITIONS, Party


def test_unary_lifecycle(pair):
    pair.deliver(pair.dialer, Request(1, "m"))
    assert pair.dialer.open_streams == {1: StreamState.OPEN_UNARY}
    assert pair.acceptor.open_streams == {1: StreamState.OPEN_UNARY}
    with pytest.raises(StreamStateError, match="opener may not send RESPONSE"):
        pair.dialer.send(Response(1))
    pair.deliver(pair.acceptor, Response(1))
    assert pair.dialer.open_streams == {} == pair.acceptor.open_streams


@pytest.mark.parametrize("first", ["opener", "responder"])
def test_stream_half_closes_in_either_order(pair, first):
    pair.deliver(pair.dialer, StreamOpen(1, "s"))
    order = [pair.dialer, pair.acceptor] if first == "opener" else [pair.acceptor, pair.dialer]
    pair.deliver(order[0], StreamClose(1))
    done = StreamState.OPENER_DONE if first == "opener" else StreamState.RESPONDER_DONE
    assert pair.dialer.open_streams == {1: done} == pair.acceptor.open_streams
    with pytest.raises(StreamStateError):
        order[0].send(StreamData(1))
    pair.deliver(order[1], StreamData(1, {"still": "sending"}))
    pair.deliver(order[1], StreamClose(1))
    assert pair.dialer.open_streams == {} == pair.acceptor.open_streams


def test_every_transition_in_the_table_is_reachable_from_both_ends(make_pair):
    """Drive each (state, party, kind) entry on a fresh pair and check both
    sides land in the table's state."""
    reach = {
        StreamState.OPEN_UNARY: [Request(1, "m")],
        StreamState.OPEN: [StreamOpen(1, "s")],
        StreamState.OPENER_DONE: [StreamOpen(1, "s"), StreamClose(1)],
        StreamState.RESPONDER_DONE: [StreamOpen(1, "s"), ("responder", StreamClose(1))],
    }
    build = {
        FrameKind.RESPONSE: lambda: Response(1),
        FrameKind.ERROR: lambda: ErrorReply(1, "busy", "no"),
        FrameKind.CANCEL: lambda: Cancel(1),
        FrameKind.STREAM_DATA: lambda: StreamData(1),
        FrameKind.STREAM_CLOSE: lambda: StreamClose(1),
    }
    for (state, party, kind), nxt in TRANSITIONS.items():
        pair = make_pair()
        for step in reach[state]:
            sender, event = (
                (pair.acceptor, step[1]) if isinstance(step, tuple) else (pair.dialer, step)
            )
            pair.deliver(sender, event)
        sender = pair.dialer if party is Party.OPENER else pair.acceptor
        pair.deliver(sender, build[kind]())
        expected = {} if nxt is StreamState.CLOSED else {1: nxt}
        assert pair.dialer.open_streams == expected == pair.acceptor.open_streams, (
            state,
            party,
            kind,
        )


def test_wrong_parity(pair, tools):
    with pytest.raises(StreamStateError, match="wrong parity"):
        pair.dialer.send(Request(2, "m"))
    frame = tools.raw_frame(FrameKind.REQUEST, {"method": "m"}, stream_id=4)
    with pytest.raises(StreamStateError, match="wrong parity"):
        tools.feed(pair.acceptor, frame)


def test_frame_for_unknown_stream(pair, tools):
    frame = tools.raw_frame(FrameKind.STREAM_DATA, {"meta": {}}, stream_id=9)
    with pytest.raises(StreamStateError, match="not open"):
        tools.feed(pair.acceptor, frame)


def test_reopening_an_open_stream(pair, tools):
    pair.deliver(pair.dialer, Request(1, "m"))
    with pytest.raises(StreamStateError, match="already open"):
        pair.dialer.send(Request(1, "m"))
    frame = tools.raw_frame(FrameKind.REQUEST, {"method": "m"}, stream_id=1)
    with pytest.raises(StreamStateError, match="already open"):
        tools.feed(pair.acceptor, frame)


def test_frame_after_the_peer_closed_the_stream(pair, tools):
    pair.deliver(pair.dialer, StreamOpen(1, "s"))
    pair.deliver(pair.dialer, StreamClose(1))
    frame = tools.raw_frame(FrameKind.STREAM_DATA, {}, stream_id=1)
    with pytest.raises(StreamStateError, match="opener may not send STREAM_DATA"):
        tools.feed(pair.acceptor, frame)


def test_hello_rules(make_pair):
    pair = make_pair(handshake=False)
    with pytest.raises(StreamStateError, match="before Hello"):
        pair.dialer.send(Ping(1))
    with pytest.raises(InvalidMessageError, match="this side is the dialer"):
        pair.dialer.send(Hello(1, "x", "acceptor"))
    pair.deliver(pair.dialer, Hello(1, "x", "dialer"))
    with pytest.raises(StreamStateError, match="already sent"):
        pair.dialer.send(Hello(1, "x", "dialer"))
    # the peer must not claim our role
    pair2 = make_pair(handshake=False)
    data = b"".join(pair2.dialer.send(Hello(1, "x", "dialer")))
    other_dialer = WireConnection(Role.DIALER)
    other_dialer.receive_data(data)
    with pytest.raises(InvalidMessageError, match="dialer too"):
        other_dialer.next_event()


def test_second_hello_from_the_peer(pair, tools):
    frame = tools.raw_frame(FrameKind.HELLO, {"version": 1, "peer_id": "p", "role": "dialer"})
    with pytest.raises(StreamStateError, match="second Hello"):
        tools.feed(pair.acceptor, frame)


def test_error_reply_on_stream_zero_is_allowed_before_hello_and_after_an_error(make_pair, tools):
    pair = make_pair(handshake=False)
    assert pair.deliver(pair.acceptor, ErrorReply(0, "auth", "who are you")).kind == "auth"
    with pytest.raises(BadMagicError):
        tools.feed(pair.acceptor, b"garbage!" * 4)
    assert pair.acceptor.errored
    pair.acceptor.send(ErrorReply(0, "protocol.bad_magic", "bye"))
    with pytest.raises(ProtocolError, match="ERROR state"):
        pair.acceptor.send(Ping(1))


def test_max_open_streams_for_the_peer(make_pair, tools):
    pair = make_pair(limits=Limits(max_open_streams=2))
    pair.deliver(pair.dialer, Request(1, "m"))
    pair.deliver(pair.dialer, StreamOpen(3, "s"))
    frame = tools.raw_frame(FrameKind.REQUEST, {"method": "m"}, stream_id=5)
    with pytest.raises(LimitExceededError, match="more than 2 streams"):
        tools.feed(pair.acceptor, frame)


def test_finished_streams_free_their_slot(make_pair):
    pair = make_pair(limits=Limits(max_open_streams=1))
    for sid in range(1, 20, 2):
        pair.deliver(pair.dialer, Request(sid, "m"))
        pair.deliver(pair.acceptor, Response(sid))


def test_frames_racing_a_cancel_are_dropped(pair, tools):
    pair.deliver(pair.dialer, Request(1, "m"))
    pair.deliver(pair.dialer, StreamOpen(3, "s"))
    # the responder answers while the opener's Cancel is in flight
    late_response = b"".join(bytes(b) for b in pair.acceptor.send(Response(1)))
    late_data = b"".join(bytes(b) for b in pair.acceptor.send(StreamData(3)))
    pair.dialer.send(Cancel(1))
    pair.dialer.send(Cancel(3))
    assert tools.feed(pair.dialer, late_response + late_data) == []
    assert not pair.dialer.errored
    # and the late Cancel for a call already answered is dropped too
    assert tools.feed(pair.acceptor, tools.raw_frame(FrameKind.CANCEL, {}, stream_id=1)) == []


def test_data_racing_an_error_reply_is_dropped(pair, tools):
    pair.deliver(pair.dialer, StreamOpen(1, "s"))
    late = b"".join(bytes(b) for b in pair.dialer.send(StreamData(1)))
    pair.acceptor.send(ErrorReply(1, "invalid_request", "no"))
    assert tools.feed(pair.acceptor, late) == []


def test_go_away(pair, tools):
    pair.deliver(pair.dialer, Request(1, "m"))
    pair.deliver(pair.dialer, Request(3, "m"))
    # acceptor says: streams up to 1 finish, nothing above
    early = b"".join(bytes(b) for b in pair.dialer.send(Request(5, "m")))
    pair.deliver(pair.acceptor, GoAway(1, "draining"))
    assert pair.dialer.open_streams == {1: StreamState.OPEN_UNARY}
    with pytest.raises(StreamStateError, match="after GoAway"):
        pair.dialer.send(Request(7, "m"))
    # an open that crossed the GoAway is dropped by its sender's peer
    assert tools.feed(pair.acceptor, early) == []
    with pytest.raises(StreamStateError, match="after GoAway"):
        pair.acceptor.send(Request(2, "m"))
    pair.deliver(pair.acceptor, Response(1))
    assert pair.acceptor.next_event() is NEED_DATA


def test_frames_on_a_stream_refused_by_go_away_are_dropped(pair, tools):
    pair.acceptor.send(GoAway(0, "draining"))  # still in flight to the dialer
    crossing = b"".join(
        bytes(b)
        for event in (StreamOpen(1, "s"), StreamData(1), Cancel(1))
        for b in pair.dialer.send(event)
    )
    assert tools.feed(pair.acceptor, crossing) == []
    assert pair.acceptor.open_streams == {}
    assert not pair.acceptor.errored


def test_buffer_updated_checks_its_count(pair):
    room = len(pair.acceptor.get_buffer(16))
    with pytest.raises(ValueError, match="offered"):
        pair.acceptor.buffer_updated(room + 1)
    with pytest.raises(ValueError, match="offered"):
        pair.acceptor.buffer_updated(0)


def _large_frame(sender, event):
    """The bytes of ``event`` carrying a tensor too big for the staging
    buffer, so its body is received into a buffer of its own."""
    data = b"".join(bytes(b) for b in sender.send(event))
    assert len(data) > 128 * 1024
    return data


def _big():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 64, 2048, generator=generator).to(torch.float16),)


@pytest.mark.parametrize("mode", ["receive_data", "get_buffer"])
def test_cancel_while_a_large_response_is_half_received(pair, tools, mode):
    """The response's header was accepted while the call was open; the
    Cancel ends the call before the body completes, so the completed frame
    must be judged again, and dropped."""
    pair.deliver(pair.dialer, Request(1, "m"))
    data = _large_frame(pair.acceptor, Response(1, {}, _big()))
    half = len(data) // 2
    assert tools.feed(pair.dialer, data[:half]) == []
    pair.dialer.send(Cancel(1))
    if mode == "get_buffer":
        rest = memoryview(data)[half:]
        while rest:
            buffer = pair.dialer.get_buffer(1)
            n = min(len(buffer), len(rest))
            buffer[:n] = rest[:n]
            del buffer
            pair.dialer.buffer_updated(n)
            rest = rest[n:]
        assert pair.dialer.next_event() is NEED_DATA
    else:
        assert tools.feed(pair.dialer, data[half:]) == []
    assert not pair.dialer.errored
    assert pair.dialer.open_streams == {}
    # the connection goes on
    pair.deliver(pair.dialer, Request(3, "m"))
    assert pair.deliver(pair.acceptor, Response(3)) == Response(3)


def test_cancel_while_large_stream_data_is_half_received(pair, tools):
    pair.deliver(pair.dialer, StreamOpen(1, "s"))
    data = _large_frame(pair.acceptor, StreamData(1, {}, _big()))
    assert tools.feed(pair.dialer, data[:1000]) == []
    pair.dialer.send(Cancel(1))
    assert tools.feed(pair.dialer, data[1000:]) == []
    assert not pair.dialer.errored


def test_error_reply_while_a_large_open_is_half_received(pair, tools):
    """The responder refuses a stream while the opener's large first data
    frame is still arriving."""
    pair.deliver(pair.dialer, StreamOpen(1, "s"))
    data = _large_frame(pair.dialer, StreamData(1, {}, _big()))
    assert tools.feed(pair.acceptor, data[:1000]) == []
    pair.acceptor.send(ErrorReply(1, "invalid_request", "no"))
    assert tools.feed(pair.acceptor, data[1000:]) == []
    assert not pair.acceptor.errored


def test_go_away_while_a_large_open_is_half_received(pair, tools):
    """A GoAway sent while a large open above its last stream id is arriving
    refuses that open: it is dropped, like one that arrives after."""
    data = _large_frame(pair.dialer, Request(1, "m", {}, _big()))
    assert tools.feed(pair.acceptor, data[:1000]) == []
    pair.acceptor.send(GoAway(0, "draining"))
    assert tools.feed(pair.acceptor, data[1000:]) == []
    assert pair.acceptor.open_streams == {}
    assert not pair.acceptor.errored


def test_half_close_while_large_data_is_half_received_still_delivers(pair, tools):
    """Our half-close does not end the peer's half: its frame still counts."""
    pair.deliver(pair.dialer, StreamOpen(1, "s"))
    event = StreamData(1, {"k": 1}, _big())
    data = _large_frame(pair.acceptor, event)
    assert tools.feed(pair.dialer, data[:1000]) == []
    pair.dialer.send(StreamClose(1))
    (received,) = tools.feed(pair.dialer, data[1000:])
    assert received.meta == {"k": 1}
    assert torch.equal(received.tensors[0], event.tensors[0])
    assert pair.dialer.open_streams == {1: StreamState.OPENER_DONE}
