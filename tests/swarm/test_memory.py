"""The in-memory network: delivery, latency, loss, kills, refusals."""

from __future__ import annotations

import pytest
import trio

from libpipe.errors import ConfigError, ConnectionBrokenError
from libpipe.swarm import MemoryNetwork


async def echo(method, body):
    return {"method": method, "body": body}


async def test_request_round_trip_takes_two_latencies(autojump_clock, nursery):
    network = MemoryNetwork(latency=(0.05, 0.05))
    a, b = network.endpoint("a"), network.endpoint("b")
    await nursery.start(b.serve, echo)
    start = trio.current_time()
    reply = await a.request("b", "m", {"x": b"\x00\x01"})
    assert reply == {"method": "m", "body": {"x": b"\x00\x01"}}
    assert trio.current_time() - start == pytest.approx(0.1)
    assert network.messages_sent == {"a": 1, "b": 1}
    assert network.total_bytes() > 0


async def test_notify_is_delivered_later(autojump_clock, nursery):
    network = MemoryNetwork(latency=(0.02, 0.02))
    got = []

    async def record(method, body):
        got.append(trio.current_time())

    a, b = network.endpoint("a"), network.endpoint("b")
    await nursery.start(b.serve, record)
    start = trio.current_time()
    await a.notify("b", "m", {})
    assert got == []
    await trio.sleep(0.1)
    assert got == [pytest.approx(start + 0.02)]


async def test_killed_and_cut_peers_never_answer(autojump_clock, nursery):
    network = MemoryNetwork()
    a, b, c = network.endpoint("a"), network.endpoint("b"), network.endpoint("c")
    await nursery.start(b.serve, echo)
    await nursery.start(c.serve, echo)
    network.cut("a", "c")
    network.kill("b")
    for address in ("b", "c"):
        with trio.move_on_after(5) as scope:
            await a.request(address, "m", {})
        assert scope.cancelled_caught
    network.cut("a", "c", restore=True)
    assert (await a.request("c", "m", {}))["method"] == "m"


async def test_loss_is_seeded_and_roughly_its_rate(autojump_clock, nursery):
    network = MemoryNetwork(seed=5, loss=0.3)
    a, b = network.endpoint("a"), network.endpoint("b")
    await nursery.start(b.serve, echo)
    answered = 0
    for _ in range(200):
        with trio.move_on_after(1):
            await a.request("b", "m", {})
            answered += 1
    # Both directions must survive: 0.7 ** 2 = 0.49.
    assert 70 < answered < 130


async def test_unknown_address_is_refused_at_once(autojump_clock):
    network = MemoryNetwork()
    a = network.endpoint("a")
    with pytest.raises(ConnectionBrokenError):
        await a.request("nowhere", "m", {})
    with pytest.raises(ConnectionBrokenError):
        await a.notify("nowhere", "m", {})


@pytest.mark.parametrize(
    "kwargs", [{"loss": 1.5}, {"latency": (0.2, 0.1)}, {"latency": (-1.0, 0.0)}]
)
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        MemoryNetwork(**kwargs)
