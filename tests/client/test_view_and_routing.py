"""The swarm view (compatibility, gossip records, RTT EMA, bans) and the
translation to placement.route, without sockets."""

from __future__ import annotations

import time
from typing import Any

import pytest

from libpipe.client import SwarmView
from libpipe.client._routing import DEFAULT_TAU, plan_route, server_views
from libpipe.client._view import BAN_BASE, BAN_MAX, DEFAULT_RTT
from libpipe.errors import NoRouteError
from libpipe.net import Identity
from libpipe.swarm import RecordState, ServerRecord, sign_record
from libpipe.wire import PROTOCOL_VERSION

MODEL = "tiny@0123"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_view(clock: Clock | None = None) -> SwarmView:
    return SwarmView(
        model_id=MODEL, num_blocks=8, kv_values_per_token_block=128, clock=clock or Clock()
    )


def info(peer: str, span: tuple[int, int], **over: Any) -> dict[str, Any]:
    meta = {
        "peer_id": peer,
        "model_id": MODEL,
        "protocol": PROTOCOL_VERSION,
        "version": "0.1.0",
        "span": list(span),
        "num_blocks": 8,
        "dtype": "float32",
        "wire_dtype": "float16",
        "device": "cpu",
        "state": "online",
        "max_length": 1024,
        "cache_bytes_total": 1 << 20,
        "cache_bytes_free": 1 << 20,
        "cache_bytes_per_token": 512 * (span[1] - span[0]),
        "throughput_decode": 100.0,
        "throughput_forward": 1000.0,
        "active_sessions": 0,
        "adapters": [],
    }
    return meta | over


def test_only_compatible_servers_are_learned():
    view = make_view()
    assert view.merge_info("h:1", info("a", (0, 8))) is not None
    assert view.merge_info("h:2", info("b", (0, 8), model_id="other@1")) is None
    assert view.merge_info("h:3", info("c", (0, 8), protocol=PROTOCOL_VERSION + 1)) is None
    assert view.merge_info("h:4", info("d", (0, 8), dtype="int8")) is None
    assert view.merge_info("h:5", info("e", (0, 8), num_blocks=9)) is None
    assert view.merge_info("h:6", info("f", (0, 8)) | {"span": "all"}) is None
    assert view.merge_info("h:7", info("g", (0, 8), throughput_decode=float("nan"))) is None
    assert set(view.servers) == {"a"}
    assert view.skipped == {"model": 2, "protocol": 1, "dtype": 1, "malformed info": 2}


def test_a_client_may_refuse_dtypes():
    view = SwarmView(
        model_id=MODEL,
        num_blocks=8,
        kv_values_per_token_block=128,
        dtypes=("float32",),
        clock=Clock(),
    )
    assert view.merge_info("h:1", info("a", (0, 8), dtype="float16")) is None
    assert view.merge_info("h:2", info("b", (0, 8))) is not None


def test_only_online_unbanned_servers_that_hold_blocks_are_routable():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 8)))
    view.merge_info("h:2", info("b", (0, 8), state="draining"))
    view.merge_info("h:3", info("c", (0, 8), state="joining"))
    view.merge_info("h:4", info("d", (4, 4)))
    view.merge_info("h:5", info("e", (0, 8), max_length=16))
    view.merge_info("h:6", info("f", (0, 8)))
    view.ban("f", "test")
    assert [e.peer_id for e in view.routable()] == ["a", "e"]
    assert [e.peer_id for e in view.routable(max_length=32)] == ["a"]


def record_wire(identity: Identity, span: tuple[int, int], **over: Any) -> list[bytes]:
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key_bytes,
        addresses=("127.0.0.1:9",),
        model_id=MODEL,
        span=span,
        dtype="float16",
        version="0.1.0",
        throughput_decode=50.0,
        throughput_forward=500.0,
        free_cache_bytes=4096,
        active_sessions=1,
        state=RecordState.ONLINE,
        incarnation=1,
        timestamp=time.time(),
    )
    return sign_record(ServerRecord(**(fields | over)), identity).to_wire()


def test_gossip_records_are_verified_and_user_addresses_win():
    view = make_view()
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    view.merge_info("10.0.0.1:5", info(a.peer_id, (0, 4)))
    forged = record_wire(c, (0, 8))
    forged[1] = bytes(64)
    wires = [
        record_wire(a, (0, 4)),
        record_wire(b, (4, 8)),
        forged,
        record_wire(c, (0, 8), model_id="other@1"),
    ]
    assert view.merge_records(wires) == 2
    assert view.servers[a.peer_id].address == "10.0.0.1:5"  # the address we were given
    assert not view.servers[a.peer_id].pinned
    learned = view.servers[b.peer_id]
    assert learned.address == "127.0.0.1:9" and learned.pinned
    # KV bytes a token costs over the span, from the model and the dtype: 4 blocks x 128 x 2 B.
    assert learned.cache_bytes_per_token == 4 * 128 * 2
    assert view.skipped["record bad_signature"] == 1
    assert view.skipped["model"] == 1
    assert c.peer_id not in view.servers


def test_rtt_is_a_moving_average_and_unknown_is_pessimistic():
    view = make_view()
    assert view.rtt_of("x") == DEFAULT_RTT
    view.observe_rtt("x", 0.010)
    assert view.rtt_of("x") == pytest.approx(0.010)
    view.observe_rtt("x", 0.020)
    assert 0.010 < view.rtt_of("x") < 0.020


def test_bans_double_up_to_a_bound_and_an_answer_lifts_them():
    clock = Clock()
    view = make_view(clock)
    lengths = [view.ban("x", "down") for _ in range(10)]
    assert lengths[:3] == [BAN_BASE, 2 * BAN_BASE, 4 * BAN_BASE]
    assert max(lengths) == BAN_MAX
    assert view.is_banned("x")
    clock.now += BAN_MAX + 1
    assert not view.is_banned("x")  # the ban is over; the next probe decides
    assert view.ban("x", "still down") == BAN_MAX  # failures in a row keep counting
    view.answered("x")
    assert not view.is_banned("x") and view.ban_reason("x") is None
    assert view.ban("x", "down again") == BAN_BASE


def test_route_prefers_the_nearer_replica():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 8)))
    view.merge_info("h:2", info("b", (0, 8)))
    view.observe_rtt("a", 0.060)
    view.observe_rtt("b", 0.001)
    assert [h.peer_id for h in plan_route(view, start=0, end=8)] == ["b"]
    for _ in range(12):  # the EMA forgets the slow samples
        view.observe_rtt("a", 0.0)
    assert [h.peer_id for h in plan_route(view, start=0, end=8)] == ["a"]


def test_route_avoids_a_server_whose_cache_is_full():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 8), throughput_decode=1000.0, cache_bytes_free=1000))
    view.merge_info("h:2", info("b", (0, 8)))
    view.observe_rtt("a", 0.001)
    view.observe_rtt("b", 0.001)
    assert [h.peer_id for h in plan_route(view, start=0, end=8)] == ["a"]
    hops = plan_route(view, start=0, end=8, session_tokens=64)
    assert [h.peer_id for h in hops] == ["b"]
    view.note_cache_full("b", 0)
    assert [h.peer_id for h in plan_route(view, start=0, end=8, session_tokens=64)] == ["a"]


def test_route_over_part_of_the_model_uses_sub_spans():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 5)))
    view.merge_info("h:2", info("b", (3, 8)))
    hops = plan_route(view, start=4, end=6)
    assert [(h.start, h.end) for h in hops] in ([(4, 5), (5, 6)], [(4, 6)])
    assert all(4 <= h.start < h.end <= 6 for h in hops)


def test_no_route_names_the_missing_blocks_and_why():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 3)))
    view.merge_info("h:2", info("b", (3, 8)))
    view.ban("b", "down")
    with pytest.raises(NoRouteError) as caught:
        plan_route(view, start=0, end=8)
    assert caught.value.details["missing_blocks"] == [[3, 8]]
    assert "[3, 8)" in str(caught.value)
    assert "banned" in str(caught.value)


def test_unmeasured_servers_cost_the_default_tau():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 4), throughput_decode=0.0, throughput_forward=0.0))
    view.merge_info("h:2", info("b", (0, 4), throughput_decode=50.0))
    by_peer = {v.peer_id: v for v in server_views(view.routable(), view, start=0, end=8)}
    assert by_peer["a"].tau_decode == DEFAULT_TAU
    assert by_peer["b"].tau_decode == pytest.approx(1 / 50 / 4)
    assert by_peer["b"].cache_bytes_per_token_block == 512


def test_bulk_time_counts_every_token_of_the_request():
    view = make_view()
    view.merge_info("h:1", info("a", (0, 4), throughput_forward=1000.0))
    (one,) = server_views(view.routable(), view, start=0, end=8)
    (many,) = server_views(view.routable(), view, start=0, end=8, tokens=256)
    assert one.tau_forward == pytest.approx(1 / 1000 / 4)
    assert many.tau_forward == pytest.approx(256 * one.tau_forward)
    assert many.tau_decode == one.tau_decode  # decode steps are one token each


def test_servers_nobody_describes_any_more_are_forgotten():
    clock = Clock()
    view = SwarmView(
        model_id=MODEL, num_blocks=8, kv_values_per_token_block=128, record_ttl=60, clock=clock
    )
    view.merge_info("h:1", info("a", (0, 8)))
    view.merge_info("h:2", info("b", (0, 8)))
    view.observe_rtt("b", 0.01)
    view.ban("b", "down")
    clock.now += 50
    view.merge_info("h:1", info("a", (0, 8)))  # a is described again, b is not
    assert view.forget_stale() == []
    clock.now += 20
    assert view.forget_stale() == ["b"]
    assert set(view.servers) == {"a"} and "b" not in view.rtt
    assert view.ban_reason("b") is None
