"""Round trips to peers: smoothed from the probes, published in the record."""

from __future__ import annotations

import pytest
import trio

from libpipe.swarm import MemberState, MemoryNetwork
from libpipe.swarm._record import MAX_PEER_RTT_US, PEER_RTT_PREFIX
from libpipe.swarm._rtt import RTT_WINDOW, PeerRtts


def test_a_figure_is_the_median_of_the_last_pings_per_peer():
    rtts = PeerRtts()
    rtts.observe("a", 0.001)
    rtts.observe("b", 0.050)
    assert rtts.get("a") == 0.001
    # Two spikes in five pings leave the figure where the link is.
    for seconds in (0.040, 0.001, 0.030, 0.002):
        rtts.observe("a", seconds)
    assert rtts.get("a") == 0.002
    # A real change takes over once it is most of the window.
    for _ in range(RTT_WINDOW // 2 + 1):
        rtts.observe("a", 0.020)
    assert rtts.get("a") == 0.020
    assert rtts.get("b") == 0.050
    rtts.forget("a")
    assert rtts.get("a") is None and len(rtts) == 1


def test_published_keeps_the_nearest_peers_by_prefix_in_microseconds():
    rtts = PeerRtts()
    for n in range(20):
        rtts.observe(f"{n:02d}" + "x" * 30, (20 - n) / 1000)  # the last ids are nearest
    rtts.observe("far" + "y" * 30, 1e6)
    table = rtts.published(limit=3)
    assert table == (
        (("17" + "x" * 30)[:PEER_RTT_PREFIX], 3000),
        (("18" + "x" * 30)[:PEER_RTT_PREFIX], 2000),
        (("19" + "x" * 30)[:PEER_RTT_PREFIX], 1000),
    )
    assert dict(rtts.published(limit=100))[("far" + "y" * 30)[:PEER_RTT_PREFIX]] == MAX_PEER_RTT_US


@pytest.fixture
def network() -> MemoryNetwork:
    # Every one-way trip takes exactly 5 ms: every round trip 10 ms.
    return MemoryNetwork(seed=3, latency=(0.005, 0.005))


async def test_records_carry_the_round_trips_the_probes_measured(autojump_clock, swarm, config):
    nodes = await swarm.add(4)
    await swarm.settle()
    # A few probe passes, then a refresh of every record (which publishes them).
    await trio.sleep(6 * config.probe_interval + config.record_refresh_interval)
    viewer = nodes[0]
    for signed in viewer.view():
        record = signed.record
        others = [n.peer_id for n in nodes if n.peer_id != record.peer_id]
        assert [record.rtt_to(p) for p in others] == [pytest.approx(0.010, abs=1e-6)] * 3
    # A dead member's figure is dropped from the next record.
    victim = nodes[3]
    swarm.kill(victim)
    await swarm.wait_for(
        lambda: swarm.all_see(victim.peer_id, MemberState.DEAD),
        limit=config.suspicion_max_timeout(4) + 10 * config.probe_interval,
    )
    assert nodes[1].rtts.get(victim.peer_id) is None
    assert nodes[1].update_local_record(active_sessions=1).record.rtt_to(victim.peer_id) is None
