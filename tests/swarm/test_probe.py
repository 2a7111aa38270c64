"""The probe round and its shuffled round-robin order."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from libpipe.swarm import MemberState, ProbeOrder, ProbeResult, probe_round


def test_every_member_is_probed_once_per_pass():
    order = ProbeOrder(random.Random(3))
    for i in range(10):
        order.add(f"p{i}")
    for _ in range(3):
        picked = [order.next(lambda p: True) for _ in range(10)]
        assert sorted(picked) == sorted(f"p{i}" for i in range(10))


def test_unprobeable_members_are_skipped_and_empty_order_gives_none():
    order = ProbeOrder(random.Random(0))
    assert order.next(lambda p: True) is None
    for name in "abc":
        order.add(name)
    assert {order.next(lambda p: p != "b") for _ in range(6)} == {"a", "c"}
    assert order.next(lambda p: False) is None


def test_removal_keeps_the_pass_intact():
    order = ProbeOrder(random.Random(1))
    for name in "abcde":
        order.add(name)
    first = order.next(lambda p: True)
    order.remove(first)
    rest = [order.next(lambda p: True) for _ in range(4)]
    assert sorted(rest) == sorted(set("abcde") - {first})


@pytest.mark.parametrize("size", [10, 500])
def test_sample_is_distinct_and_filtered(size):
    order = ProbeOrder(random.Random(2))
    for i in range(size):
        order.add(f"p{i}")
    picked = order.sample(3, lambda p: p != "p1")
    assert len(picked) == 3 == len(set(picked)) and "p1" not in picked


@pytest.fixture
def slow_rounds(config):
    # Background rounds far apart, so the test's own calls decide what is probed.
    return config.replace(probe_interval=1000.0, push_pull_interval=1000.0, gossip_interval=1000.0)


async def probe_all(node) -> Counter:
    return Counter([await probe_round(node) for _ in range(len(node.probe_order))])


async def test_healthy_members_ack_directly(autojump_clock, swarm, slow_rounds):
    swarm.config = slow_rounds
    a, _, _ = await swarm.add(3)
    assert await probe_all(a) == {ProbeResult.ACK: 2}


async def test_member_behind_a_cut_link_is_reached_indirectly(
    autojump_clock, swarm, network, slow_rounds
):
    swarm.config = slow_rounds
    a, b, _ = await swarm.add(3)
    network.cut(a.address, b.address)
    assert await probe_all(a) == {ProbeResult.ACK: 1, ProbeResult.INDIRECT_ACK: 1}
    assert a.members[b.peer_id].state is MemberState.ALIVE


async def test_unreachable_member_is_suspected(autojump_clock, swarm, slow_rounds):
    swarm.config = slow_rounds
    a, b, _ = await swarm.add(3)
    swarm.kill(b)
    assert await probe_all(a) == {ProbeResult.ACK: 1, ProbeResult.SUSPECTED: 1}
    assert a.members[b.peer_id].state is MemberState.SUSPECT


async def test_lone_node_has_nobody_to_probe(autojump_clock, swarm):
    (a,) = await swarm.add(1)
    assert await probe_round(a) is ProbeResult.IDLE
