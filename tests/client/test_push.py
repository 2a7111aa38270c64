"""Server-to-server forwarding from the client's side: sessions forward by
default and compute exactly what they compute without it; killing the
hop that pushes mid-generation still gives the tokens of a fault-free run
(killing the hop pushed to is ``test_failover``'s kill, forwarding on)."""

from __future__ import annotations

import libpipe
from libpipe.net import SwarmCA
from libpipe.server import ServerProcess

from .conftest import LocalModel

PROMPT = [7, 3, 9, 1, 4]
NEW_TOKENS = 24
FAIL_AFTER = 8


async def test_forwarded_steps_equal_client_carried_steps(
    model_dir, chain, local_model: LocalModel
):
    async with libpipe.Client(model_dir, chain, insecure=True) as client:
        outs = {}
        for forwarding in (True, False):
            async with client.inference_session(max_length=32) as session:
                remote = session._remote
                remote.forwarding = forwarding
                first = await session.step(PROMPT)
                second = await session.step([2])
                outs[forwarding] = (first, second, remote.forwarded)
    expected = local_model.logits([*PROMPT, 2])
    for forwarding, (first, second, forwarded) in outs.items():
        assert (first[0, -1] - expected[len(PROMPT) - 1]).abs().max() < 1e-4
        assert (second[0, 0] - expected[-1]).abs().max() < 1e-4
        # Three hops: two inputs per step come by push, when forwarding.
        assert forwarded == (4 if forwarding else 0)


async def test_killing_the_pushing_hop_mid_generation(model_dir, spawn, local_model: LocalModel):
    """Two replicas of [0:4), one server of [4:8): kill -9 the replica that
    pushes to [4:8) after a few tokens."""
    servers = spawn([((0, 4), ()), ((0, 4), ()), ((4, 8), ())])
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    by_peer = {s.peer_id: s for s in servers}
    async with libpipe.Client(model_dir, [s.address for s in servers], insecure=True) as client:
        tokens, killed = [], ""
        async for token in client.stream(PROMPT, max_new_tokens=NEW_TOKENS, stop_tokens=()):
            tokens.append(token)
            if len(tokens) == FAIL_AFTER:
                killed = client.last_route[0].peer_id
                by_peer[killed].kill()
        assert client.view.ban_reason(killed) is not None
        assert client.last_route[0].peer_id != killed
    assert tokens == expected


async def test_tls_servers_push_to_each_other(model_dir, cache_dir, tmp_path, local_model):
    """In a private swarm the pushing server dials the next one with its
    own identity and checks the next one's: forwarding works there too."""
    ca = SwarmCA.create()
    for name in ("a", "b", "client"):
        ca.issue(name).save(tmp_path / name)
    common = ["--throughput", "200,4000", "--cache-dir", str(cache_dir), "--log-level", "WARNING"]
    servers = [
        ServerProcess.start(
            model_dir,
            blocks=blocks,
            insecure=False,
            extra_args=["--identity", str(tmp_path / name), *common],
        )
        for blocks, name in (((0, 4), "a"), ((4, 8), "b"))
    ]
    try:
        peers = [s.address for s in servers]
        async with libpipe.Client(model_dir, peers, identity=tmp_path / "client") as client:
            async with client.inference_session(max_length=32) as session:
                logits = await session.step(PROMPT)
                forwarded = session._remote.forwarded
    finally:
        for server in servers:
            server.close()
    assert forwarded == 1
    assert (logits[0, -1] - local_model.logits(PROMPT)[-1]).abs().max() < 1e-4


async def test_a_refused_push_is_carried_by_the_client(model_dir, chain, local_model: LocalModel):
    """The second hop's push token is wrong, so the first hop's push to it
    is refused: the first hop says so and the client sends the second hop
    its input itself; the third hop still gets its input by push."""
    async with libpipe.Client(model_dir, chain, insecure=True) as client:
        async with client.inference_session(max_length=32) as session:
            remote = session._remote
            remote._hops[1].token = "0" * 32
            first = await session.step(PROMPT)
            second = await session.step([2])
            forwarded, failovers = remote.forwarded, remote.failovers
    expected = local_model.logits([*PROMPT, 2])
    assert (first[0, -1] - expected[len(PROMPT) - 1]).abs().max() < 1e-4
    assert (second[0, 0] - expected[-1]).abs().max() < 1e-4
    assert (forwarded, failovers) == (2, 0)
