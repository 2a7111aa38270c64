"""A server whose ban ran out is not routed to again until it answers a
probe: a hung server (open connection, no answers) would otherwise cost a
whole step timeout at the end of every ban. No sockets: a fake pool whose
servers answer a ping or stay silent, on trio's mock clock."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import trio

import libpipe
from libpipe.client import RetryPolicy, SwarmView
from libpipe.client._context import SwarmContext
from libpipe.client._failover import FailureLedger
from libpipe.client._routing import plan_route
from libpipe.client._view import BAN_BASE
from libpipe.errors import NoRouteError

from .test_view_and_routing import MODEL, info

POLICY = RetryPolicy(connect_timeout=2.0, step_timeout=60.0, max_failures=2)


class FakeConnection:
    def __init__(self, pool: FakePool, address: str) -> None:
        self._pool, self._address = pool, address

    async def call(self, method: str, **_: Any) -> None:
        assert method == "ping"
        self._pool.pings.append(self._address)
        if self._address in self._pool.hung:
            await trio.sleep_forever()


class FakePool:
    """Connections that answer a ping at once, or never (``hung``)."""

    def __init__(self) -> None:
        self.hung: set[str] = set()
        self.pings: list[str] = []

    async def get(self, address: str, expected_peer_id: str | None = None) -> FakeConnection:
        return FakeConnection(self, address)


def make_view() -> SwarmView:
    view = SwarmView(
        model_id=MODEL, num_blocks=8, kv_values_per_token_block=128, clock=trio.current_time
    )
    view.merge_info("h:a", info("a", (0, 8)))
    view.merge_info("h:b", info("b", (0, 8)))
    return view


def make_context(view: SwarmView, pool: FakePool) -> SwarmContext:
    return SwarmContext(
        view=view,
        pool=pool,  # type: ignore[arg-type]
        peers=(),
        policy=POLICY,
        wire_dtype=torch.float32,
        num_blocks=8,
        hidden_size=16,
        rng=random.Random(0),
    )


def routable(view: SwarmView) -> list[str]:
    return [e.peer_id for e in view.routable()]


async def test_a_ban_running_out_puts_the_server_on_probation(autojump_clock):
    view = make_view()
    view.ban("b", "step timed out")
    assert view.is_banned("b") and routable(view) == ["a"]
    await trio.sleep(BAN_BASE + 0.1)
    assert not view.is_banned("b")
    assert view.on_probation("b") and routable(view) == ["a"]
    # Routes keep avoiding it, however long nobody asks it.
    await trio.sleep(100 * BAN_BASE)
    assert [h.peer_id for h in plan_route(view, start=0, end=8)] == ["a"]


async def test_silence_on_probation_bans_again_for_twice_as_long(autojump_clock):
    view, pool = make_view(), FakePool()
    pool.hung.add("h:b")
    view.ban("b", "step timed out")
    await trio.sleep(BAN_BASE + 0.1)
    began = trio.current_time()
    await view.probe_all(pool, timeout=POLICY.connect_timeout)  # type: ignore[arg-type]
    # The hung server cost one ping's timeout, not a step's.
    assert trio.current_time() - began == pytest.approx(POLICY.connect_timeout)
    assert view.is_banned("b") and "ping failed" in (view.ban_reason("b") or "")
    assert routable(view) == ["a"]
    await trio.sleep(BAN_BASE + 0.1)
    assert view.is_banned("b")  # the second ban is twice as long
    await trio.sleep(BAN_BASE)
    assert view.on_probation("b")


async def test_an_answer_on_probation_makes_the_server_routable(autojump_clock):
    view, pool = make_view(), FakePool()
    view.ban("b", "step timed out")
    await trio.sleep(BAN_BASE + 0.1)
    await view.probe_all(pool, timeout=POLICY.connect_timeout)  # type: ignore[arg-type]
    assert sorted(pool.pings) == ["h:a", "h:b"]
    assert not view.on_probation("b") and routable(view) == ["a", "b"]
    # The ping ended the probation, not the failures in a row: a server
    # that answers pings but fails steps is banned longer each time...
    assert view.ban("b", "step timed out again") == 2 * BAN_BASE
    # ...until it serves work, which forgives them.
    view.answered("b")
    assert view.ban_reason("b") is None and view.ban("b", "down") == BAN_BASE


async def test_a_probe_while_the_ban_runs_does_not_shorten_it(autojump_clock):
    view = make_view()
    view.ban("b", "step timed out")
    view.probed("b")  # e.g. its info answered a refresh during the ban
    await trio.sleep(BAN_BASE + 0.1)
    assert view.on_probation("b")


async def test_no_route_without_a_server_on_probation_names_it(autojump_clock):
    view = make_view()
    for peer in ("a", "b"):
        view.ban(peer, "step timed out")
    await trio.sleep(BAN_BASE + 0.1)
    with pytest.raises(NoRouteError) as caught:
        plan_route(view, start=0, end=8)
    assert "2 ban(s) over, awaiting a probe's answer" in str(caught.value)
    assert caught.value.details["missing_blocks"] == [[0, 8]]


async def test_planning_with_no_other_route_probes_and_takes_the_one_that_answers(
    autojump_clock,
):
    view, pool = make_view(), FakePool()
    pool.hung.add("h:a")
    for peer in ("a", "b"):
        view.ban(peer, "step timed out")
    await trio.sleep(BAN_BASE + 0.1)
    ctx = make_context(view, pool)
    hops = await ctx.plan(FailureLedger(POLICY, "test"), start=0, end=8)
    assert [h.peer_id for h in hops] == ["b"]
    assert view.is_banned("a")


async def test_planning_with_every_server_hung_ends_in_no_route(autojump_clock):
    view, pool = make_view(), FakePool()
    pool.hung.update({"h:a", "h:b"})
    for peer in ("a", "b"):
        view.ban(peer, "step timed out")
    await trio.sleep(BAN_BASE + 0.1)
    ctx = make_context(view, pool)
    with pytest.raises(NoRouteError) as caught:
        await ctx.plan(FailureLedger(POLICY, "test"), start=0, end=8)
    assert caught.value.details["missing_blocks"] == [[0, 8]]
    # Never routed to: each was only pinged, once per refresh that found
    # its ban over.
    assert sorted(pool.pings) == ["h:a", "h:b"]


async def test_a_session_open_is_a_probe_and_only_a_step_forgives(model_dir, chain):
    """A server with a stuck device may still open sessions: opening one
    ends its probation but keeps its failures in a row; the first step it
    answers forgives them."""
    async with libpipe.Client(model_dir, chain, insecure=True) as client:
        view = client.view
        first = next(e for e in view.routable() if e.span[0] == 0).peer_id
        view.ban(first, "test")
        view.ban(first, "test")
        view._bans[first].until = view._clock() - 1  # the ban ran out
        view.probed(first)  # and a probe answered: routable on probation's end
        async with client.inference_session(max_length=8) as session:
            assert view._bans[first].failures == 2  # opened, nothing served yet
            await session.step([4, 8, 15, 16])
            assert first not in view._bans
