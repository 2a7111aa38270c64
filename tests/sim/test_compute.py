"""A server's compute queue: passes one at a time, decode steps batched by
sub-span, decode before prefill, no starvation; and what it does to sessions."""

from __future__ import annotations

import pytest

from libpipe.errors import ConfigError
from libpipe.placement import route
from libpipe.sim._compute import ComputeQueue, Job, PassCost
from libpipe.sim._scenario import scenario_from_dict
from libpipe.sim._simulator import Simulation
from libpipe.sim._workload import SessionRequest

COST = PassCost(tau_decode=0.01, tau_row=0.002)


def decode(owner: int, at: float, key: tuple[int, int] = (0, 4)) -> Job:
    return Job(owner, at, key[1] - key[0], key)


def prefill(owner: int, at: float, seconds: float = 0.5) -> Job:
    return Job(owner, at, 4, None, seconds)


def owners(taken: tuple[list[Job], float] | None) -> list[int]:
    assert taken is not None
    return [job.owner for job in taken[0]]


def test_a_pass_of_n_decode_steps_costs_one_step_plus_a_row_per_extra_session():
    assert COST.decode(4, 1) == pytest.approx(0.04)
    assert COST.decode(4, 3) == pytest.approx(4 * (0.01 + 2 * 0.002))
    queue = ComputeQueue(COST)
    for owner in range(3):
        queue.submit(decode(owner, 0.0))
    jobs, seconds = queue.take(0.0) or ([], 0.0)
    assert [j.owner for j in jobs] == [0, 1, 2]
    assert seconds == pytest.approx(COST.decode(4, 3))


def test_one_pass_at_a_time_and_steps_of_other_sub_spans_go_after_in_order():
    queue = ComputeQueue(COST)
    queue.submit(decode(0, 0.0, (0, 4)))
    queue.submit(decode(1, 0.1, (0, 2)))
    queue.submit(decode(2, 0.2, (0, 4)))
    queue.submit(decode(3, 0.3, (2, 4)))
    first = queue.take(0.3)
    assert owners(first) == [0, 2]  # the head and every queued step of its sub-span
    assert queue.take(0.3) is None  # busy until the pass ends
    queue.finish()
    second = queue.take(0.4)
    assert owners(second) == [1]
    assert second is not None and second[1] == pytest.approx(COST.decode(2, 1))
    queue.finish()
    assert owners(queue.take(0.5)) == [3]
    queue.finish()
    assert queue.take(0.6) is None and queue.queued == 0


def test_decode_goes_before_an_earlier_prefill_until_the_prefill_has_waited_max_wait():
    queue = ComputeQueue(COST, max_wait=2.0)
    queue.submit(prefill(0, 0.0, seconds=0.5))
    queue.submit(decode(1, 1.0))
    assert owners(queue.take(1.0)) == [1]
    queue.finish()
    queue.submit(decode(2, 2.5))
    taken = queue.take(2.5)  # the prefill has waited 2.5 s
    assert owners(taken) == [0] and taken is not None and taken[1] == 0.5
    queue.finish()
    assert owners(queue.take(3.0)) == [2]


def test_a_prefill_behind_a_steady_stream_of_decode_steps_is_not_starved():
    queue = ComputeQueue(COST, max_wait=2.0)
    queue.submit(prefill(-1, 0.0))
    now, step = 0.0, 0
    started = None
    while started is None and now < 60.0:
        # A new decode step of another sub-span keeps arriving: decode
        # priority alone would never let the prefill run.
        queue.submit(decode(step, now, (step % 3, 4)))
        step += 1
        jobs, seconds = queue.take(now) or ([], 0.0)
        if any(j.owner == -1 for j in jobs):
            started = now
        now += seconds
        queue.finish()
    assert started is not None and started <= 2.0 + COST.decode(4, 1)


def test_max_batch_splits_a_long_queue_into_passes():
    queue = ComputeQueue(COST, max_batch=2)
    for owner in range(5):
        queue.submit(decode(owner, 0.0))
    sizes = []
    while (taken := queue.take(0.0)) is not None:
        sizes.append(len(taken[0]))
        queue.finish()
    assert sizes == [2, 2, 1]


def test_bad_queue_settings_are_refused():
    with pytest.raises(ConfigError, match="max_batch"):
        ComputeQueue(COST, max_batch=0)
    with pytest.raises(ConfigError, match="max_wait"):
        ComputeQueue(COST, max_wait=-1.0)


# --- what the queue does to sessions (the tiny scenario of conftest) -------------


def sessions_on_one_server(tiny: dict, count: int, compute: str = "queue", new_tokens: int = 6):
    """``count`` sessions arriving together on the fast server, whose pass
    (4 blocks x 100 ms) is longer than the session's round trip (0.12 s),
    with a prompt that costs no compute, so all first tokens come at once."""
    tiny["compute"] = compute
    fast = tiny["server_classes"]["fast"]
    fast["decode_ms_per_block"] = 100.0
    fast["prefill_ms_per_block"] = {"per_prompt_token": 0.0, "fixed": 0.0}
    fast["batch_row_ms_per_block"] = 10.0
    fast["memory_gb"] = 4.0 + count * 40_000 / 1e9  # the cache of `count` sessions
    scenario = scenario_from_dict(tiny)
    requests = [
        SessionRequest(i, 0.0, "home", prompt_tokens=4, new_tokens=new_tokens) for i in range(count)
    ]
    sim = Simulation(scenario, {"fast": (0, 4)}, lambda v, r: route(v, 4, session_tokens=10))
    return sim.run(requests)


ALONE = 0.12 + 4 * 0.1  # a decode step with the server to itself


def test_two_sessions_on_one_server_take_turns_and_each_step_takes_longer(tiny):
    [lone] = sessions_on_one_server(tiny, 1)
    assert lone.token_time == pytest.approx(ALONE)
    a, b = sessions_on_one_server(tiny, 2)
    assert a.first_token == pytest.approx(b.first_token) == pytest.approx(lone.first_token)
    # Both steps reach the server together: a runs, b waits a whole pass.
    # From then on each comes back while the other's pass runs, so each gets
    # one pass in two (0.8 s a token); the steps never meet in the queue,
    # so they never batch.
    assert a.token_time == pytest.approx((ALONE + 4 * 0.8) / 5)
    assert b.token_time == pytest.approx((ALONE + 0.4 + 4 * 0.8) / 5)


def test_steps_queued_together_run_as_one_pass(tiny):
    a, b, c = sessions_on_one_server(tiny, 3, new_tokens=2)
    # One decode step each. a's finds the server idle and runs alone (0.4 s);
    # b's and c's queue behind it, then run as one pass of 4 x (100 + 10) ms.
    assert a.finished - a.first_token == pytest.approx(0.06 + 0.4 + 0.06)
    for o in (b, c):
        assert o.finished - o.first_token == pytest.approx(0.06 + 0.4 + 4 * 0.11 + 0.06)


def test_unshared_compute_is_the_papers_model_every_step_as_if_alone(tiny):
    outcomes = sessions_on_one_server(tiny, 3, compute="unshared")
    assert all(o.token_time == pytest.approx(ALONE) for o in outcomes)


def test_the_same_sessions_give_the_same_outcomes(tiny):
    assert sessions_on_one_server(tiny, 3) == sessions_on_one_server(tiny, 3)
