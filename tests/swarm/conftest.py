"""A virtual-time swarm harness: many GossipNodes over one MemoryNetwork."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
from trio.testing import MockClock

from libpipe.net import Identity
from libpipe.swarm import GossipConfig, GossipNode, MemberState, MemoryNetwork

# Wall-clock seconds at virtual time 0: records carry Unix-like stamps.
WALL0 = 1_800_000_000.0


class Swarm:
    """Starts nodes in one nursery, each under its own cancel scope (to kill it)."""

    def __init__(self, nursery: trio.Nursery, network: MemoryNetwork, config: GossipConfig) -> None:
        self.nursery = nursery
        self.network = network
        self.config = config
        self.nodes: list[GossipNode] = []
        self.dead: set[str] = set()
        self._scopes: dict[str, trio.CancelScope] = {}
        self._seed = 0
        # Per-node offset added to the wall clock (to age records for one node).
        self.skew: dict[str, float] = {}

    def make(self, **kwargs) -> GossipNode:
        self._seed += 1
        address = f"node-{self._seed}"
        kwargs.setdefault("model_id", "test/model")
        kwargs.setdefault("span", (0, 4))
        return GossipNode(
            Identity.generate(),
            self.network.endpoint(address),
            config=self.config,
            rng=random.Random(self._seed),
            clock=self._clock(address),
            **kwargs,
        )

    def _clock(self, address: str) -> Callable[[], float]:
        return lambda: WALL0 + trio.current_time() + self.skew.get(address, 0.0)

    async def start(self, node: GossipNode, bootstrap: list[str] | None = None) -> GossipNode:
        scope = trio.CancelScope()
        self._scopes[node.peer_id] = scope

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(bootstrap or [], task_status=task_status)

        await self.nursery.start(run)
        self.nodes.append(node)
        return node

    async def add(self, n: int = 1, *, bootstrap: list[str] | None = None) -> list[GossipNode]:
        """Start n nodes; each joins through the first node (or ``bootstrap``)."""
        started = []
        for _ in range(n):
            peers = (
                bootstrap
                if bootstrap is not None
                else [self.nodes[0].address]
                if self.nodes
                else []
            )
            started.append(await self.start(self.make(), peers))
        return started

    def kill(self, node: GossipNode) -> None:
        self.network.kill(node.address)
        self._scopes[node.peer_id].cancel()
        self.dead.add(node.peer_id)

    def alive(self) -> list[GossipNode]:
        return [n for n in self.nodes if n.peer_id not in self.dead]

    def converged(self) -> bool:
        """Every running node's view is exactly the set of running nodes."""
        expected = {n.peer_id for n in self.alive()}
        return all({r.record.peer_id for r in node.view()} == expected for node in self.alive())

    def all_see(self, peer_id: str, state: MemberState) -> bool:
        """Every other running node holds ``peer_id`` in ``state`` (a reaped
        member counts as dead or left: it was, before it was forgotten)."""
        gone = state in (MemberState.DEAD, MemberState.LEFT)
        for node in self.alive():
            member = node.members.get(peer_id)
            if node.peer_id == peer_id:
                continue
            if (member is None and not gone) or (member is not None and member.state is not state):
                return False
        return True

    async def settle(self) -> float:
        """Wait for convergence, bounded by anti-entropy: news that gossip
        happens to miss (it is sent a bounded number of times) is repaired
        by the next push-pull."""
        limit = self.config.push_pull_period(len(self.nodes)) + 5 * self.config.probe_interval
        return await self.wait_for(self.converged, limit=limit)

    async def wait_for(
        self, predicate: Callable[[], bool], *, limit: float, step: float = 0.1
    ) -> float:
        """Virtual seconds until ``predicate`` holds; fails the test past ``limit``."""
        start = trio.current_time()
        while not predicate():
            if trio.current_time() - start > limit:
                pytest.fail(f"condition not reached within {limit} virtual seconds")
            await trio.sleep(step)
        return trio.current_time() - start


@pytest.fixture
def config() -> GossipConfig:
    return GossipConfig.local()


@pytest.fixture
def network() -> MemoryNetwork:
    return MemoryNetwork(seed=1, latency=(0.001, 0.01))


@pytest.fixture
async def swarm(nursery, network, config) -> Swarm:
    # pytest-trio only installs a clock the *test* asks for, so each swarm
    # test takes ``autojump_clock`` itself; this catches one that forgot.
    if not isinstance(trio.lowlevel.current_clock(), MockClock):
        pytest.fail("swarm tests must request the autojump_clock fixture (virtual time)")
    return Swarm(nursery, network, config)
