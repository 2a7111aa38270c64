"""Leaving a token stream early: the generation stops, every server frees
the session's cache (``info``'s ``active_sessions`` back to 0) and the
client serves the next call."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

import libpipe
from libpipe.net import ConnectionPool, Security

PROMPT = [5, 6, 7, 8]

# An async generator left unclosed is finalised late by trio, with a
# ResourceWarning (raised inside a finaliser: unraisable). Both fail the test.
pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]


async def wait_until_no_sessions(addresses: list[str]) -> None:
    """Every server reports no open session (they close asynchronously)."""
    async with ConnectionPool(Security.insecure()) as pool:
        for address in addresses:
            connection = await pool.get(address)
            with trio.fail_after(30):
                while (await connection.call("info")).meta["active_sessions"]:
                    await trio.sleep(0.05)


def test_sync_stream_left_early_closes_the_sessions(model_dir, chain, local_model):
    with libpipe.SyncClient(model_dir, chain, insecure=True) as c:
        got = []
        for token in c.stream(PROMPT, max_new_tokens=200, stop_tokens=()):
            got.append(token)
            if len(got) == 3:
                break
        assert got == local_model.greedy(PROMPT, 3)
        trio.run(wait_until_no_sessions, chain)
        assert c.generate(PROMPT, max_new_tokens=4, stop_tokens=()) == local_model.greedy(PROMPT, 4)


def test_sync_stream_closed_by_hand_closes_the_sessions(model_dir, chain, local_model):
    with libpipe.SyncClient(model_dir, chain, insecure=True) as c:
        tokens = c.stream(PROMPT, max_new_tokens=200, stop_tokens=())
        assert next(tokens) == local_model.greedy(PROMPT, 1)[0]
        tokens.close()
        trio.run(wait_until_no_sessions, chain)
        assert list(c.stream(PROMPT, max_new_tokens=2, stop_tokens=())) == local_model.greedy(
            PROMPT, 2
        )


async def test_async_stream_left_early_closes_the_sessions(model_dir, chain, local_model):
    async with libpipe.Client(model_dir, chain, insecure=True) as c:
        got = []
        async with aclosing(c.stream(PROMPT, max_new_tokens=200, stop_tokens=())) as tokens:
            async for token in tokens:
                got.append(token)
                if len(got) == 3:
                    break
        assert got == local_model.greedy(PROMPT, 3)
        await wait_until_no_sessions(chain)
        assert await c.generate(PROMPT, max_new_tokens=4, stop_tokens=()) == local_model.greedy(
            PROMPT, 4
        )


async def test_async_stream_cancelled_mid_step_closes_the_sessions(model_dir, chain, local_model):
    async with libpipe.Client(model_dir, chain, insecure=True) as c:
        got: list[int] = []
        with trio.CancelScope() as scope:
            async with aclosing(c.stream(PROMPT, max_new_tokens=200, stop_tokens=())) as tokens:
                async for token in tokens:
                    got.append(token)
                    if len(got) == 2:
                        scope.cancel()  # lands inside the next step's await
        assert scope.cancelled_caught and got == local_model.greedy(PROMPT, 2)
        await wait_until_no_sessions(chain)
        assert await c.generate(PROMPT, max_new_tokens=3, stop_tokens=()) == local_model.greedy(
            PROMPT, 3
        )
