"""Leaving a token stream early: the generation stops, every server frees
the session's cache (``info``'s ``active_sessions`` back to 0) and the
client serves the next call."""

from __future__ import annotations

import os
import signal
import threading
import time
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


class Interrupted(Exception):
    """Stands in for KeyboardInterrupt (which would stop pytest itself)."""


@pytest.fixture
def interrupt_when():
    """``interrupt_when(ready)``: raise ``Interrupted`` in this (the main)
    thread once ``ready()`` is true, as Ctrl-C would, while it blocks."""
    previous = signal.signal(signal.SIGUSR1, _raise_interrupted)
    watchers: list[threading.Thread] = []

    def arm(ready) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 60
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGUSR1)

        watcher = threading.Thread(target=watch, daemon=True)
        watchers.append(watcher)
        watcher.start()

    yield arm
    for watcher in watchers:
        watcher.join()
    signal.signal(signal.SIGUSR1, previous)


def _raise_interrupted(signum, frame):
    raise Interrupted


def test_an_interrupted_blocking_call_is_cancelled_before_it_returns(model_dir, interrupt_when):
    started, ended = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    with libpipe.SyncClient(model_dir, ["127.0.0.1:9"], insecure=True) as c:
        interrupt_when(started.is_set)
        with pytest.raises(Interrupted):
            c._run(forever)
        assert ended.is_set()  # cancelled and finished, not left running


def test_an_interrupted_generate_closes_its_sessions(model_dir, chain, local_model, interrupt_when):
    with libpipe.SyncClient(model_dir, chain, insecure=True) as c:
        interrupt_when(lambda: bool(c.last_route))  # after the first token
        with pytest.raises(Interrupted):
            c.generate(PROMPT, max_new_tokens=4000, stop_tokens=())
        trio.run(wait_until_no_sessions, chain)
        assert c.generate(PROMPT, max_new_tokens=3, stop_tokens=()) == local_model.greedy(PROMPT, 3)
