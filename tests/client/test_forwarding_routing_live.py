"""Forwarding-aware routing against real servers: the client is far from
every server (a DelayProxy on each of its links) and the servers are near
each other (loopback, measured by their own gossip probes).

W holds all 8 blocks, A [0, 4) and B [4, 8); by what they announce W
computes a block in 2.5 ms, A and B in 1.25 ms (so a route that hands W
some of A's or B's blocks only loses). The client's round trips are 50 ms
to W and 40 ms to A and B. Carrying every hop itself, the client takes W
(50 + 20 = 70 ms a token against 80 + 10 = 90 ms through A and B);
forwarded, client -> A -> B -> client costs 20 + ~0.5 + 20 + 10 ms (and
1.5 ms of message overhead) against W's 71 ms, so it takes A and B. The
tokens are the same either way.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

import libpipe
from libpipe.net import DelayProxy, Security
from libpipe.server import BlockServer, ServerConfig
from libpipe.swarm import GossipConfig, RecordState

PROMPT = [9, 8, 7, 6]
# One-way delays of the client's links, seconds.
FAR_W = 0.025
FAR_AB = 0.020


async def test_forwarding_changes_the_route_not_the_tokens(model_dir, tmp_path, local_model):
    gossip = GossipConfig.local().replace(
        probe_interval=0.1,
        probe_timeout=0.05,
        gossip_interval=0.05,
        request_timeout=2.0,
        # Records re-signed (with fresh round trips) every 0.25-0.5 s; a
        # long TTL so that a loaded machine never lets one expire.
        record_refresh_interval=0.5,
        record_ttl_mult=60.0,
    )

    def config(blocks: tuple[int, int], per_block: float, peers: tuple[str, ...]) -> ServerConfig:
        # Announced decode throughput over the span, from the time a block takes.
        steps = 1.0 / (per_block * (blocks[1] - blocks[0]))
        return ServerConfig(
            model_dir, blocks, throughput=(steps, 4000.0), gossip=gossip, peers=peers,
            cache_dir=tmp_path, progress=False,
        )  # fmt: skip

    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        w = BlockServer(config((0, 8), 0.0025, ()), Security.insecure())
        first = await nursery.start(w.run)
        a = BlockServer(config((0, 4), 0.00125, (first,)), Security.insecure())
        b = BlockServer(config((4, 8), 0.00125, (first,)), Security.insecure())
        await nursery.start(a.run)
        await nursery.start(b.run)
        ids = {s.node.peer_id: name for s, name in ((w, "W"), (a, "A"), (b, "B"))}

        def measured() -> bool:
            """W's view holds every server online, A and B each with a
            round trip to the other."""
            records = {s.record.peer_id: s.record for s in w.node.view()}
            return (
                len(records) == 3
                and all(r.state is RecordState.ONLINE for r in records.values())
                and records[a.node.peer_id].rtt_to(b.node.peer_id) is not None
                and records[b.node.peer_id].rtt_to(a.node.peer_id) is not None
            )

        with trio.fail_after(60):
            while not measured():
                await trio.sleep(0.1)
        # Each server pings the other two every 0.2 s: in a second and a
        # half the records carry the median of five pings, not a first one
        # that a loaded machine may have delayed.
        await trio.sleep(1.5)
        proxies = {
            "W": await stack.enter_async_context(DelayProxy(w.address, delay=FAR_W)),
            "A": await stack.enter_async_context(DelayProxy(a.address, delay=FAR_AB)),
            "B": await stack.enter_async_context(DelayProxy(b.address, delay=FAR_AB)),
        }
        peers = [p.address for p in proxies.values()]
        routes, tokens = {}, {}
        for forwarding in (True, False):
            async with libpipe.Client(
                model_dir, peers, insecure=True, forwarding=forwarding
            ) as client:
                entries = {ids[p]: e for p, e in client.view.servers.items()}
                # The client reaches each server at its proxy, a push goes
                # to the address the servers' probes measured.
                assert {n: e.address for n, e in entries.items()} == {
                    n: p.address for n, p in proxies.items()
                }
                assert entries["B"].push_address == b.address
                tokens[forwarding] = await client.generate(PROMPT, max_new_tokens=4, stop_tokens=())
                routes[forwarding] = [(ids[h.peer_id], h.start, h.end) for h in client.last_route]
                # The pushes went through: B's inputs came from A, not the
                # client (at least once per step; a replay pushes again).
                async with client.inference_session(max_length=16) as session:
                    await session.step(PROMPT)
                    await session.step([2])
                    forwarded = session._remote.forwarded
                    assert forwarded >= 2 if forwarding else forwarded == 0
        nursery.cancel_scope.cancel()
    assert routes == {True: [("A", 0, 4), ("B", 4, 8)], False: [("W", 0, 8)]}
    assert tokens[True] == tokens[False] == local_model.greedy(PROMPT, 4)
