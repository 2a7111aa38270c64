"""Run several algorithms on one scenario, on the same sessions."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..placement import Algorithm, Forwarding, Placement, Route, ServerView, get_algorithm
from ._metrics import Summary, summarize
from ._scenario import Scenario
from ._simulator import Router, Simulation
from ._workload import SessionRequest, generate_sessions

# Algorithms that may decline an instance as beyond them (the exact MILP on
# a large swarm, or without scipy): their ConfigError becomes a skip.
MAY_DECLINE = frozenset({"milp"})


@dataclass(frozen=True)
class AlgorithmResult:
    algorithm: str
    summary: Summary
    placement: Placement
    retries: int  # admissions tried again after a full cache
    place_s: float  # wall-clock seconds the placement took
    simulate_s: float  # wall-clock seconds the simulation took

    def as_dict(self) -> dict[str, object]:
        return {
            **self.summary.as_dict(),
            "retries": self.retries,
            "place_s": self.place_s,
            "simulate_s": self.simulate_s,
            "placement": {name: list(span) for name, span in self.placement.items()},
        }


@dataclass(frozen=True)
class Comparison:
    scenario: Scenario
    seed: int
    results: dict[str, AlgorithmResult]
    skipped: dict[str, str]  # algorithm -> why it could not run here


def compare(scenario: Scenario, algorithms: Sequence[str], *, seed: int = 0) -> Comparison:
    """Every algorithm on the same sessions (drawn once from ``seed``).

    An algorithm in ``MAY_DECLINE`` that finds the instance beyond it is
    reported in ``skipped`` with its reason; any other error propagates.
    """
    if not algorithms:
        raise ConfigError("no algorithm to simulate")
    chosen = [get_algorithm(name) for name in dict.fromkeys(algorithms)]
    sessions = generate_sessions(scenario, seed)
    if not sessions:
        raise ConfigError(
            f"no session arrives in {scenario.duration:g} s at"
            f" {scenario.workload.arrival_rate:g}/s: raise the duration or the rate"
        )
    results: dict[str, AlgorithmResult] = {}
    skipped: dict[str, str] = {}
    for algorithm in chosen:
        started = time.perf_counter()
        try:
            placement = algorithm.place(scenario.problem)
        except ConfigError as exc:
            if algorithm.name not in MAY_DECLINE:
                raise
            skipped[algorithm.name] = str(exc)
            continue
        place_s = time.perf_counter() - started
        rng = random.Random(f"{seed}/{algorithm.name}")
        results[algorithm.name] = _simulate(scenario, algorithm, placement, place_s, sessions, rng)
    return Comparison(scenario, seed, results, skipped)


def router_for(algorithm: Algorithm, scenario: Scenario, rng: random.Random) -> Router:
    """The algorithm's routing policy for a session of this scenario (cache
    sized for l_in + l_max, as the server allocates it), offered the
    scenario's forwarding (used by the algorithms that forward).

    ``rng`` breaks exact ties between routes. Scenario RTTs are exact, so
    replicas in one cluster tie exactly, where real clients, each with its
    own noisy RTT estimates, would split between them; without it every
    session would pick the same replica by name.
    """
    num_blocks = scenario.model.num_blocks
    session_tokens = scenario.workload.session_tokens
    forwarding: dict[str, Forwarding] = {}

    def router(views: Sequence[ServerView], request: SessionRequest) -> Route:
        client = request.client
        if client not in forwarding:
            forwarding[client] = scenario.problem.forwarding(client)
        return algorithm.route(
            views,
            num_blocks,
            session_tokens=session_tokens,
            rng=rng,
            forwarding=forwarding[client],
        )

    return router


def _simulate(
    scenario: Scenario,
    algorithm: Algorithm,
    placement: Placement,
    place_s: float,
    sessions: Sequence[SessionRequest],
    rng: random.Random,
) -> AlgorithmResult:
    placed = time.perf_counter()
    simulation = Simulation(scenario, placement, router_for(algorithm, scenario, rng))
    outcomes = simulation.run(sessions)
    done = time.perf_counter()
    return AlgorithmResult(
        algorithm=algorithm.name,
        summary=summarize(outcomes, scenario.duration),
        placement=dict(placement),
        retries=simulation.retries,
        place_s=place_s,
        simulate_s=done - placed,
    )
