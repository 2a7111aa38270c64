"""The placement algorithms: each rule on hand-checked instances, the
registry, the steady-state objective, and libpipe against CG-BP and the MILP."""

from __future__ import annotations

import dataclasses
import random

import pytest

from libpipe.errors import ConfigError, NoRouteError
from libpipe.placement import (
    ALGORITHMS,
    Hop,
    ServerSpec,
    ServerView,
    design_sessions,
    evaluate,
    get_algorithm,
    place_cg_bp,
    place_libpipe,
    place_petals,
    predict,
    solve_milp,
    uncovered_ranges,
)
from libpipe.placement._cgbp import largest_covering_r
from libpipe.placement._predict import OVERLOAD_S_PER_TOKEN, erlang_c
from libpipe.placement._route import PETALS_ALLOC_DELAY_S
from libpipe.placement._windows import most_under_served_window, weakest_window

from .conftest import GB, tiny_problem


def test_registry():
    assert set(ALGORITHMS) == {"petals", "cg-bp", "libpipe", "libpipe-direct", "milp"}
    assert get_algorithm("cg-bp").name == "cg-bp"
    with pytest.raises(ConfigError, match=r"unknown placement algorithm 'magic'.*cg-bp"):
        get_algorithm("magic")


# --- window rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_block", "blocks", "start"),
    [
        ([0, 0, 0, 0], 2, 0),  # all equal: leftmost
        ([5, 5, 0, 0, 5], 2, 2),  # the two empty blocks
        # windows, sorted: (1, 3) (1, 2) (1, 2) (1, 3): the first (1, 2) is at 1
        ([3, 1, 2, 1, 3], 2, 1),
    ],
)
def test_weakest_window(per_block, blocks, start):
    assert weakest_window(per_block, blocks) == start


def test_most_under_served_window():
    # demand 4: shortfall per block (4, 4, 0, 2, 0); the 2-block windows' shortfalls
    # are 8, 4, 2, 2: the first one wins.
    assert most_under_served_window([0, 0, 4, 2, 4], 4, 2) == 0
    # Everything served: the least capacity, then leftmost.
    assert most_under_served_window([5, 4, 4, 6], 3, 2) == 1
    # A window longer than the model is the whole model.
    assert most_under_served_window([1, 1], 3, 5) == 0


# --- the baselines on hand-checked instances -------------------------------------


def test_petals_rule(problem):
    # PETALS reserves 2 * 1024 * 4096 * 2 = 16.8 MB a block: a and b take all 6
    # blocks; each small server takes 2 blocks of the weakest window (blocks
    # held by a and b have the same throughput, so the leftmost free-est window).
    placement = place_petals(problem)
    assert placement["a"] == (0, 6)
    assert placement["b"] == (0, 6)
    assert [placement[f"m{i}"] for i in range(3)] == [(0, 2), (2, 4), (4, 6)]


def test_petals_follows_join_order(problem):
    reordered = dataclasses.replace(problem, servers=tuple(reversed(problem.servers)))
    placement = place_petals(reordered)
    # The small servers now come first and tile the model; a and b follow.
    assert [placement[f"m{i}"] for i in (2, 1, 0)] == [(0, 2), (2, 4), (4, 6)]


def test_cg_bp_rule(problem):
    # R = 7 sessions of s_c = 148 MB: a fast server fits floor(8 / 2.036) = 3 blocks,
    # a small one floor(3 / 2.036) = 1. Fastest first: a [0, 3), b [3, 6); then
    # the small servers add redundancy on the least-served blocks, leftmost first.
    assert design_sessions(problem) == 7
    placement = place_cg_bp(problem)
    assert placement["a"] == (0, 3)
    assert placement["b"] == (3, 6)
    assert [placement[f"m{i}"] for i in range(3)] == [(0, 1), (1, 2), (2, 3)]


def test_cg_bp_design_concurrency_is_a_parameter(problem):
    placement = place_cg_bp(problem, design_concurrency=1)
    # floor(8 / 1.148) = 6 blocks each
    assert placement["a"] == (0, 6)


def test_uncovered_model_is_a_no_route_error():
    small = tiny_problem(fast_memory=3 * GB // 2, slow=0)  # each fast server holds 1 block of 6
    with pytest.raises(NoRouteError) as info:
        get_algorithm("petals").place(small)
    assert info.value.details["missing_blocks"] == [[2, 6]]


# --- routing policies ---------------------------------------------------------------


def test_petals_router_charges_a_flat_delay_and_ws_rr_the_wait():
    # "fast" is full now but frees its cache in 1 s; "slow" costs 8 s more per token.
    full = ServerView(
        "fast",
        0,
        4,
        0.001,
        0.001,
        rtt=0.01,
        free_cache_bytes=0,
        cache_bytes_per_token_block=1,
        cache_release=((1.0, 10**6),),
    )
    slow = ServerView("slow", 0, 4, 2.0, 2.0, rtt=0.01, cache_bytes_per_token_block=1)
    petals = get_algorithm("petals").route([full, slow], 4, session_tokens=100)
    ws_rr = get_algorithm("cg-bp").route([full, slow], 4, session_tokens=100)
    assert petals.hops == (Hop("slow", 0, 4),)  # 8 s < PETALS' 10 s delay
    assert ws_rr.hops == (Hop("fast", 0, 4),)  # waiting 1 s over 100 tokens is cheap
    assert ws_rr.cost == pytest.approx(0.01 + 0.004 + 1.0 / 100)


def test_petals_cache_check_is_pessimistic_about_the_span():
    # Room for the session on 4 of the 8 blocks: enough for blocks [0, 4), but
    # PETALS checks the whole span and charges its delay anyway.
    half = ServerView(
        "half", 0, 8, 0.001, 0.001, rtt=0.01, free_cache_bytes=400, cache_bytes_per_token_block=1
    )
    petals = get_algorithm("petals").route([half], 8, end=4, session_tokens=100)
    ws_rr = get_algorithm("libpipe").route([half], 8, end=4, session_tokens=100)
    assert petals.cost == pytest.approx(0.01 + 0.004 + PETALS_ALLOC_DELAY_S)
    assert ws_rr.cost == pytest.approx(0.01 + 0.004)


# --- the steady-state objective -------------------------------------------------------


def test_evaluate_by_hand(problem):
    # One server with all 6 blocks: 2 GB of cache = 2 sessions of 6 x 148 MB;
    # the third waits. Per-token: 0.2 + 6 * 0.003 = 0.218, plus for the waiting
    # one UNSCHEDULED_WAIT_S / 148 tokens.
    placement = {"a": (0, 6)}
    result = evaluate(problem, placement, sessions=3)
    assert result.waiting == 1
    assert result.token_time == pytest.approx((3 * 0.218 + 30.0 / 148) / 3)


def test_evaluate_splits_sessions_over_client_locations(problem):
    workload = dataclasses.replace(problem.workload, clients=(("K", 1.0), ("A", 1.0)))
    two = dataclasses.replace(problem, workload=workload)
    result = evaluate(two, {"a": (0, 6), "b": (0, 6)}, sessions=2)
    # One session from K (hop 0.2) and one from A (hop 0.005 + 0.1).
    assert result.token_time == pytest.approx(((0.2 + 0.018) + (0.105 + 0.018)) / 2)


def test_evaluate_uncovered_placement():
    with pytest.raises(NoRouteError) as info:
        evaluate(tiny_problem(), {"a": (0, 3)}, sessions=1)
    assert info.value.details["missing_blocks"] == [[3, 6]]


# --- libpipe against the baselines and the optimum ------------------------------------


def test_libpipe_beats_conservative_cg_bp(problem):
    # CG-BP makes each fast server reserve cache for all 7 sessions and so splits
    # the model in two hops; sharing the sessions between replicas fits it in one.
    sessions = design_sessions(problem)
    cg_bp = evaluate(problem, place_cg_bp(problem), sessions).token_time
    ours = evaluate(problem, place_libpipe(problem), sessions).token_time
    assert ours <= 0.9 * cg_bp


def random_problem(seed: int, *, light: bool = False):
    """A random tiny problem; ``light``: a load whose cache never binds."""
    rng = random.Random(seed)
    base = tiny_problem(
        fast_memory=rng.choice([4, 5, 7, 9]) * GB,
        kv_bytes=10**4 if light else rng.choice([10**5, 5 * 10**5, 10**6]),
        arrival_rate=0.02 if light else rng.choice([0.05, 0.1, 0.3]),
        slow=rng.randint(2, 4),
        num_blocks=rng.randint(4, 6),
    )
    servers = tuple(
        dataclasses.replace(s, location=rng.choice(["A", "B", "K"])) for s in base.servers
    )
    return dataclasses.replace(base, servers=servers)


@pytest.mark.parametrize("seed", range(8))
def test_libpipe_never_worse_than_cg_bp_by_its_prediction(seed):
    problem = random_problem(seed)
    cg_bp = predict(problem, get_algorithm("cg-bp").place(problem)).token_time
    direct = predict(problem, get_algorithm("libpipe-direct").place(problem)).token_time
    assert direct <= cg_bp * (1 + 1e-9)
    # With forwarding (RTTs obey the triangle inequality here, so a forwarded
    # chain never costs more than the same chain called from the client).
    placed = get_algorithm("libpipe").place(problem)
    assert predict(problem, placed, forwarding=True).token_time <= cg_bp * (1 + 1e-9)


@pytest.mark.parametrize("seed", [0, 3, 5, 6])
def test_libpipe_within_ten_percent_of_the_milp_optimum(seed):
    # Under a light load the cache never binds and both objectives (the MILP's
    # fixed count of sessions, libpipe's queueing prediction) are the routes'
    # per-token time: the comparison is of where the blocks went.
    problem = random_problem(seed, light=True)
    sessions = design_sessions(problem)
    optimum = solve_milp(problem, sessions, time_limit=20)
    assert optimum.optimal
    # The MILP models the client-centric path: compare ours without forwarding.
    ours = evaluate(problem, get_algorithm("libpipe-direct").place(problem), sessions).token_time
    # The MILP's optimum is a lower bound for every placement under this objective.
    assert optimum.token_time <= ours * (1 + 1e-9)
    assert ours <= 1.10 * optimum.token_time


def test_milp_matches_evaluate_on_its_own_placement(problem):
    solution = solve_milp(problem, 3)
    assert solution.optimal
    assert solution.bound == pytest.approx(solution.token_time)
    # Routing its placement greedily cannot beat the joint optimum.
    assert evaluate(problem, solution.placement, 3).token_time >= solution.token_time - 1e-9


def test_milp_refuses_large_instances():
    big = tiny_problem(slow=40, num_blocks=80)
    with pytest.raises(ConfigError, match="small instances") as info:
        solve_milp(big, 2)
    # Spans: 2 fast servers x (80 + 79 + ... + 73) + 40 slow x (80 + 79);
    # an x per span, a y and a z per span for the one client location.
    assert info.value.details["variables"] == (2 * 612 + 40 * 159) * 3


def test_milp_infeasible_instance():
    small = tiny_problem(fast_memory=GB, slow=0)
    with pytest.raises(ConfigError, match="no feasible placement"):
        solve_milp(small, 1)


def test_algorithms_keep_server_order_and_fill_unplaced(problem):
    for name in ("petals", "cg-bp", "libpipe"):
        placement = get_algorithm(name).place(problem)
        assert list(placement) == [s.name for s in problem.servers]


def test_libpipe_places_big_instances_with_the_greedy_pass():
    problem = tiny_problem(slow=3)
    many = tuple(
        ServerSpec(f"s{i}", 3 * GB, 0.016, 0.0001, 0.2, "B", max_blocks=2) for i in range(4000)
    )
    big = dataclasses.replace(problem, servers=problem.servers + many)
    placement = get_algorithm("libpipe").place(big)
    assert placement["a"][1] - placement["a"][0] > 0


def test_cg_bp_caps_r_where_coverage_ends():
    busy = tiny_problem(arrival_rate=3.0)
    r = largest_covering_r(busy)
    assert r < design_sessions(busy)
    assert not uncovered_ranges(place_cg_bp(busy, r).values(), 0, 6)
    assert uncovered_ranges(place_cg_bp(busy, r + 1).values(), 0, 6)
    assert get_algorithm("cg-bp").place(busy) == place_cg_bp(busy, r)


# --- the queueing prediction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("servers", "load", "expected"),
    # M/M/1: P(wait) = rho; M/M/2 at A = 1: B = 0.2, C = 2 * 0.2 / (2 - 0.8) = 1/3
    [(1, 0.5, 0.5), (2, 1.0, 1 / 3), (5, 0.0, 0.0)],
)
def test_erlang_c(servers, load, expected):
    assert erlang_c(servers, load) == pytest.approx(expected)


def test_predict_by_hand():
    # a alone holds all 6 blocks: 2 GB of cache, 888 MB a session: 2 slots at
    # 0.2 + 6 * 0.003 = 0.218 s per token. lambda 0.02: A = 0.02 * 128 * 0.218.
    light = tiny_problem(arrival_rate=0.02)
    result = predict(light, {"a": (0, 6)})
    load = 0.02 * 128 * 0.218
    assert result.slots == 2
    assert result.load == pytest.approx(load)
    wait = erlang_c(2, load) * 128 * 0.218 / (2 - load)
    assert result.wait == pytest.approx(wait)
    assert result.token_time == pytest.approx(0.218 + wait / 128)


def test_predict_ranks_overload_behind_any_stable_placement():
    busy = tiny_problem(arrival_rate=0.1)
    # 2 slots serve 2 / (128 * 0.218) = 0.0717 sessions/s < 0.1 offered.
    alone = predict(busy, {"a": (0, 6)})
    assert alone.overload == pytest.approx(0.1 / (2 / (128 * 0.218)))
    assert alone.token_time > OVERLOAD_S_PER_TOKEN
    both = predict(busy, {"a": (0, 6), "b": (0, 6)})
    assert both.overload < alone.overload


def test_predict_uncovered_placement():
    with pytest.raises(NoRouteError) as info:
        predict(tiny_problem(), {"a": (0, 3)})
    assert info.value.details["missing_blocks"] == [[3, 6]]


def test_forwarding_beats_cg_bp_where_routes_need_two_hops():
    # The fast pair holds at most 4 of 6 blocks each: every route has two
    # hops. Client-centric: 2 x (100 ms RTT + 100 ms overhead) + 6 x 3 ms;
    # forwarded: 50 + 2.5 + 50 ms and three half-overheads + 6 x 3 ms.
    # A light load: the cache never binds, so the times are the routes'.
    problem = tiny_problem(fast_memory=4 * GB, kv_bytes=10**4, arrival_rate=0.02)
    cg_bp = predict(problem, get_algorithm("cg-bp").place(problem)).token_time
    ours = predict(problem, get_algorithm("libpipe").place(problem), forwarding=True).token_time
    assert cg_bp == pytest.approx(0.4 + 0.018, rel=0.01)
    assert ours == pytest.approx(0.1025 + 0.15 + 0.018, rel=0.01)
    assert ours <= 0.9 * cg_bp
