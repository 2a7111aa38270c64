"""route(): the DP against brute force, and each rule of the contract."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from libpipe.errors import ConfigError, NoRouteError
from libpipe.placement import UNSCHEDULED_WAIT_S, Hop, ServerView, route


def view(peer, start, end, tau=0.01, rtt=0.05, **kw):
    return ServerView(
        peer, start, end, tau_decode=tau, tau_forward=kw.pop("fwd", tau), rtt=rtt, **kw
    )


# --- brute force -----------------------------------------------------------------


def edge_cost(v, n, objective, tokens, load):
    if objective == "latency":
        rate = v.tau_decode
    else:
        rate = v.tau_forward * (1 + load.get(v.peer_id, 0.0))
    cost = v.rtt + n * rate
    need = tokens * v.cache_bytes_per_token_block * n
    if need and v.free_cache_bytes < need:
        free, wait = v.free_cache_bytes, None
        for at, freed in sorted(v.cache_release):
            free += freed
            if free >= need:
                wait = at
                break
        if wait is None:
            wait = max([UNSCHEDULED_WAIT_S] + [at for at, _ in v.cache_release])
        cost += wait / tokens
    return cost


def brute_force(views, start, end, objective="latency", tokens=0, load=None):
    """(cheapest chain without revisits, cheapest chain that revisits a server),
    over every chain of (sub-span) hops with consecutive hops on different
    servers, by enumeration."""
    load = load or {}
    best = {False: math.inf, True: math.inf}

    def walk(i, cost, used, last):
        if i == end:
            revisits = len(set(used)) < len(used)
            best[revisits] = min(best[revisits], cost)
            return
        for v in views:
            if v.start <= i < v.end and v.peer_id != last:
                for k in range(i + 1, min(v.end, end) + 1):
                    step = edge_cost(v, k - i, objective, tokens, load)
                    walk(k, cost + step, [*used, v.peer_id], v.peer_id)

    walk(start, 0.0, [], None)
    return best[False], best[True]


def check_chain(r, start, end, views):
    spans = {v.peer_id: (v.start, v.end) for v in views}
    assert len({h.peer_id for h in r.hops}) == len(r.hops)  # no server twice
    at = start
    for hop in r.hops:
        assert hop.start == at and hop.end > hop.start
        s, e = spans[hop.peer_id]
        assert s <= hop.start and hop.end <= e
        at = hop.end
    assert at == end


releases = st.lists(
    st.tuples(st.floats(0, 50, allow_nan=False), st.integers(0, 400)), max_size=3
).map(tuple)


@st.composite
def instances(draw):
    num_blocks = draw(st.integers(1, 5))
    n = draw(st.integers(1, 5))
    views = []
    for j in range(n):
        a = draw(st.integers(0, num_blocks - 1))
        b = draw(st.integers(a, num_blocks))
        views.append(
            ServerView(
                peer_id=f"p{j}",
                start=a,
                end=b,
                tau_decode=draw(st.floats(0, 1, allow_nan=False)),
                tau_forward=draw(st.floats(0, 1, allow_nan=False)),
                rtt=draw(st.floats(0, 1, allow_nan=False)),
                free_cache_bytes=draw(st.integers(0, 600)),
                cache_bytes_per_token_block=draw(st.integers(0, 3)),
                cache_release=draw(releases),
            )
        )
    start = draw(st.integers(0, num_blocks))
    end = draw(st.integers(start, num_blocks))
    return num_blocks, views, start, end


@settings(max_examples=200, deadline=None)
@given(
    instances(),
    st.sampled_from(["latency", "throughput"]),
    st.integers(0, 40),
    st.dictionaries(st.sampled_from(["p0", "p1", "p2"]), st.floats(0, 5, allow_nan=False)),
)
def test_matches_brute_force(instance, objective, tokens, load):
    num_blocks, views, start, end = instance
    best, best_revisiting = brute_force(views, start, end, objective, tokens, load)
    if best == math.inf:
        with pytest.raises(NoRouteError):
            route(
                views,
                num_blocks,
                start=start,
                end=end,
                session_tokens=tokens,
                objective=objective,
                load=load,
            )
        return
    r = route(
        views,
        num_blocks,
        start=start,
        end=end,
        session_tokens=tokens,
        objective=objective,
        load=load,
    )
    check_chain(r, start, end, views)
    # Optimal whenever no chain that revisits a server is as cheap (such a
    # chain is merged into a valid one, which may cost more).
    if best_revisiting > best + 1e-9:
        assert r.cost == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert r.cost >= best - 1e-9
    by_id = {v.peer_id: v for v in views}
    assert r.cost == pytest.approx(
        sum(edge_cost(by_id[h.peer_id], h.end - h.start, objective, tokens, load) for h in r.hops),
        rel=1e-12,
        abs=1e-12,
    )


# --- the rules one by one ----------------------------------------------------------


def test_never_visits_a_server_twice():
    # slow holds everything; fast is much quicker on the middle blocks, but a
    # route slow -> fast -> slow would need two sessions on slow.
    views = [view("slow", 0, 6, tau=0.1, rtt=0.01), view("fast", 2, 4, tau=0.0, rtt=0.01)]
    r = route(views, 6)
    assert r.hops == (Hop("slow", 0, 6),)
    assert r.cost == pytest.approx(0.01 + 6 * 0.1)


def test_uses_part_of_a_span():
    # a is fast on the first half and near nothing beats b on the second.
    views = [view("a", 0, 8, tau=0.01, rtt=0.02), view("b", 4, 8, tau=0.001, rtt=0.01)]
    r = route(views, 8)
    assert r.hops == (Hop("a", 0, 4), Hop("b", 4, 8))
    assert r.cost == pytest.approx(0.02 + 4 * 0.01 + 0.01 + 4 * 0.001)


def test_a_long_span_beats_two_hops_when_rtt_dominates():
    views = [view("a", 0, 8, tau=0.01, rtt=0.1), view("b", 4, 8, tau=0.0, rtt=0.1)]
    assert route(views, 8).hops == (Hop("a", 0, 8),)


def test_per_token_cost_formula():
    views = [view("a", 0, 3, tau=0.2, rtt=0.5), view("b", 3, 5, tau=0.1, rtt=0.25)]
    # sum over hops of rtt + k * tau
    assert route(views, 5).cost == pytest.approx((0.5 + 3 * 0.2) + (0.25 + 2 * 0.1))


def test_waiting_penalty_steers_sessions_off_a_full_server():
    full = view(
        "fast", 0, 4, tau=0.001, rtt=0.01, free_cache_bytes=0, cache_bytes_per_token_block=2
    )
    slow = view("slow", 0, 4, tau=0.01, rtt=0.01, cache_bytes_per_token_block=2)
    assert route([full, slow], 4).hops == (Hop("fast", 0, 4),)  # no session: no cache needed
    r = route([full, slow], 4, session_tokens=100)
    assert r.hops == (Hop("slow", 0, 4),)


def test_waiting_penalty_uses_the_release_schedule():
    # 100 tokens x 2 bytes x 4 blocks = 800 bytes; 300 free, +200 at 1 s, +400 at 3 s.
    v = view(
        "a",
        0,
        4,
        tau=0.01,
        rtt=0.02,
        free_cache_bytes=300,
        cache_bytes_per_token_block=2,
        cache_release=((3.0, 400), (1.0, 200)),
    )
    r = route([v], 4, session_tokens=100)
    assert r.cost == pytest.approx(0.02 + 4 * 0.01 + 3.0 / 100)
    # batch 2 doubles the need (1600 bytes): never met by the schedule.
    r = route([v], 4, session_tokens=100, batch=2)
    assert r.cost == pytest.approx(0.02 + 4 * 0.01 + UNSCHEDULED_WAIT_S / 100)


def test_waiting_penalty_can_split_a_span():
    # a can hold the session on 2 of its 4 blocks without waiting; b takes the rest.
    a = view("a", 0, 4, tau=0.001, rtt=0.01, free_cache_bytes=400, cache_bytes_per_token_block=2)
    b = view("b", 2, 4, tau=0.01, rtt=0.01)
    r = route([a, b], 4, session_tokens=100)
    assert r.hops == (Hop("a", 0, 2), Hop("b", 2, 4))


def test_no_route_names_every_missing_range():
    views = [view("a", 1, 3), view("b", 2, 4), view("c", 6, 7)]
    with pytest.raises(NoRouteError) as info:
        route(views, 10)
    assert info.value.details["missing_blocks"] == [[0, 1], [4, 6], [7, 10]]
    assert "[0, 1), [4, 6), [7, 10)" in str(info.value)


def test_no_route_only_counts_the_asked_range():
    with pytest.raises(NoRouteError) as info:
        route([view("a", 0, 3)], 10, start=2, end=5)
    assert info.value.details["missing_blocks"] == [[3, 5]]


def test_empty_and_sub_range_routes():
    views = [view("a", 0, 4), view("b", 4, 8)]
    assert route(views, 8, start=8).hops == ()
    assert route(views, 8, start=2, end=6).hops == (Hop("a", 2, 4), Hop("b", 4, 6))
    assert route([], 8, start=3, end=3).cost == 0.0


def test_ties_go_to_the_smaller_peer_id_whatever_the_order():
    twins = [view(p, 0, 6) for p in ("m", "c", "x", "a2")]
    for seed in range(5):
        shuffled = twins[:]
        random.Random(seed).shuffle(shuffled)
        assert route(shuffled, 6).hops == (Hop("a2", 0, 6),)


def test_ties_are_random_with_an_rng():
    twins = [view(p, 0, 6) for p in ("a", "b", "c")]
    rng = random.Random(1)
    chosen = Counter(route(twins, 6, rng=rng).hops[0].peer_id for _ in range(300))
    assert set(chosen) == {"a", "b", "c"}


def test_throughput_routing_spreads_in_proportion_to_throughput():
    # "fast" has three times the throughput of "slow" on the same span.
    replicas = [view("slow", 0, 4, fwd=0.03, rtt=0.0), view("fast", 0, 4, fwd=0.01, rtt=0.0)]
    rng = random.Random(7)
    n = 4000
    picks = Counter(
        route(replicas, 4, objective="throughput", rng=rng).hops[0].peer_id for _ in range(n)
    )
    assert picks["fast"] / n == pytest.approx(0.75, abs=0.03)


def test_throughput_routing_avoids_a_loaded_server():
    replicas = [view("busy", 0, 4, fwd=0.01), view("idle", 0, 4, fwd=0.02)]
    assert route(replicas, 4, objective="throughput").hops[0].peer_id == "busy"
    r = route(replicas, 4, objective="throughput", load={"busy": 3.0})
    assert r.hops[0].peer_id == "idle"
    assert r.cost == pytest.approx(0.05 + 4 * 0.02)


def test_throughput_cost_is_reported_without_the_random_factor():
    v = view("a", 0, 4, fwd=0.01, rtt=0.0)
    r = route([v], 4, objective="throughput", rng=random.Random(3), load={"a": 1.0})
    assert r.cost == pytest.approx(4 * 0.01 * 2)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": -1},
        {"start": 5, "end": 4},
        {"end": 9},
        {"session_tokens": -1},
        {"batch": 0},
        {"objective": "fastest"},
        {"load": {"a": -1.0}},
        {"load": {"a": math.nan}},
        {"load": {"a": True}},
        {"batch": True},
        {"cache_penalty": "pray"},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        route([view("a", 0, 8)], 8, **kwargs)


@pytest.mark.parametrize("num_blocks", [0, -3, 2.5, True])
def test_bad_num_blocks(num_blocks):
    with pytest.raises(ConfigError):
        route([view("a", 0, 2)], num_blocks)


def test_duplicate_peer_and_span_beyond_the_model():
    with pytest.raises(ConfigError, match="twice"):
        route([view("a", 0, 2), view("a", 2, 4)], 4)
    with pytest.raises(ConfigError, match="beyond"):
        route([view("a", 0, 6)], 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"peer_id": ""},
        {"start": 3, "end": 2},
        {"start": -1},
        {"tau_decode": -0.1},
        {"tau_forward": math.inf},
        {"rtt": math.nan},
        {"free_cache_bytes": -1},
        {"cache_bytes_per_token_block": 1.5},
        {"cache_release": ((1.0, -5),)},
        {"cache_release": ((-1.0, 5),)},
    ],
)
def test_bad_server_views(kwargs):
    base = {"peer_id": "a", "start": 0, "end": 2, "tau_decode": 0.1, "tau_forward": 0.1}
    with pytest.raises(ConfigError):
        ServerView(**{**base, **kwargs})
