"""The client routes forwarded sessions with the servers' gossiped RTTs
(client/_routing.py translating into placement.Forwarding), without sockets.

The swarm of these tests: W holds the whole model, A and B half of it
each; all compute alike (1 ms for the 8 blocks). The client is 30 ms from
W and 20 ms from A and B, which are 1 ms from each other. Carrying every
hop itself, the client prefers W (31 ms against 41 ms); forwarded, A -> B
costs 10 + 0.5 + 10 + 1 = 21.5 ms per token (plus 1.5 ms for its three
messages) against W's 31 ms (plus 1 ms).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from libpipe.client import RetryPolicy, SwarmView
from libpipe.client._context import SwarmContext
from libpipe.client._failover import FailureLedger
from libpipe.client._routing import FORWARD_MESSAGE_OVERHEAD, forwarding_costs, plan_route
from libpipe.net import Identity
from libpipe.swarm import PEER_RTT_PREFIX, RecordState, ServerRecord, sign_record
from libpipe.wire import PROTOCOL_VERSION

MODEL = "tiny@0123"


def make_view() -> SwarmView:
    return SwarmView(model_id=MODEL, num_blocks=8, kv_values_per_token_block=128, clock=lambda: 0)


def info(peer: str, span: tuple[int, int], throughput: float) -> dict[str, Any]:
    return {
        "peer_id": peer,
        "model_id": MODEL,
        "protocol": PROTOCOL_VERSION,
        "span": list(span),
        "num_blocks": 8,
        "dtype": "float32",
        "state": "online",
        "max_length": 1024,
        "cache_bytes_free": 1 << 30,
        "cache_bytes_per_token": 512 * (span[1] - span[0]),
        "throughput_decode": throughput,
        "throughput_forward": 1000.0,
    }


def record_wire(
    identity: Identity, span: tuple[int, int], throughput: float, rtts: dict[str, float]
) -> list[bytes]:
    record = ServerRecord(
        peer_id=identity.peer_id,
        public_key=identity.public_key_bytes,
        addresses=(f"direct-{identity.peer_id[:6]}:1",),
        model_id=MODEL,
        span=span,
        dtype="float32",
        version="0.1.0",
        throughput_decode=throughput,
        throughput_forward=1000.0,
        free_cache_bytes=1 << 30,
        active_sessions=0,
        state=RecordState.ONLINE,
        incarnation=1,
        timestamp=time.time(),
        peer_rtt_us=tuple(
            sorted((p[:PEER_RTT_PREFIX], round(ms * 1000)) for p, ms in rtts.items())
        ),
    )
    return sign_record(record, identity).to_wire()


class Swarm:
    """W, A, B as above; the client reaches each at a proxy of its own."""

    def __init__(self, *, a_to_b: float | None = 1.0, b_to_a: float | None = 1.0) -> None:
        self.w, self.a, self.b = (Identity.generate() for _ in range(3))
        self.view = make_view()
        spans = {self.w: ((0, 8), 1000.0), self.a: ((0, 4), 2000.0), self.b: ((4, 8), 2000.0)}
        for who, (span, throughput) in spans.items():
            self.view.merge_info(f"proxy-{who.peer_id[:6]}:1", info(who.peer_id, span, throughput))
        self.records = {
            self.w: record_wire(self.w, (0, 8), 1000.0, {}),
            self.a: record_wire(self.a, (0, 4), 2000.0, self._figures(self.b, a_to_b)),
            self.b: record_wire(self.b, (4, 8), 2000.0, self._figures(self.a, b_to_a)),
        }
        assert self.view.merge_records(list(self.records.values())) == 3
        for who, rtt in ((self.w, 0.030), (self.a, 0.020), (self.b, 0.020)):
            self.view.observe_rtt(who.peer_id, rtt)

    def _figures(self, other: Identity, ms: float | None) -> dict[str, float]:
        """A's or B's round trips: W is 50 ms away, the other as given."""
        return {self.w.peer_id: 50.0} | ({} if ms is None else {other.peer_id: ms})

    def route(self, **kwargs: Any) -> list[tuple[str, int, int]]:
        return [
            (h.peer_id, h.start, h.end) for h in plan_route(self.view, start=0, end=8, **kwargs)
        ]


def test_forwarding_picks_the_near_pair_the_client_centric_route_passes_over():
    swarm = Swarm()
    w, a, b = swarm.w.peer_id, swarm.a.peer_id, swarm.b.peer_id
    assert swarm.route() == [(w, 0, 8)]
    assert swarm.route(forwarding=True) == [(a, 0, 4), (b, 4, 8)]


def test_the_predicted_per_token_time_is_the_forwarded_path():
    swarm = Swarm()
    entries = swarm.view.routable()
    forwarding = forwarding_costs(entries, swarm.view)
    # client -> A, A -> B, B -> client: three one-way trips and messages.
    peers = [swarm.a.peer_id, swarm.b.peer_id]
    expected = 0.010 + 0.0005 + 0.010 + 3 * FORWARD_MESSAGE_OVERHEAD
    assert forwarding.wire_time(peers) == pytest.approx(expected)


def test_an_unmeasured_pair_costs_what_the_client_would_pay_carrying_it():
    swarm = Swarm(a_to_b=None, b_to_a=None)
    assert swarm.route(forwarding=True) == swarm.route() == [(swarm.w.peer_id, 0, 8)]
    forwarding = forwarding_costs(swarm.view.routable(), swarm.view)
    assert forwarding.server_rtt(swarm.a.peer_id, swarm.b.peer_id) == pytest.approx(0.040)


@pytest.mark.parametrize(
    ("a_to_b", "b_to_a", "expected"),
    [(1.0, None, 0.001), (None, 3.0, 0.003), (1.0, 3.0, 0.002), (0.0, None, 0.0)],
)
def test_either_servers_figure_counts_and_both_are_averaged(a_to_b, b_to_a, expected):
    swarm = Swarm(a_to_b=a_to_b, b_to_a=b_to_a)
    forwarding = forwarding_costs(swarm.view.routable(), swarm.view)
    a, b = swarm.a.peer_id, swarm.b.peer_id
    assert forwarding.server_rtt(a, b) == pytest.approx(expected)
    assert forwarding.server_rtt(b, a) == pytest.approx(expected)


def test_pushes_go_where_the_peers_measured_the_server():
    swarm = Swarm()
    a = swarm.view.servers[swarm.a.peer_id]
    w = swarm.view.servers[swarm.w.peer_id]
    # The client reaches A at its proxy; A's peers reach it at its announced address.
    assert a.address.startswith("proxy-")
    assert a.push_address == a.announced[0] and a.announced[0].startswith("direct-")
    # W measured nobody (alone, or an older version): the client's address is all we know.
    assert w.push_address == w.address
    # A later info reply keeps what only the record says.
    swarm.view.merge_info(a.address, info(swarm.a.peer_id, (0, 4), 2000.0))
    again = swarm.view.servers[swarm.a.peer_id]
    assert again.push_address == a.announced[0]
    assert again.rtt_to(swarm.b.peer_id) == pytest.approx(0.001)


def test_a_figure_is_ignored_where_the_push_would_not_go_where_it_was_measured():
    """B known from its info reply alone: A's figure to B measured B's
    announced address, but a push to B goes to the client's address for it."""
    swarm = Swarm()
    view = make_view()
    view.merge_info("proxy-b:1", info(swarm.b.peer_id, (4, 8), 2000.0))
    view.merge_records([swarm.records[swarm.a], swarm.records[swarm.w]])
    for who, rtt in ((swarm.w, 0.030), (swarm.a, 0.020), (swarm.b, 0.020)):
        view.observe_rtt(who.peer_id, rtt)
    forwarding = forwarding_costs(view.routable(), view)
    assert forwarding.server_rtt(swarm.a.peer_id, swarm.b.peer_id) == pytest.approx(0.040)
    assert [h.peer_id for h in plan_route(view, start=0, end=8, forwarding=True)] == [
        swarm.w.peer_id
    ]


@pytest.mark.parametrize("forwarding", [True, False])
async def test_sessions_route_forwarded_only_when_the_client_forwards(forwarding):
    swarm = Swarm()
    ctx = SwarmContext(
        view=swarm.view,
        pool=None,  # type: ignore[arg-type]  # planning over a known view dials nobody
        peers=[],
        policy=RetryPolicy(),
        wire_dtype=torch.float16,
        num_blocks=8,
        hidden_size=64,
        forwarding=forwarding,
    )
    ledger = FailureLedger(ctx.policy, "test")
    hops = await ctx.plan(ledger, start=0, end=8, session_tokens=16)
    expected = [swarm.a.peer_id, swarm.b.peer_id] if forwarding else [swarm.w.peer_id]
    assert [h.peer_id for h in hops] == expected
    # Bulk routes spread load as before, forwarding or not: W computes at
    # the same rate as A and B and is one hop, the cheaper bulk route.
    bulk = await ctx.plan(ledger, start=0, end=8, objective="throughput")
    assert [h.peer_id for h in bulk] == [swarm.w.peer_id]


def test_a_near_free_server_hop_is_not_taken_for_noise():
    """W 0.2 ms from A and B, which measured 1 ms to each other: A -> W -> B
    saves 0.3 ms of trips over A -> B (noise, at these figures), and costs a
    message more, which outweighs it."""
    swarm = Swarm()
    view = make_view()
    figures = {
        swarm.w: {swarm.a.peer_id: 0.2, swarm.b.peer_id: 0.2},
        swarm.a: {swarm.b.peer_id: 1.0, swarm.w.peer_id: 0.2},
        swarm.b: {swarm.a.peer_id: 1.0, swarm.w.peer_id: 0.2},
    }
    spans = {swarm.w: ((0, 8), 1000.0), swarm.a: ((0, 4), 2000.0), swarm.b: ((4, 8), 2000.0)}
    view.merge_records([record_wire(who, *spans[who], figures[who]) for who in figures])
    for who, rtt in ((swarm.w, 0.040), (swarm.a, 0.020), (swarm.b, 0.020)):
        view.observe_rtt(who.peer_id, rtt)
    hops = plan_route(view, start=0, end=8, forwarding=True)
    assert [(h.peer_id, h.start, h.end) for h in hops] == [
        (swarm.a.peer_id, 0, 4),
        (swarm.b.peer_id, 4, 8),
    ]
