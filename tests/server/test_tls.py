"""A server started with a swarm identity (`--identity DIR`) admits its swarm only."""

from __future__ import annotations

import pytest
import trio

from libpipe.errors import AuthenticationError
from libpipe.net import ConnectionPool, Security, SwarmCA
from libpipe.server import BlockServer


async def test_a_server_with_a_swarm_identity_admits_only_its_swarm(gqa, make_config, tmp_path):
    ca = SwarmCA.create()
    ca.issue("server").save(tmp_path / "server-id")
    # What the CLI does with --identity DIR.
    security = Security.from_options(identity=tmp_path / "server-id")
    server = BlockServer(make_config(gqa, (0, 2)), security)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.run)
        async with ConnectionPool(Security.tls(ca.issue("client"))) as pool:
            conn = await pool.get(address, expected_peer_id=server.peer_id)
            assert (await conn.call("info")).meta["peer_id"] == server.peer_id
        async with ConnectionPool(Security.tls(SwarmCA.create().issue("stranger"))) as pool:
            with pytest.raises(AuthenticationError):
                await pool.get(address)
        nursery.cancel_scope.cancel()
