"""The offered load: when sessions arrive, from where, and how long they are.

Drawn once per seed, before any algorithm runs, so that every algorithm
compared in one run serves exactly the same sessions (common random
numbers: differences between algorithms are not sampling noise).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import ConfigError
from ._scenario import Scenario

# Sessions one run may draw (expected count, rate x duration): each costs a
# few routes, so a million is already minutes per algorithm; more is a typo
# in the duration or the rate, refused before memory fills with arrivals.
MAX_SESSIONS = 1_000_000


@dataclass(frozen=True)
class SessionRequest:
    index: int
    arrival: float  # seconds from the start
    client: str  # the client's location in the scenario's network
    prompt_tokens: int
    new_tokens: int


def generate_sessions(scenario: Scenario, seed: int) -> tuple[SessionRequest, ...]:
    """Poisson arrivals over the scenario's duration (exponential gaps of
    mean 1/lambda), each from a client drawn by its share, with output
    length uniform in [min_new_tokens, l_max]."""
    workload = scenario.workload
    expected = workload.arrival_rate * scenario.duration
    if expected > MAX_SESSIONS:
        raise ConfigError(
            f"{workload.arrival_rate:g} sessions/s for {scenario.duration:g} s is"
            f" {expected:.3g} sessions, more than {MAX_SESSIONS} in one run"
        )
    rng = random.Random(seed)
    locations, shares = zip(*workload.client_shares(), strict=True)
    sessions: list[SessionRequest] = []
    now = rng.expovariate(workload.arrival_rate)
    while now < scenario.duration:
        sessions.append(
            SessionRequest(
                index=len(sessions),
                arrival=now,
                client=rng.choices(locations, weights=shares)[0],
                prompt_tokens=workload.l_in,
                new_tokens=rng.randint(scenario.min_new_tokens, workload.l_max),
            )
        )
        now += rng.expovariate(workload.arrival_rate)
    return tuple(sessions)
