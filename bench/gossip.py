"""Gossip membership at 10, 100 and 500 nodes, in virtual time.

Each size runs a whole swarm of ``GossipNode``s over ``MemoryNetwork`` in
one ``trio.run`` under ``MockClock(autojump_threshold=0)``, with every
message really encoded and every record really signed and verified. The
swarm starts converged: every node is handed every record through
``on_alive`` (so it verifies each one), and the resulting news is drained
without being sent. A join storm of 500 nodes is dominated by its own
congestion and costs minutes of CPU, so the cold start (all nodes joining
back to back) is measured at 100 nodes only.

* converge: a new node joins through one random member; the time until
  every view holds every node (the newcomer's included);
* spread: one node changes its record; the time until every node holds it;
* bytes/node/s: traffic per node over a quarter of the record-refresh
  interval (probes, acks, gossip, the refreshes falling in it, push-pulls);
* detect dead: one node loses power; the time until every other node has
  declared it dead.

Times are virtual seconds; rounds are those divided by ``probe_interval``.
Baseline (same run, 100 nodes): SWIM as in the paper, news piggybacked on
probe traffic only, without memberlist's gossip rounds. The ratio is its
convergence time over ours.

    .venv/bin/python bench/gossip.py [--sizes 10,100,500 --preset lan --seed 1 --json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import trio
import trio.testing

from libpipe.net import Identity
from libpipe.swarm import GossipConfig, GossipNode, MemberState, MemoryNetwork

WALL0 = 1_800_000_000.0
# Sampling step for "has it happened yet" (virtual seconds).
STEP = 0.05
# Give up on any phase after this long (virtual): a broken build should not hang.
PHASE_LIMIT = 600.0


async def _until(predicate, limit: float = PHASE_LIMIT) -> float:
    start = trio.current_time()
    while not predicate():
        if trio.current_time() - start > limit:
            raise RuntimeError(f"not reached within {limit} virtual seconds")
        await trio.sleep(STEP)
    return trio.current_time() - start


async def _scenario(n: int, config: GossipConfig, seed: int, detect: bool) -> dict:
    network = MemoryNetwork(seed=seed, latency=(0.001, 0.010))
    rng = random.Random(seed)
    result: dict = {}

    def make(i: int) -> GossipNode:
        return GossipNode(
            Identity.generate(),
            network.endpoint(f"10.0.{i // 250}.{i % 250}:31337"),
            model_id="bench/model",
            span=(0, 8),
            config=config,
            rng=random.Random(rng.random()),
            clock=lambda: WALL0 + trio.current_time(),
        )

    nodes = [make(i) for i in range(n)]
    for node in nodes:
        for other in nodes:
            node.on_alive(other.local_record.to_wire())
        while node.broadcasts:
            node.broadcasts.take(1 << 30)
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:

        async def run(node, peers, scope, task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await node.run(peers, task_status=task_status)

        for node in nodes:
            scopes.append(trio.CancelScope())
            await nursery.start(run, node, [], scopes[-1])

        newcomer = make(n)
        scopes.append(trio.CancelScope())
        await nursery.start(run, newcomer, [rng.choice(nodes).address], scopes[-1])
        nodes.append(newcomer)
        everyone = {node.peer_id for node in nodes}
        result["converge_s"] = await _until(
            lambda: (
                all(len(node.members) == len(nodes) for node in nodes)
                and all({r.record.peer_id for r in node.view()} == everyone for node in nodes)
            )
        )

        changed = nodes[n // 2]
        changed.update_local_record(span=(8, 16))
        result["spread_s"] = await _until(
            lambda: all(
                node.members[changed.peer_id].record.record.span == (8, 16) for node in nodes
            )
        )

        # A third of a mean refresh period: refreshes run at their steady rate
        # from the start (see GossipNode._refresh_loop), so the window holds
        # its share of them.
        sent = network.total_bytes()
        window = 0.25 * config.record_refresh_interval
        await trio.sleep(window)
        result["bytes_per_node_s"] = (network.total_bytes() - sent) / len(nodes) / window

        if detect:
            victim = nodes[n // 3]
            network.kill(victim.address)
            scopes[n // 3].cancel()
            others = [node for node in nodes if node is not victim]

            def all_dead() -> bool:
                for node in others:
                    member = node.members.get(victim.peer_id)
                    if member is not None and member.state is not MemberState.DEAD:
                        return False
                return True

            result["detect_dead_s"] = await _until(all_dead)
        nursery.cancel_scope.cancel()
    return result


async def _cold_start(n: int, config: GossipConfig, seed: int) -> float:
    """Virtual seconds from the last of n back-to-back joins to a converged swarm."""
    network = MemoryNetwork(seed=seed, latency=(0.001, 0.010))
    rng = random.Random(seed)
    nodes: list[GossipNode] = []
    async with trio.open_nursery() as nursery:
        for i in range(n):
            node = GossipNode(
                Identity.generate(),
                network.endpoint(f"10.1.{i // 250}.{i % 250}:31337"),
                config=config,
                rng=random.Random(rng.random()),
                clock=lambda: WALL0 + trio.current_time(),
            )
            await nursery.start(node.run, [rng.choice(nodes).address] if nodes else [])
            nodes.append(node)
        everyone = {node.peer_id for node in nodes}
        elapsed = await _until(
            lambda: all({r.record.peer_id for r in node.view()} == everyone for node in nodes)
        )
        nursery.cancel_scope.cancel()
    return elapsed


def cold_start(n: int, config: GossipConfig, seed: int) -> float:
    return trio.run(
        _cold_start, n, config, seed, clock=trio.testing.MockClock(autojump_threshold=0)
    )


def measure(n: int, config: GossipConfig, seed: int, detect: bool = True) -> dict:
    t0 = time.perf_counter()
    result = trio.run(
        _scenario, n, config, seed, detect, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    result["converge_rounds"] = result["converge_s"] / config.probe_interval
    result["cpu_s"] = time.perf_counter() - t0
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,500", help="comma-separated swarm sizes")
    ap.add_argument("--preset", choices=("lan", "wan", "local"), default="lan")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="swarms of 10 and 100 only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sizes = "10,100"
    config: GossipConfig = getattr(GossipConfig, args.preset)()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = {n: measure(n, config, args.seed) for n in sizes}
    # Probe piggybacking only: gossip rounds pushed past the end of the run.
    baseline_config = config.replace(gossip_interval=1e9)
    baseline = measure(100, baseline_config, args.seed, detect=False)
    ours_100 = rows[100] if 100 in rows else measure(100, config, args.seed)
    ratio = baseline["converge_s"] / ours_100["converge_s"]

    out: dict = {"preset": args.preset, "probe_interval_s": config.probe_interval}
    for n, row in rows.items():
        for key, value in row.items():
            out[f"{key}_{n}"] = round(value, 4)
    out["baseline_converge_rounds_100"] = round(baseline["converge_rounds"], 4)
    out["baseline_spread_s_100"] = round(baseline["spread_s"], 4)
    out["converge_speedup_vs_probe_only_100"] = round(ratio, 3)
    storm = cold_start(100, config, args.seed)
    out["cold_start_converge_s_100"] = round(storm, 4)
    if args.json:
        print(json.dumps(out))
        return 0

    print(f"preset={args.preset} probe_interval={config.probe_interval}s (virtual time)")
    header = f"{'nodes':>6} {'converge rounds':>16} {'converge s':>11} {'spread s':>9} {'B/node/s':>10} {'detect dead s':>14} {'cpu s':>7}"
    print(header)
    for n, row in rows.items():
        print(
            f"{n:>6} {row['converge_rounds']:>16.1f} {row['converge_s']:>11.2f} {row['spread_s']:>9.2f}"
            f" {row['bytes_per_node_s']:>10.0f} {row['detect_dead_s']:>14.2f} {row['cpu_s']:>7.1f}"
        )
    print(
        f"baseline (100 nodes, probe piggyback only): converge {baseline['converge_rounds']:.1f} rounds,"
        f" spread {baseline['spread_s']:.2f} s"
    )
    print(f"convergence speed-up of gossip rounds at 100 nodes: {ratio:.2f}x")
    print(
        f"cold start, 100 nodes joining back to back: converged {storm:.2f} s"
        f" ({storm / config.probe_interval:.1f} rounds) after the last join"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
