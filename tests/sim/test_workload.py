"""The offered load: Poisson arrivals, client shares, output lengths, one draw per seed."""

from __future__ import annotations

import itertools
import math

import pytest

from libpipe.errors import ConfigError
from libpipe.sim._scenario import scenario_from_dict
from libpipe.sim._workload import generate_sessions


def test_arrivals_are_poisson_at_the_given_rate(tiny):
    tiny["workload"].update(arrival_rate=2.0, duration_s=5000)
    sessions = generate_sessions(scenario_from_dict(tiny), seed=1)
    expected = 2.0 * 5000
    # Poisson count: 5 standard deviations is a bound a correct draw never meets.
    assert abs(len(sessions) - expected) < 5 * math.sqrt(expected)
    gaps = [b.arrival - a.arrival for a, b in itertools.pairwise(sessions)]
    assert all(g >= 0 for g in gaps)
    assert abs(sum(gaps) / len(gaps) - 0.5) < 0.05  # mean gap 1 / lambda
    assert all(0 < s.arrival < 5000 for s in sessions)
    assert [s.index for s in sessions] == list(range(len(sessions)))


def test_clients_by_share_and_lengths_in_range(tiny):
    tiny["clients"] = [{"node": "home", "weight": 3}, {"node": "dc", "weight": 1}]
    tiny["workload"].update(arrival_rate=5.0, duration_s=400, min_new_tokens=2)
    sessions = generate_sessions(scenario_from_dict(tiny), seed=3)
    home = sum(s.client == "home" for s in sessions) / len(sessions)
    assert 0.7 < home < 0.8
    assert {s.new_tokens for s in sessions} == {2, 3, 4, 5, 6}
    assert {s.prompt_tokens for s in sessions} == {4}


def test_same_seed_same_sessions_other_seed_other_sessions(tiny):
    scenario = scenario_from_dict(tiny)
    assert generate_sessions(scenario, 7) == generate_sessions(scenario, 7)
    assert generate_sessions(scenario, 7) != generate_sessions(scenario, 8)


def test_a_run_of_too_many_sessions_is_refused_before_drawing_them(tiny):
    tiny["workload"].update(arrival_rate=0.5, duration_s=1e12)
    with pytest.raises(ConfigError, match="more than 1000000 in one run"):
        generate_sessions(scenario_from_dict(tiny), seed=0)
