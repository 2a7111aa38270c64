"""Automatic placement over gossip, in virtual time: coverage, recovery, stability."""

from __future__ import annotations

import random

import pytest
import trio

from libpipe.errors import ConfigError
from libpipe.net import Identity
from libpipe.placement import ModelSpec
from libpipe.swarm import (
    LocalServer,
    RebalanceConfig,
    Rebalancer,
    RecordState,
    ServerRecord,
    server_views,
)

NUM_BLOCKS = 12
BLOCKS = 4
TAU = 0.01  # seconds per block per decode step
MODEL = ModelSpec(
    num_blocks=NUM_BLOCKS, block_bytes=1 << 20, hidden_size=64, kv_bytes_per_token_block=512
)
CACHE_BYTES = BLOCKS * 512 * 2048  # 2048 tokens of cache per block
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
    makes it re-announce a throughput and a free cache jittered by that fraction
    three times a period."""
    rng = random.Random(seed)
    node = swarm.make(span=span or (0, 0), state=RecordState.ONLINE)

    async def move(start: int, end: int) -> bool:
        await trio.sleep(LOAD_TIME)
        node.update_local_record(span=(start, end))
        return True

    me = LocalServer("test/model", MODEL, BLOCKS, CACHE_BYTES, tau, tau / 10)
    rebalancer = Rebalancer(node, me, move=move, config=RebalanceConfig(period=PERIOD), rng=rng)
    bootstrap = [swarm.nodes[0].address] if swarm.nodes else []
    throughput = 1 / (tau * BLOCKS)
    node.update_local_record(
        throughput_decode=throughput,
        throughput_forward=10 * throughput,
        free_cache_bytes=CACHE_BYTES,
    )
    await swarm.start(node, bootstrap)
    if span is None:
        node.update_local_record(span=rebalancer.initial_span())
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(rebalancer.run)
                while noise:
                    await trio.sleep(PERIOD / 3)
                    jitter = 1 + rng.uniform(-noise, noise)
                    # Sessions come and go: free cache wobbles too.
                    in_use = rng.uniform(0, noise)
                    node.update_local_record(
                        throughput_decode=throughput * jitter,
                        free_cache_bytes=int(CACHE_BYTES * (1 - in_use)),
                    )

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


# --- records to views ----------------------------------------------------------------


def record(span, *, state=RecordState.ONLINE, decode=25.0, forward=250.0, model_id="test/model"):
    identity = Identity.generate()
    return ServerRecord(
        peer_id=identity.peer_id,
        public_key=identity.public_key_bytes,
        addresses=("a:1",),
        model_id=model_id,
        span=span,
        dtype="float32",
        version="",
        throughput_decode=decode,
        throughput_forward=forward,
        free_cache_bytes=CACHE_BYTES,
        active_sessions=0,
        state=state,
        incarnation=1,
        timestamp=1.0,
    )


def test_records_become_per_block_views_of_counted_servers():
    good = record((0, 4))
    joining = record((4, 8), state=RecordState.JOINING)
    records = [
        good,
        joining,
        record((8, 12), state=RecordState.DRAINING),
        record((0, 0)),
        record((0, 4), decode=0.0),
        record((0, 4), model_id="other/model"),
        record((0, MODEL.num_blocks + 1)),
    ]
    views = server_views(records, "test/model", MODEL, exclude=joining.peer_id)
    assert [v.peer_id for v in views] == [good.peer_id]
    (view,) = views
    # 25 steps/s through 4 blocks: 10 ms per block; forward 250 tok/s: 1 ms.
    assert (view.start, view.end) == (0, 4)
    assert view.tau_decode == pytest.approx(0.01) and view.tau_forward == pytest.approx(0.001)
    assert view.free_cache_bytes == CACHE_BYTES and view.cache_bytes_per_token_block == 512


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"period": 0.0}, {"jitter": 1.0}, {"jitter": -0.1}, {"margin": 1.5}]
)
def test_bad_rebalance_config_is_refused(kwargs):
    with pytest.raises(ConfigError):
        RebalanceConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"blocks": 0},
        {"blocks": NUM_BLOCKS + 1},
        {"cache_bytes": -1},
        {"tau_decode": 0.0},
        {"tau_forward": float("nan")},
    ],
)
def test_bad_local_server_is_refused(kwargs):
    values = dict(
        model_id="m",
        model=MODEL,
        blocks=4,
        cache_bytes=CACHE_BYTES,
        tau_decode=TAU,
        tau_forward=TAU,
    )
    with pytest.raises(ConfigError):
        LocalServer(**(values | kwargs))


async def twins(swarm) -> tuple:
    """Two servers on blocks [0, 4) of twelve, the first with the lower peer id."""
    pair = [swarm.make(span=(0, BLOCKS), state=RecordState.ONLINE) for _ in range(2)]
    for node in pair:
        node.update_local_record(
            throughput_decode=25.0, throughput_forward=250.0, free_cache_bytes=CACHE_BYTES
        )
    low, high = sorted(pair, key=lambda n: n.peer_id)
    await swarm.start(low)
    await swarm.start(high, [low.address])
    await swarm.settle()
    return low, high


def local_server() -> LocalServer:
    return LocalServer("test/model", MODEL, BLOCKS, CACHE_BYTES, TAU, TAU / 10)


async def test_a_refused_move_is_not_counted_and_is_tried_again(autojump_clock, swarm):
    low, _ = await twins(swarm)
    asked = []

    async def refuse(start: int, end: int) -> bool:
        asked.append((start, end))
        return False

    rebalancer = Rebalancer(low, local_server(), move=refuse)
    assert not await rebalancer.step()
    assert not await rebalancer.step()
    assert rebalancer.moves == 0 and len(asked) == 2 and asked[0][0] >= BLOCKS


async def test_twins_on_one_span_move_one_at_a_time(autojump_clock, swarm):
    low, high = await twins(swarm)
    moved = []

    async def record(start: int, end: int) -> bool:
        moved.append((start, end))
        return True

    config = RebalanceConfig(period=PERIOD)
    first = Rebalancer(low, local_server(), move=record, config=config)
    second = Rebalancer(high, local_server(), move=record, config=config)
    # Both see the gap; the higher id holds back while the lower one moves.
    assert second.evaluate() is not None
    assert not await second.step()
    assert await first.step()
    # Had the first not moved, the second goes once it has waited long enough.
    await trio.sleep(2 * PERIOD)
    assert await second.step()
    assert len(moved) == 2


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
