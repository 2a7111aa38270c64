"""Gossip over the real RPC stack: a handful of nodes on 127.0.0.1, real time."""

from __future__ import annotations

import functools
import logging
import random

import pytest
import trio

from libpipe.errors import ConfigError, ConnectionClosedError
from libpipe.net import ConnectionPool, Identity, Router, Security, serve
from libpipe.swarm import GossipConfig, GossipNode, MemberState, RecordState, RpcTransport

# Fast timers: real seconds here, so the test stays short.
FAST = GossipConfig.local().replace(
    probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, request_timeout=1.0
)


async def start_node(nursery: trio.Nursery, bootstrap: list[str], seed: int):
    """A node as a server embeds it: one router and pool for everything."""
    identity = Identity.generate()
    security = Security.insecure(identity)
    router = Router()
    scope = trio.CancelScope()
    holder: dict = {}

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            async with (
                ConnectionPool(security, router=router) as pool,
                trio.open_nursery() as inner,
            ):
                host, port = await inner.start(
                    functools.partial(serve, router, host="127.0.0.1", port=0, security=security)
                )
                transport = RpcTransport(router, pool, f"{host}:{port}")
                node = GossipNode(
                    identity, transport, model_id="m", config=FAST, rng=random.Random(seed)
                )
                holder["node"] = node
                await inner.start(node.run, bootstrap)
                task_status.started()

    await nursery.start(run)
    return holder["node"], scope


def views(nodes) -> list[set[str]]:
    return [{r.record.peer_id for r in n.view()} for n in nodes]


async def wait_until(predicate, limit: float) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.05)


@pytest.mark.slow
async def test_gossip_over_rpc_converges_spreads_and_detects(nursery):
    first, _ = await start_node(nursery, [], 0)
    started = [await start_node(nursery, [first.address], seed) for seed in range(1, 5)]
    nodes = [first] + [node for node, _ in started]
    everyone = {n.peer_id for n in nodes}
    await wait_until(lambda: all(v == everyone for v in views(nodes)), limit=10)

    nodes[2].update_local_record(span=(3, 9), state=RecordState.ONLINE)
    await wait_until(
        lambda: all(n.members[nodes[2].peer_id].record.record.span == (3, 9) for n in nodes),
        limit=5,
    )

    victim, victim_scope = started[-1]
    victim_scope.cancel()
    alive = nodes[:-1]
    await wait_until(
        lambda: all(n.members[victim.peer_id].state is MemberState.DEAD for n in alive), limit=15
    )
    assert all(v == everyone - {victim.peer_id} for v in views(alive))


async def test_one_transport_serves_one_node(nursery):
    router = Router()
    security = Security.insecure()
    async with ConnectionPool(security, router=router) as pool:
        transport = RpcTransport(router, pool, "127.0.0.1:1")

        async def handler(method, body):
            return None

        await nursery.start(transport.serve, handler)
        with pytest.raises(ConfigError):
            await transport.serve(handler)
        nursery.cancel_scope.cancel()


async def test_a_stopped_node_drops_news_quietly_and_refuses_requests(nursery, caplog):
    """Peers gossip to a node until they learn it stopped: its router (which
    outlives it while the server drains) drops that news with a debug line,
    not an error with a traceback; a request still gets a typed error."""
    router = Router()
    security = Security.insecure()
    caplog.set_level(logging.DEBUG)
    async with (
        ConnectionPool(security, router=router) as server_pool,
        ConnectionPool(Security.insecure()) as client_pool,
    ):
        host, port = await nursery.start(
            functools.partial(serve, router, host="127.0.0.1", port=0, security=security)
        )
        RpcTransport(router, server_pool, f"{host}:{port}")
        connection = await client_pool.get(f"{host}:{port}")
        await connection.notify("swarm.gossip", {"news": []})
        with pytest.raises(ConnectionClosedError, match="gossip is not running"):
            await connection.call("swarm.ping", {})
        await wait_until(lambda: "dropped swarm.gossip" in caplog.text, limit=5)
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        nursery.cancel_scope.cancel()
