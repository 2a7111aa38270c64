"""Servers failing in the middle of a generation: the client re-routes,
replays the history into new servers and produces exactly the tokens of a
run without failures.

One server holds blocks [0:4); replicas of [4:8) come and go. Each test
kills, stops or upsets whichever replica its session uses and checks the
tokens against the local model's greedy run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import libpipe
from libpipe.client import RetryPolicy
from libpipe.errors import RetriesExhaustedError
from libpipe.server import ServerProcess

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
NEW_TOKENS = 32
FAIL_AFTER = 10  # tokens generated before the fault
FAST = ["--throughput", "1000,20000"]  # preferred by routing
SLOW = ["--throughput", "50,1000"]


class Replicas:
    """Live replicas of [4:8), topped up on demand."""

    def __init__(self, spawn: Callable[..., list[ServerProcess]]) -> None:
        self.spawn = spawn
        self.live: list[ServerProcess] = []

    def ensure(self, n: int, extra: list[str]) -> list[ServerProcess]:
        self.live = [s for s in self.live if s.returncode is None]
        missing = n - len(self.live)
        if missing > 0:
            self.live += self.spawn([((4, 8), extra)] * missing)
        return self.live[:n]

    def by_peer(self, peer_id: str) -> ServerProcess:
        return next(s for s in self.live if s.peer_id == peer_id)


@pytest.fixture(scope="module")
def front(spawn) -> ServerProcess:
    return spawn([((0, 4), ())])[0]


@pytest.fixture(scope="module")
def replicas(spawn) -> Replicas:
    return Replicas(spawn)


def tail_peer(client: libpipe.Client) -> str:
    """The server computing blocks 4.. for the running generation."""
    return next(h.peer_id for h in client.last_route if h.start == 4)


async def generate_with_fault(
    client: libpipe.Client, fault: Callable[[str], object], *, pause: float = 0.0
) -> tuple[list[int], str, str]:
    """Generate; after FAIL_AFTER tokens apply ``fault`` to the tail server.
    Returns the tokens and the tail servers before and after."""
    tokens: list[int] = []
    before = ""
    async for token in client.stream(PROMPT, max_new_tokens=NEW_TOKENS, stop_tokens=()):
        tokens.append(token)
        if len(tokens) == FAIL_AFTER:
            before = tail_peer(client)
            fault(before)
            await trio.sleep(pause)
    return tokens, before, tail_peer(client)


async def test_kill_9_mid_generation(model_dir, front, replicas, local_model):
    servers = replicas.ensure(2, ["--drain-grace", "0.5", *SLOW])
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    peers = [front.address] + [s.address for s in servers]
    async with libpipe.Client(model_dir, peers, insecure=True) as client:
        tokens, before, after = await generate_with_fault(
            client, lambda peer: replicas.by_peer(peer).kill()
        )
        assert client.view.ban_reason(before) is not None
    assert tokens == expected
    assert after != before


async def test_sigterm_mid_generation(model_dir, front, replicas, local_model):
    servers = replicas.ensure(2, ["--drain-grace", "0.5", *SLOW])
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    peers = [front.address] + [s.address for s in servers]
    async with libpipe.Client(model_dir, peers, insecure=True) as client:
        # The pause outlasts the drain grace: the draining server ends our
        # session with DrainingError at the next step, or has exited.
        tokens, before, after = await generate_with_fault(
            client, lambda peer: replicas.by_peer(peer).terminate(), pause=1.5
        )
    assert tokens == expected
    assert after != before
    assert replicas.by_peer(before).wait(timeout=30) == 0


async def test_server_returning_an_error_mid_generation(
    model_dir, front, replicas, spawn, local_model
):
    """The preferred replica ends idle sessions after 1 s: a pause in the
    generation makes it answer the next step with SessionError."""
    (impatient,) = spawn([((4, 8), [*FAST, "--idle-timeout", "1"])])
    (steady,) = replicas.ensure(1, SLOW)
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    peers = [front.address, impatient.address, steady.address]
    async with libpipe.Client(model_dir, peers, insecure=True) as client:
        tokens, before, after = await generate_with_fault(client, lambda peer: None, pause=3.0)
        assert client.view.ban_reason(impatient.peer_id) is not None
    assert before == impatient.peer_id
    assert after == steady.peer_id
    assert impatient.returncode is None  # it failed our session, not itself
    assert tokens == expected
    impatient.close()


async def test_retries_exhausted_names_the_failures(model_dir, front, replicas):
    (server,) = replicas.ensure(1, SLOW)
    peers = [front.address, server.address]
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
