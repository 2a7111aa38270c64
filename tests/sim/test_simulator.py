"""The event engine against hand-computed timelines (scenario in conftest)."""

from __future__ import annotations

import pytest

from libpipe.errors import ConfigError
from libpipe.placement import Hop, Route, route
from libpipe.sim._metrics import summarize
from libpipe.sim._scenario import scenario_from_dict
from libpipe.sim._simulator import Simulation
from libpipe.sim._workload import SessionRequest

ALL_FAST = {"fast": (0, 4)}
# Decode step on fast [0, 4) from "home": RTT 0.1 + overhead 0.02 + 4 x 0.01.
TOKEN = 0.16
# Open 0.07; prompt: RTT 0.1 + transfer (4 x 1 ms + 30 ms) + 4 blocks x (4 x 1 ms + 5 ms).
FIRST = 0.07 + 0.1 + 0.034 + 4 * 0.009
SESSION = FIRST + 5 * TOKEN  # 6 new tokens


def session(index: int, arrival: float, new_tokens: int = 6) -> SessionRequest:
    return SessionRequest(index, arrival, "home", prompt_tokens=4, new_tokens=new_tokens)


def ws_rr(views, request):
    return route(views, 4, session_tokens=10)


def test_one_session_follows_the_performance_model(tiny):
    scenario = scenario_from_dict(tiny)
    [out] = Simulation(scenario, ALL_FAST, ws_rr).run([session(0, 1.0)])
    assert out.admitted == 1.0
    assert out.ttft == pytest.approx(FIRST)
    assert out.token_time == pytest.approx(TOKEN)
    assert out.finished == pytest.approx(1.0 + SESSION)
    assert out.per_token == pytest.approx(SESSION / 6)
    assert out.hops == 1


def test_a_full_cache_makes_the_next_session_wait_until_a_release(tiny):
    scenario = scenario_from_dict(tiny)
    sim = Simulation(scenario, ALL_FAST, ws_rr)
    first, second = sim.run([session(0, 0.0), session(1, 0.5)])
    assert second.admitted == pytest.approx(first.finished)
    assert second.wait == pytest.approx(SESSION - 0.5)
    assert sim.retries == 1


def test_the_line_is_served_oldest_first(tiny):
    scenario = scenario_from_dict(tiny)
    sessions = [session(0, 0.0), session(1, 0.1), session(2, 0.2), session(3, 0.3)]
    outs = Simulation(scenario, ALL_FAST, ws_rr).run(sessions)
    starts = [o.admitted for o in outs]
    assert starts == sorted(starts)
    assert starts[3] == pytest.approx(3 * SESSION)


def test_the_router_sees_load_and_release_times(tiny):
    scenario = scenario_from_dict(tiny)
    seen = []

    def spy(views, request):
        seen.append({v.peer_id: v for v in views})
        return ws_rr(views, request)

    Simulation(scenario, ALL_FAST, spy).run([session(0, 0.0), session(1, 0.5)])
    fresh, loaded = seen[0]["fast"], seen[1]["fast"]
    assert fresh.free_cache_bytes == 40_000 and fresh.cache_release == ()
    assert loaded.free_cache_bytes == 0
    assert loaded.cache_release == (pytest.approx((SESSION - 0.5, 40_000)),)
    assert loaded.rtt == pytest.approx(0.12)  # RTT plus the per-hop overhead
    assert loaded.cache_bytes_per_token_block == 1000


def test_waiting_sessions_count_as_taken_cache_for_newcomers(tiny):
    scenario = scenario_from_dict(tiny)
    seen = []

    def spy(views, request):
        seen.append({v.peer_id: v for v in views}["fast"])
        return Route((Hop("fast", 0, 4),), 0.0)

    Simulation(scenario, ALL_FAST, spy).run([session(0, 0.0), session(1, 0.1), session(2, 0.2)])
    # Session 1 waits for session 0's 40 kB: session 2 is told none of it is coming.
    assert seen[2].free_cache_bytes == 0 and seen[2].cache_release == ()


def test_ws_rr_goes_around_a_full_server(tiny):
    # Two slow hops: 2 x (0.12 + 2 x 0.001) = 0.244 s per token, against the
    # fast hop's 0.16 plus the wait for its cache spread over 10 tokens (0.094).
    tiny["server_classes"]["slow"]["decode_ms_per_block"] = 1.0
    placement = {"fast": (0, 4), "slow-0": (0, 2), "slow-1": (2, 4)}
    scenario = scenario_from_dict(tiny)
    first, second = Simulation(scenario, placement, ws_rr).run([session(0, 0.0), session(1, 0.1)])
    assert first.hops == 1 and first.wait == 0
    assert second.hops == 2 and second.wait == 0


def test_a_cache_blind_router_waits_instead(tiny):
    tiny["server_classes"]["slow"]["decode_ms_per_block"] = 1.0
    placement = {"fast": (0, 4), "slow-0": (0, 2), "slow-1": (2, 4)}
    scenario = scenario_from_dict(tiny)
    blind = Simulation(scenario, placement, lambda views, r: route(views, 4))
    _, second = blind.run([session(0, 0.0), session(1, 0.1)])
    assert second.hops == 1 and second.wait == pytest.approx(SESSION - 0.1)


def test_summary_of_a_run(tiny):
    scenario = scenario_from_dict(tiny)
    outs = Simulation(scenario, ALL_FAST, ws_rr).run([session(0, 0.0), session(1, 0.5)])
    summary = summarize(outs, duration=1.0)
    assert summary.sessions == 2
    assert summary.wait_s == pytest.approx((SESSION - 0.5) / 2)
    assert summary.waited_fraction == 0.5
    assert summary.decode_token_s == pytest.approx(TOKEN)
    # By t = 1 s the first session had its first token and 5 more (every 0.16 s).
    assert summary.throughput_tokens_s == pytest.approx(1 + int((1.0 - FIRST) / TOKEN))
    assert summary.makespan_s == pytest.approx(2 * SESSION)


def test_no_sessions_is_a_clear_error():
    with pytest.raises(ConfigError, match="no session arrived"):
        summarize([], duration=5.0)


@pytest.mark.parametrize(
    ("hops", "match"),
    [
        ((Hop("slow-0", 0, 4),), "does not hold them"),
        ((Hop("nobody", 0, 4),), "does not hold them"),
        ((Hop("fast", 0, 2),), "does not cover"),
        ((Hop("fast", 0, 2), Hop("fast", 3, 4)), "not a chain"),
        ((Hop("fast", 0, 1), Hop("slow-0", 1, 2), Hop("fast", 2, 4)), "visits fast twice"),
    ],
)
def test_a_bad_route_is_refused(tiny, hops, match):
    scenario = scenario_from_dict(tiny)
    placement = {"fast": (0, 4), "slow-0": (0, 2)}
    sim = Simulation(scenario, placement, lambda views, r: Route(hops, 0.0))
    with pytest.raises(ConfigError, match=match):
        sim.run([session(0, 0.0)])


def test_sessions_are_known_by_their_index_not_their_position(tiny):
    sim = Simulation(scenario_from_dict(tiny), ALL_FAST, ws_rr)
    [out] = sim.run([session(7, 1.0)])
    assert out.arrival == 1.0 and out.admitted == 1.0
    with pytest.raises(ConfigError, match="share an index"):
        sim.run([session(3, 0.0), session(3, 1.0)])


def test_a_session_no_server_could_ever_hold_is_refused(tiny):
    tiny["workload"]["max_new_tokens"] = 60  # 64 tokens x 4 blocks x 1000 B > 40 kB
    scenario = scenario_from_dict(tiny)
    with pytest.raises(ConfigError, match="can never hold"):
        Simulation(scenario, ALL_FAST, lambda v, r: route(v, 4)).run([session(0, 0.0)])


@pytest.mark.parametrize(
    ("placement", "match"),
    [
        ({"ghost": (0, 4)}, "unknown server"),
        ({"fast": (2, 9)}, "not a span"),
        ({"slow-0": (0, 3)}, "more than it can hold"),
    ],
)
def test_an_impossible_placement_is_refused(tiny, placement, match):
    with pytest.raises(ConfigError, match=match):
        Simulation(scenario_from_dict(tiny), placement, ws_rr)


def test_a_forwarded_route_runs_as_a_chain_of_one_way_messages(tiny):
    # slow-0 and slow-1 both in "dc" (5 ms apart), the client 100 ms away.
    placement = {"slow-0": (0, 2), "slow-1": (2, 4)}
    scenario = scenario_from_dict(tiny)
    forwarding = scenario.problem.forwarding("home")

    def forwarded(views, request):
        return route(views, 4, session_tokens=10, forwarding=forwarding)

    [out] = Simulation(scenario, placement, forwarded).run([session(0, 0.0)])
    # Three messages: in 0.05, across 0.0025, out 0.05, each with half the
    # 20 ms per-hop overhead; four blocks of 40 ms.
    assert out.token_time == pytest.approx(0.05 + 0.0025 + 0.05 + 3 * 0.01 + 4 * 0.04)
    # The prompt: the same trips, half of the transfer (4 x 1 ms + 30 ms) per
    # message, four blocks of 4 x 2 ms + 10 ms.
    prefill = 0.05 + 0.0025 + 0.05 + 3 * 0.034 / 2 + 4 * 0.018
    assert out.ttft == pytest.approx(0.07 + prefill)
    # The client-centric run of the same hops pays two round trips.
    [direct] = Simulation(scenario, placement, ws_rr).run([session(0, 0.0)])
    assert direct.token_time == pytest.approx(2 * 0.12 + 4 * 0.04)
