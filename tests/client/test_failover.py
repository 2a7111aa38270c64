"""Servers failing in the middle of a generation: the client re-routes,
replays the history into new servers and produces exactly the tokens of a
run without failures.

One server holds blocks [0:4), replicas hold [4:8). Each test kills, stops
or upsets whichever replica its session uses and checks the tokens against
the local model's greedy run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

import libpipe
from libpipe.client import RetryPolicy, SamplingConfig
from libpipe.errors import RetriesExhaustedError
from libpipe.server import ServerProcess

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
NEW_TOKENS = 32
FAIL_AFTER = 10  # tokens generated before the fault
FAST = ["--throughput", "1000,20000"]  # preferred by routing
SLOW = ["--throughput", "50,1000"]


class Swarm:
    """[0:4) on one server; [4:8) on three slow replicas that drain quickly
    and one fast replica that ends sessions idle for 2 s. All start at once;
    each test picks replicas still alive (earlier tests kill some)."""

    def __init__(self, servers: list[ServerProcess]) -> None:
        self.front, *rest = servers
        self.replicas, self.impatient = rest[:-1], rest[-1]

    def alive(self, n: int) -> list[ServerProcess]:
        live = [s for s in self.replicas if s.returncode is None]
        assert len(live) >= n, "earlier tests took too many replicas down"
        return live[:n]

    def by_peer(self, peer_id: str) -> ServerProcess:
        return next(s for s in [*self.replicas, self.impatient] if s.peer_id == peer_id)


@pytest.fixture(scope="module")
def swarm(spawn) -> Swarm:
    replica = ((4, 8), ["--drain-grace", "0.5", *SLOW])
    return Swarm(
        spawn([((0, 4), ()), replica, replica, replica, ((4, 8), [*FAST, "--idle-timeout", "2"])])
    )


def tail_peer(client: libpipe.Client) -> str:
    """The server computing blocks 4.. for the running generation."""
    return next(h.peer_id for h in client.last_route if h.start == 4)


async def generate_with_fault(
    client: libpipe.Client,
    fault: Callable[[str], object],
    *,
    pause: float = 0.0,
    **sampling: Any,
) -> tuple[list[int], str, str]:
    """Generate; after FAIL_AFTER tokens apply ``fault`` to the tail server.
    Returns the tokens and the tail servers before and after."""
    tokens: list[int] = []
    before = ""
    stream = client.stream(PROMPT, max_new_tokens=NEW_TOKENS, stop_tokens=(), **sampling)
    async for token in stream:
        tokens.append(token)
        if len(tokens) == FAIL_AFTER:
            before = tail_peer(client)
            fault(before)
            await trio.sleep(pause)
    return tokens, before, tail_peer(client)


async def test_kill_9_mid_generation(model_dir, swarm, local_model):
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    peers = [swarm.front.address] + [s.address for s in swarm.alive(2)]
    async with libpipe.Client(model_dir, peers, insecure=True) as client:
        tokens, before, after = await generate_with_fault(
            client, lambda peer: swarm.by_peer(peer).kill()
        )
        assert client.view.ban_reason(before) is not None
    assert tokens == expected
    assert after != before


async def test_sigterm_mid_generation(model_dir, swarm, local_model):
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    peers = [swarm.front.address] + [s.address for s in swarm.alive(2)]
    async with libpipe.Client(model_dir, peers, insecure=True) as client:
        # The pause outlasts the drain grace: the draining server ends our
        # session with DrainingError at the next step, or has exited.
        tokens, before, after = await generate_with_fault(
            client, lambda peer: swarm.by_peer(peer).terminate(), pause=1.5
        )
    assert tokens == expected
    assert after != before
    assert swarm.by_peer(before).wait(timeout=30) == 0


async def test_server_returning_an_error_mid_generation(model_dir, swarm, local_model):
    """The preferred replica ends sessions idle for 2 s: a pause in the
    generation makes it answer the next step with SessionError. Sampled,
    so that the failover must not draw from the generator either."""
    (steady,) = swarm.alive(1)
    peers = [swarm.front.address, swarm.impatient.address, steady.address]
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 17}
    expected = local_model.sample(PROMPT, NEW_TOKENS, SamplingConfig(**sampling))
    async with libpipe.Client(model_dir, peers, insecure=True) as client:
        tokens, _, after = await generate_with_fault(
            client, lambda peer: None, pause=4.0, **sampling
        )
        assert "idle" in (client.view.ban_reason(swarm.impatient.peer_id) or "")
    assert after == steady.peer_id
    assert swarm.impatient.returncode is None  # it failed our session, not itself
    assert tokens == expected


async def test_retries_exhausted_names_the_failures(model_dir, swarm):
    (server,) = swarm.alive(1)
    peers = [swarm.front.address, server.address]
    policy = RetryPolicy(max_failures=2, backoff_base=0.01)
    async with libpipe.Client(model_dir, peers, insecure=True, retry=policy) as client:
        async with client.inference_session(max_length=64) as session:
            await session.step(PROMPT)
            server.kill()
            with pytest.raises(RetriesExhaustedError) as caught:
                await session.step([1])
    message = str(caught.value)
    assert server.peer_id[:12] in message
    assert len(caught.value.details["failures"]) == 3
