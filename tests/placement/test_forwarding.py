"""route(..., forwarding=...): the forwarded DP against brute force, and
each rule of the contract."""

from __future__ import annotations

import itertools
import math
import random
from unittest.mock import patch

import pytest
from hypothesis import given, settings, strategies as st

from libpipe.errors import ConfigError, NoRouteError
from libpipe.placement import Forwarding, Hop, ServerView, _forward, route


def view(peer, start, end, tau=0.01, rtt=0.05, **kw):
    return ServerView(peer, start, end, tau_decode=tau, tau_forward=tau, rtt=rtt, **kw)


def table(pairs, default=0.1):
    """A symmetric server_rtt from {(a, b): seconds}."""

    def rtt(a, b):
        return pairs.get((a, b), pairs.get((b, a), default))

    return rtt


def path_cost(hops, views, fwd):
    """The documented per-token time of a forwarded route, from scratch."""
    by_id = {v.peer_id: v for v in views}
    first, last = by_id[hops[0][0]], by_id[hops[-1][0]]
    cost = fwd.client_rtt.get(first.peer_id, first.rtt) / 2
    cost += fwd.client_rtt.get(last.peer_id, last.rtt) / 2
    cost += (len(hops) + 1) * fwd.message_overhead
    for (a, _, _), (b, _, _) in itertools.pairwise(hops):
        cost += fwd.server_rtt(a, b) / 2
    for peer, i, k in hops:
        cost += (k - i) * by_id[peer].tau_decode
    return cost


def brute_force(views, start, end, fwd):
    """(cheapest chain without revisits, cheapest chain that revisits a
    server) over every chain with consecutive hops on different servers."""
    best = {False: math.inf, True: math.inf}

    def walk(i, hops):
        if i == end:
            revisits = len({h[0] for h in hops}) < len(hops)
            best[revisits] = min(best[revisits], path_cost(hops, views, fwd))
            return
        for v in views:
            if v.start <= i < v.end and (not hops or hops[-1][0] != v.peer_id):
                for k in range(i + 1, min(v.end, end) + 1):
                    walk(k, [*hops, (v.peer_id, i, k)])

    walk(start, [])
    return best[False], best[True]


@st.composite
def instances(draw):
    num_blocks = draw(st.integers(1, 6))
    count = draw(st.integers(1, 5))
    views = []
    for n in range(count):
        s = draw(st.integers(0, num_blocks - 1))
        e = draw(st.integers(s + 1, num_blocks))
        tau = draw(st.sampled_from([0.001, 0.003, 0.01, 0.03]))
        rtt = draw(st.sampled_from([0.005, 0.05, 0.2]))
        views.append(view(f"s{n}", s, e, tau=tau, rtt=rtt))
    # A full cover guarantees a route exists.
    views.append(view("z", 0, num_blocks, tau=0.05, rtt=0.3))
    pairs = {}
    ids = [v.peer_id for v in views]
    for a in ids:
        for b in ids:
            if a < b:
                pairs[(a, b)] = draw(st.sampled_from([0.001, 0.01, 0.1, 0.4]))
    overhead = draw(st.sampled_from([0.0, 0.05]))
    start = draw(st.integers(0, num_blocks - 1))
    end = draw(st.integers(start + 1, num_blocks))
    return views, num_blocks, start, end, Forwarding(table(pairs), {}, overhead)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_forwarded_route_is_the_cheapest_chain(case):
    views, num_blocks, start, end, fwd = case
    found = route(views, num_blocks, start=start, end=end, forwarding=fwd)
    assert found.hops[0].start == start and found.hops[-1].end == end
    for a, b in zip(found.hops, found.hops[1:], strict=False):
        assert a.end == b.start and a.peer_id != b.peer_id
    hops = [(h.peer_id, h.start, h.end) for h in found.hops]
    assert found.cost == pytest.approx(path_cost(hops, views, fwd))
    plain, revisiting = brute_force(views, start, end, fwd)
    if plain <= revisiting:
        assert found.cost == pytest.approx(plain)
    else:  # the DP found a revisit and merged it: still a valid route
        assert found.cost >= revisiting - 1e-12
    # The vector hand-over (large boundaries) finds the same route.
    with patch.object(_forward, "VECTOR_PAIRS", 0):
        vector = route(views, num_blocks, start=start, end=end, forwarding=fwd)
    assert vector == found


def test_forwarding_prefers_servers_close_to_each_other():
    # Client-centric, the two near-client servers win; forwarded, the far
    # pair 1 ms apart costs one long trip in and out instead of four.
    views = [
        view("near1", 0, 2, rtt=0.02),
        view("near2", 2, 4, rtt=0.02),
        view("far1", 0, 2, rtt=0.2),
        view("far2", 2, 4, rtt=0.2),
    ]
    pairs = {("near1", "near2"): 0.4, ("far1", "far2"): 0.001}
    fwd = Forwarding(table(pairs, default=0.4))
    assert [h.peer_id for h in route(views, 4).hops] == ["near1", "near2"]
    forwarded = route(views, 4, forwarding=fwd)
    assert [h.peer_id for h in forwarded.hops] == ["far1", "far2"]
    assert forwarded.cost == pytest.approx(0.1 + 0.0005 + 0.1 + 4 * 0.01)


def test_client_rtt_overrides_the_view_and_overhead_is_per_message():
    views = [view("a", 0, 2, rtt=0.3), view("b", 2, 4, rtt=0.3)]
    fwd = Forwarding(table({("a", "b"): 0.01}), {"a": 0.02, "b": 0.04}, message_overhead=0.05)
    found = route(views, 4, forwarding=fwd)
    # in 0.01 + across 0.005 + out 0.02, three messages, four blocks
    assert found.cost == pytest.approx(0.01 + 0.005 + 0.02 + 3 * 0.05 + 4 * 0.01)


def test_one_hop_pays_the_client_round_trip():
    views = [view("a", 0, 4, rtt=0.1)]
    fwd = Forwarding(table({}), message_overhead=0.05)
    assert route(views, 4, forwarding=fwd).cost == pytest.approx(0.1 + 2 * 0.05 + 0.04)
    assert route(views, 4).cost == pytest.approx(0.1 + 0.04)


def test_forwarding_avoids_a_server_short_of_cache():
    tight = view("tight", 0, 4, tau=0.001, free_cache_bytes=0, cache_bytes_per_token_block=10)
    roomy = view("roomy", 0, 4, tau=0.01)
    fwd = Forwarding(table({}))
    found = route([tight, roomy], 4, session_tokens=100, forwarding=fwd)
    assert found.hops == (Hop("roomy", 0, 4),)


def test_forwarding_ties_go_to_the_smaller_peer_id_without_rng():
    views = [view("b", 0, 4), view("a", 0, 4)]
    found = route(views, 4, forwarding=Forwarding(table({})))
    assert found.hops == (Hop("a", 0, 4),)


def test_forwarding_with_rng_spreads_ties():
    views = [view("b", 0, 4), view("a", 0, 4)]
    rng = random.Random(1)
    picked = {
        route(views, 4, rng=rng, forwarding=Forwarding(table({}))).hops[0].peer_id
        for _ in range(40)
    }
    assert picked == {"a", "b"}


def test_forwarding_without_cover_names_the_missing_blocks():
    with pytest.raises(NoRouteError) as info:
        route([view("a", 0, 2)], 4, forwarding=Forwarding(table({})))
    assert info.value.details["missing_blocks"] == [[2, 4]]


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf, "x", None])
def test_a_bad_server_rtt_is_a_config_error(bad):
    views = [view("a", 0, 2), view("b", 2, 4)]
    with pytest.raises(ConfigError, match="server_rtt"):
        route(views, 4, forwarding=Forwarding(lambda a, b: bad))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"server_rtt": 3}, "callable"),
        ({"server_rtt": table({}), "client_rtt": [1]}, "client_rtt"),
        ({"server_rtt": table({}), "client_rtt": {"a": -1}}, "client_rtt"),
        ({"server_rtt": table({}), "message_overhead": math.nan}, "message_overhead"),
    ],
)
def test_bad_forwarding_fields_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Forwarding(**kwargs)


def test_forwarding_must_be_a_forwarding():
    with pytest.raises(ConfigError, match="Forwarding"):
        route([view("a", 0, 4)], 4, forwarding={"rtt": 1})  # type: ignore[arg-type]


def test_server_rtt_is_asked_once_per_pair():
    asked = []

    def rtt(a, b):
        asked.append((a, b))
        return 0.01

    views = [view(f"s{n}", 0, 8) for n in range(4)]
    fwd = Forwarding(rtt)
    route(views, 8, forwarding=fwd)
    route(views, 8, forwarding=fwd)
    assert len(asked) == len(set(asked)) == 4 * 3  # every ordered pair, once, none with itself


def test_server_rtt_is_asked_about_sites():
    asked = []

    def rtt(a, b):
        asked.append((a, b))
        return 0.002 if a == b else 0.2

    views = [view("a1", 0, 2), view("a2", 2, 4), view("b1", 0, 2), view("b2", 2, 4)]
    site = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    found = route(
        views,
        4,
        forwarding=Forwarding(rtt, {"a1": 0.1, "a2": 0.1, "b1": 0.3, "b2": 0.3}, site=site),
    )
    assert {h.peer_id for h in found.hops} == {"a1", "a2"}
    assert set(asked) <= {("A", "A"), ("A", "B"), ("B", "A"), ("B", "B")}
    assert len(asked) == len(set(asked))
    assert found.cost == pytest.approx(0.05 + 0.001 + 0.05 + 0.04)


def test_a_bad_site_map_is_a_config_error():
    with pytest.raises(ConfigError, match="site"):
        Forwarding(table({}), site={"a": 3})


def test_a_problem_forwards_between_its_servers_locations(problem):
    # Clients in K, a and b in A (5 ms apart), 100 ms between clusters and
    # 100 ms per hop, half of it per message.
    fwd = problem.forwarding("K")
    views = problem.views({"a": (0, 3), "b": (3, 6)}, "K")
    found = route(views, 6, forwarding=fwd)
    assert found.cost == pytest.approx(0.05 + 0.0025 + 0.05 + 3 * 0.05 + 6 * 0.003)
    # The client-centric cost of the same hops: two round trips plus two overheads.
    assert route(views, 6).cost == pytest.approx(2 * (0.1 + 0.1) + 6 * 0.003)


def test_wire_time_of_a_chain():
    fwd = Forwarding(table({("a", "b"): 0.01}), {"a": 0.1, "b": 0.2}, message_overhead=0.05)
    assert fwd.wire_time(["a", "b"]) == pytest.approx(0.05 + 0.005 + 0.1 + 3 * 0.05)
    assert fwd.wire_time(["a"], message_overhead=0.0) == pytest.approx(0.1)
    assert fwd.wire_time([]) == 0.0


def test_wire_time_needs_every_end_in_client_rtt():
    fwd = Forwarding(table({}), {"a": 0.1})
    with pytest.raises(ConfigError, match="no client RTT for b"):
        fwd.wire_time(["a", "b"])
    with pytest.raises(ConfigError, match="message_overhead"):
        fwd.wire_time(["a"], message_overhead=-1.0)
