"""Servers gossip signed records of themselves: span, throughput, load, state."""

from __future__ import annotations

import time

import pytest
import trio

from libpipe.errors import ConnectionBrokenError
from libpipe.net import Security
from libpipe.server import BlockServer, _gossip as server_gossip
from libpipe.swarm import RecordState, verified_records

from .conftest import running_servers


async def wait_until(predicate, limit: float = 30.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.05)


def records(server) -> dict:
    return {r.record.peer_id: r.record for r in server.node.view()}


async def test_three_servers_with_peers_see_each_others_records(gqa, make_config):
    lone = make_config(gqa, (0, 3), record_interval=0.1)
    async with running_servers([lone]) as (servers, pool):
        first = servers[0]
        # The others join through the first, which was started without --peers.
        configs = [
            make_config(gqa, (3, 5), peers=(first.address,), record_interval=0.1),
            make_config(gqa, (5, 8), peers=(first.address,), record_interval=0.1),
        ]
        async with running_servers(configs) as (others, _):
            everyone = [first, *others]
            ids = {s.peer_id for s in everyone}
            # A server announces itself joining before online: wait for the latter.
            await wait_until(
                lambda: all(
                    set(records(s)) == ids
                    and all(r.state is RecordState.ONLINE for r in records(s).values())
                    for s in everyone
                )
            )
            view = records(others[1])
            for server in everyone:
                record = view[server.peer_id]
                assert record.span == server.config.blocks
                assert record.addresses == (server.address,)
                assert record.state is RecordState.ONLINE
                assert record.throughput_decode == 100.0
                assert record.dtype == "float32"
                assert record.free_cache_bytes == server.config.cache_bytes

            # Load is re-announced: a session on the first server shows up elsewhere.
            conn = await pool.get(first.address)
            meta = {"start": 0, "end": 3, "batch": 1, "max_length": 16}
            async with conn.open_stream("inference", meta) as stream:
                await stream.receive()
                await wait_until(
                    lambda: (
                        records(others[0])[first.peer_id].active_sessions == 1
                        and records(others[0])[first.peer_id].free_cache_bytes
                        < first.config.cache_bytes
                    )
                )
                await stream.close_send()

            # A client learns every server from any one of them.
            reply = await conn.call("swarm.view", {})
            learned = verified_records(
                reply.meta["records"], now=time.time(), ttl=60.0, max_skew=60.0
            )
            assert {r.record.peer_id for r in learned} == ids

            # Draining is announced at once.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(others[1].drain)
                await wait_until(
                    lambda: (
                        records(first).get(others[1].peer_id) is None
                        or records(first)[others[1].peer_id].state is RecordState.DRAINING
                    )
                )


async def test_a_failing_gossip_node_is_restarted_and_the_server_keeps_serving(
    gqa, make_config, monkeypatch, caplog
):
    monkeypatch.setattr(server_gossip, "REJOIN_DELAY", 0.05)
    async with running_servers([make_config(gqa, (0, 4))]) as (servers, pool):
        first = servers[0]
        async with running_servers([make_config(gqa, (4, 8), peers=(first.address,))]) as (
            others,
            _,
        ):
            second = others[0]
            await wait_until(lambda: len(records(second)) == 2)
            transport = second.node.transport
            real = transport.request

            async def broken(*args, **kwargs):
                transport.request = real  # fail once
                raise RuntimeError("a bug in gossip")

            transport.request = broken
            await wait_until(lambda: "gossip failed; rejoining" in caplog.text)
            await wait_until(lambda: second.node._nursery is not None)
            conn = await pool.get(second.address)
            assert (await conn.call("info")).meta["state"] == "online"
            await wait_until(lambda: len(records(second)) == 2 and len(records(first)) == 2)


async def test_a_server_whose_peers_do_not_answer_does_not_start(gqa, make_config):
    server = BlockServer(make_config(gqa, (0, 4), peers=("127.0.0.1:9",)), Security.insecure())
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConnectionBrokenError, match="no bootstrap peer"):
            await nursery.start(server.run)


async def test_the_announced_address_is_the_one_gossiped(gqa, make_config):
    config = make_config(gqa, (0, 4), announce_address="203.0.113.7:31337")
    async with running_servers([config]) as (servers, _):
        server = servers[0]
        assert server.address == "203.0.113.7:31337"
        assert records(server)[server.peer_id].addresses == ("203.0.113.7:31337",)
