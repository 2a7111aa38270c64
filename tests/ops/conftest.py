"""Gossip-only swarms on 127.0.0.1 for the operator tools (no model needed)."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import pytest
import trio

from libpipe.net import ConnectionPool, Identity, Message, Router, Security, SwarmCA, serve
from libpipe.swarm import GossipConfig, GossipNode, RecordState, RpcTransport, ServerRecord

# Real seconds here: fast timers keep death detection within a few seconds,
# yet a probe gets 250 ms, so that a machine busy with Chromium and other
# tests does not make live nodes look dead.
FAST = GossipConfig.local().replace(
    probe_interval=0.5, probe_timeout=0.25, gossip_interval=0.05, request_timeout=1.0
)
MODEL = "test/llama-12"


def make_record(span: tuple[int, int], identity: Identity | None = None, **changes) -> ServerRecord:
    """A record of ``MODEL`` for tests that need no node behind it."""
    identity = identity if identity is not None else Identity.generate()
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key_bytes,
        addresses=("127.0.0.1:9",),
        model_id=MODEL,
        span=span,
        dtype="float32",
        version="",
        throughput_decode=10.0,
        throughput_forward=100.0,
        free_cache_bytes=0,
        active_sessions=0,
        state=RecordState.ONLINE,
        incarnation=1,
        timestamp=1.0,
    )
    fields.update(changes)
    return ServerRecord(**fields)


@dataclass
class LiveNode:
    node: GossipNode
    scope: trio.CancelScope

    @property
    def address(self) -> str:
        return self.node.address

    def kill(self) -> None:
        self.scope.cancel()


class LiveSwarm:
    """Gossip nodes as servers embed them, each on its own listener."""

    def __init__(self, nursery: trio.Nursery, security_for) -> None:
        self.nursery = nursery
        self.security_for = security_for
        self.nodes: list[LiveNode] = []

    async def add(
        self,
        span: tuple[int, int],
        *,
        state: RecordState = RecordState.ONLINE,
        throughput: float = 20.0,
        model_id: str = MODEL,
        num_blocks: int = 12,
        info_blocks: int | None = None,
    ) -> LiveNode:
        """A gossip node; with ``info_blocks`` it also answers ``info`` as a
        block server does (reporting that model size)."""
        security = self.security_for(len(self.nodes))
        router = Router()
        if info_blocks is not None:

            async def info(context, message):
                return Message({"num_blocks": info_blocks})

            router.unary("info", info)
        scope = trio.CancelScope()
        holder: dict[str, GossipNode] = {}
        bootstrap = [self.nodes[0].address] if self.nodes else []
        seed = len(self.nodes)

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                async with (
                    ConnectionPool(security, router=router) as pool,
                    trio.open_nursery() as inner,
                ):
                    host, port = await inner.start(
                        functools.partial(
                            serve, router, host="127.0.0.1", port=0, security=security
                        )
                    )
                    node = GossipNode(
                        security.identity,
                        RpcTransport(router, pool, f"{host}:{port}"),
                        model_id=model_id,
                        span=span,
                        num_blocks=num_blocks,
                        state=state,
                        config=FAST,
                        rng=random.Random(seed),
                    )
                    node.update_local_record(
                        throughput_decode=throughput,
                        throughput_forward=throughput * 40,
                        free_cache_bytes=3 << 30,
                        active_sessions=seed % 3,
                    )
                    holder["node"] = node
                    await inner.start(node.run, bootstrap)
                    task_status.started()

        await self.nursery.start(run)
        live = LiveNode(holder["node"], scope)
        self.nodes.append(live)
        return live

    def alive(self) -> list[LiveNode]:
        return [n for n in self.nodes if not n.scope.cancel_called]

    async def converge(self, limit: float = 10.0) -> None:
        """Until every live node sees exactly the live nodes, with current spans."""
        with trio.fail_after(limit):
            while True:
                live = self.alive()
                spans = {n.node.peer_id: n.node.local_record.record.span for n in live}
                views = [{r.record.peer_id: r.record.span for r in n.node.view()} for n in live]
                if all(v == spans for v in views):
                    return
                await trio.sleep(0.05)


@pytest.fixture
async def live_swarm(nursery) -> LiveSwarm:
    return LiveSwarm(nursery, lambda i: Security.insecure())


@pytest.fixture(scope="session")
def swarm_ca() -> SwarmCA:
    return SwarmCA.create()
