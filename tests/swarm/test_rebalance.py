"""Automatic placement over gossip, in virtual time: coverage, recovery, stability."""

from __future__ import annotations

import random

import pytest
import trio

from libpipe.errors import ConfigError
from libpipe.swarm import RebalanceConfig, Rebalancer, RecordState
from libpipe.swarm._petals_rule import (
    Holding,
    best_start,
    block_throughput,
    clearly_better,
    should_move,
)

NUM_BLOCKS = 12
BLOCKS = 4
TAU = 0.01  # seconds per block per decode step
PERIOD = 10.0
LOAD_TIME = 1.0  # virtual seconds a move spends loading blocks


class Server:
    """A gossip node with a rebalancer whose move just re-announces the span."""

    def __init__(self, swarm, node, rebalancer, scope) -> None:
        self.swarm = swarm
        self.node = node
        self.rebalancer = rebalancer
        self.scope = scope

    def kill(self) -> None:
        self.scope.cancel()
        self.swarm.kill(self.node)


async def start_server(
    swarm,
    span: tuple[int, int] | None,
    *,
    seed: int,
    tau: float = TAU,
    noise: float = 0.0,
) -> Server:
    """Start a server at ``span`` (None: let the rebalancer choose it, as a new
    server does) with a rebalancer running every ~PERIOD seconds. ``noise``
    makes it re-announce a throughput jittered by that fraction every second."""
    rng = random.Random(seed)
    node = swarm.make(span=span or (0, 0), state=RecordState.ONLINE)

    async def move(start: int, end: int) -> None:
        await trio.sleep(LOAD_TIME)
        node.update_local_record(span=(start, end))

    rebalancer = Rebalancer(
        node,
        num_blocks=NUM_BLOCKS,
        blocks=BLOCKS,
        tau_decode=tau,
        move=move,
        config=RebalanceConfig(period=PERIOD),
        rng=rng,
    )
    bootstrap = [swarm.nodes[0].address] if swarm.nodes else []
    throughput = 1 / (tau * BLOCKS)
    node.update_local_record(throughput_decode=throughput)
    await swarm.start(node, bootstrap)
    if span is None:
        node.update_local_record(span=rebalancer.initial_span())
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(rebalancer.run)
                while noise:
                    await trio.sleep(1.0)
                    jitter = 1 + rng.uniform(-noise, noise)
                    node.update_local_record(throughput_decode=throughput * jitter)

    swarm.nursery.start_soon(run)
    return Server(swarm, node, rebalancer, scope)


def coverage(servers: list[Server]) -> list[int]:
    """Servers per block, from the spans the live servers actually hold."""
    counts = [0] * NUM_BLOCKS
    for s in servers:
        start, end = s.node.local_record.record.span
        for b in range(start, end):
            counts[b] += 1
    return counts


def everyone_knows_every_span(servers: list[Server]) -> bool:
    spans = {s.node.peer_id: s.node.local_record.record.span for s in servers}
    return all({r.record.peer_id: r.record.span for r in s.node.view()} == spans for s in servers)


def moves(servers: list[Server]) -> int:
    return sum(s.rebalancer.moves for s in servers)


# --- the rule ----------------------------------------------------------------------


def test_block_throughput_sums_the_servers_of_each_block():
    holdings = [Holding("a", 0, 2, 5.0), Holding("b", 1, 4, 1.0), Holding("c", 3, 3, 9.0)]
    assert block_throughput(holdings, 4) == [5.0, 6.0, 1.0, 1.0]


def test_best_start_covers_the_weakest_window():
    assert best_start([3.0, 3.0, 0.0, 1.0, 3.0], 2) == 2
    # Weakest block first, then the next weakest: [1, 2] beats [0, 1].
    assert best_start([5.0, 1.0, 2.0, 1.0, 6.0], 2) == 1
    # A window longer than the model is the whole model.
    assert best_start([1.0, 2.0], 5) == 0
    # Equal gaps: the window that fits its gap snugly, not one leaving slivers.
    assert best_start([9.0, 0.0, 0.0, 0.0, 0.0, 9.0], 2, random.Random(0)) in (1, 3)
    assert {best_start([0.0] * 6, 2, random.Random(seed)) for seed in range(20)} == {0, 4}
    # Ties left after that are spread at random, not piled on the first window.
    starts = {best_start([0.0, 0.0, 5.0, 0.0, 0.0], 2, random.Random(s)) for s in range(20)}
    assert starts == {0, 3}


def test_clearly_better_needs_the_margin():
    assert clearly_better([1.0, 2.0], [0.0, 2.0], 0.2)
    assert not clearly_better([1.1, 2.0], [1.0, 2.0], 0.2)
    assert clearly_better([1.0, 3.0], [1.0, 2.0], 0.2)
    assert not clearly_better([1.0, 2.0], [1.0, 2.0], 0.2)
    assert not clearly_better([0.5, 9.0], [1.0, 2.0], 0.2)


def test_should_move_only_for_a_clear_gain():
    others = [Holding("a", 0, 2, 1.0), Holding("b", 0, 2, 1.0)]
    assert should_move(others, Holding("me", 0, 2, 1.0), 4, margin=0.2) == (2, 4)
    # Already on the weakest blocks: stay.
    assert should_move(others, Holding("me", 2, 4, 1.0), 4, margin=0.2) is None
    # A small imbalance is within the margin.
    uneven = [Holding("a", 0, 2, 1.0), Holding("b", 2, 4, 1.1)]
    assert should_move(uneven, Holding("me", 2, 4, 1.0), 4, margin=0.2) is None


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"period": 0.0}, {"jitter": 1.0}, {"jitter": -0.1}, {"margin": 1.5}]
)
def test_bad_rebalance_config_is_refused(kwargs):
    with pytest.raises(ConfigError):
        RebalanceConfig(**kwargs)


async def test_bad_rebalancer_arguments_are_refused(autojump_clock, swarm):
    node = swarm.make()

    async def move(start: int, end: int) -> None:
        raise AssertionError("never called")

    for kwargs in (
        {"num_blocks": 0, "blocks": 4, "tau_decode": TAU},
        {"num_blocks": 12, "blocks": 0, "tau_decode": TAU},
        {"num_blocks": 12, "blocks": 4, "tau_decode": 0.0},
        {"num_blocks": 12, "blocks": 4, "tau_decode": float("nan")},
    ):
        with pytest.raises(ConfigError):
            Rebalancer(node, move=move, **kwargs)


def test_waits_are_jittered_around_the_period():
    config = RebalanceConfig(period=10.0, jitter=0.5)
    rng = random.Random(3)
    waits = [config.next_wait(rng) for _ in range(200)]
    assert all(5.0 <= w <= 15.0 for w in waits)
    assert max(waits) - min(waits) > 5.0


# --- swarms ----------------------------------------------------------------------------


async def test_servers_joining_one_by_one_cover_the_model(autojump_clock, swarm, config):
    servers = []
    for seed in range(3):
        servers.append(await start_server(swarm, None, seed=seed))
        await swarm.wait_for(lambda: everyone_knows_every_span(servers), limit=PERIOD)
    assert coverage(servers) == [1] * NUM_BLOCKS
    assert moves(servers) == 0


async def test_crowd_on_the_same_blocks_spreads_to_full_coverage(autojump_clock, swarm, config):
    # The worst stampede: six servers all start on blocks [0, 4).
    servers = [await start_server(swarm, (0, BLOCKS), seed=seed) for seed in range(6)]
    await swarm.settle()
    await swarm.wait_for(lambda: min(coverage(servers)) >= 1, limit=6 * PERIOD, step=1.0)
    # Then it evens out with a few more moves, each one a clear gain ...
    await trio.sleep(6 * PERIOD)
    settled = moves(servers)
    assert coverage(servers) == [2] * NUM_BLOCKS
    assert settled <= 6
    # ... and is quiet from then on.
    await trio.sleep(20 * PERIOD)
    assert moves(servers) == settled


async def test_dead_servers_blocks_are_covered_again(autojump_clock, swarm, config):
    spans = [(0, 4), (4, 8), (8, 12)] * 2
    servers = [await start_server(swarm, span, seed=i) for i, span in enumerate(spans)]
    await swarm.settle()
    # Both holders of [4, 8) die at once: a gap in the middle.
    servers[1].kill()
    servers[4].kill()
    alive = [s for i, s in enumerate(servers) if i not in (1, 4)]
    # Found dead within a suspicion's lifetime, then re-covered within a few periods.
    bound = config.suspicion_max_timeout(6) + 4 * PERIOD
    await swarm.wait_for(lambda: min(coverage(alive)) >= 1, limit=bound, step=1.0)
    # One mover suffices: the others see the gap covered and stay.
    await trio.sleep(5 * PERIOD)
    assert min(coverage(alive)) >= 1
    assert 1 <= moves(alive) <= 3


async def test_without_memory_for_full_coverage_servers_settle(autojump_clock, swarm, config):
    # Two servers of four blocks cannot cover twelve: they must not chase the gap forever.
    servers = [await start_server(swarm, (0, BLOCKS), seed=seed) for seed in range(2)]
    await swarm.settle()
    await trio.sleep(10 * PERIOD)
    settled = moves(servers)
    assert settled <= 2
    await trio.sleep(20 * PERIOD)
    assert moves(servers) == settled
    assert sum(c > 0 for c in coverage(servers)) == 2 * BLOCKS


async def test_stable_swarm_does_not_move_over_twenty_periods(autojump_clock, swarm, config):
    # Balanced, with every server re-announcing a throughput that wobbles by 5%.
    spans = [(0, 4), (4, 8), (8, 12)] * 2
    servers = [await start_server(swarm, span, seed=i, noise=0.05) for i, span in enumerate(spans)]
    await swarm.settle()
    await trio.sleep(20 * PERIOD)
    assert moves(servers) == 0
    assert coverage(servers) == [2] * NUM_BLOCKS
