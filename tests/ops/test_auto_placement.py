"""Real block servers started without --blocks: they size and place their
spans from the swarm, restore coverage after deaths, and move without
breaking the sessions they hold; a client generating throughout never fails."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import trio

from libpipe import Client
from libpipe.cli.server import main as server_main
from libpipe.client import RetryPolicy
from libpipe.errors import ConfigError, DrainingError, InvalidRequestError
from libpipe.model import ModelConfig, write_random_checkpoint
from libpipe.net import ConnectionPool, Security
from libpipe.server import BlockServer, ServerConfig, _server
from libpipe.server._rebalance import block_weight_bytes, span_length
from libpipe.swarm import RecordState

from .conftest import FAST

NUM_BLOCKS = 12
CACHE_BYTES = 64 << 20
# Rebalance periods in real seconds: short, so the test sees several.
PERIOD = 1.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("auto") / "m",
        "llama",
        seed=5,
        overrides={"num_hidden_layers": NUM_BLOCKS},
    )


def four_blocks_of_memory(model_dir: Path) -> int:
    """A budget that fits four fp32 blocks beside the KV cache, and not five."""
    per_block = block_weight_bytes(ModelConfig.from_file(model_dir), 4)
    return CACHE_BYTES + 4 * per_block + per_block // 2


def auto_config(model_dir: Path, tmp_path: Path, peers: list[str], **kw) -> ServerConfig:
    kw.setdefault("memory_bytes", four_blocks_of_memory(model_dir))
    kw.setdefault("rebalance_period", PERIOD)
    return ServerConfig(
        model_dir,
        None,
        peers=tuple(peers),
        cache_bytes=CACHE_BYTES,
        throughput=(100.0, 1000.0),
        gossip=FAST,
        drain_grace=2.0,
        cache_dir=tmp_path / "cache",
        progress=False,
        **kw,
    )


class Fleet:
    """In-process servers, each under its own cancel scope (cancelled: it crashed)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.servers: list[BlockServer] = []
        self.scopes: dict[BlockServer, trio.CancelScope] = {}

    async def start(self, config: ServerConfig) -> BlockServer:
        server = BlockServer(config, Security.insecure())
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await server.run(task_status=task_status)

        await self.nursery.start(run)
        self.servers.append(server)
        self.scopes[server] = scope
        return server

    def kill(self, server: BlockServer) -> None:
        self.scopes[server].cancel()
        self.servers.remove(server)

    def coverage(self) -> list[int]:
        counts = [0] * NUM_BLOCKS
        for s in self.servers:
            for b in range(*s.serving.blocks):
                counts[b] += 1
        return counts

    def describe(self) -> str:
        """Spans held and each server's view of them, for a failure message."""
        lines = [f"coverage {self.coverage()}"]
        for s in self.servers:
            seen = sorted((r.record.peer_id[:8], r.record.span) for r in s.node.view())
            lines.append(f"{s.peer_id[:8]} holds {s.serving.blocks}, sees {seen}")
        return "\n".join(lines)

    def views_agree(self) -> bool:
        spans = {s.peer_id: s.serving.blocks for s in self.servers}
        return all(
            {r.record.peer_id: r.record.span for r in s.node.view()} == spans for s in self.servers
        )


async def wait_until(predicate, limit: float, explain=lambda: "") -> None:
    with trio.move_on_after(limit):
        while not predicate():
            await trio.sleep(0.1)
        return
    pytest.fail(f"not reached within {limit} s\n{explain()}")


def test_span_length_comes_from_the_memory_budget(model_dir, tmp_path):
    model = ModelConfig.from_file(model_dir)
    assert span_length(auto_config(model_dir, tmp_path, []), model) == 4
    assert span_length(auto_config(model_dir, tmp_path, [], memory_bytes=1 << 40), model) == 12
    assert (
        span_length(auto_config(model_dir, tmp_path, [], memory_bytes=None, num_blocks=3), model)
        == 3
    )
    with pytest.raises(ConfigError, match="cannot hold one block"):
        span_length(auto_config(model_dir, tmp_path, [], memory_bytes=CACHE_BYTES + 10), model)
    with pytest.raises(ConfigError):
        ServerConfig(model_dir, (0, 4), num_blocks=4)
    with pytest.raises(ConfigError):
        auto_config(model_dir, tmp_path, [], rebalance_period=0.0)


@pytest.mark.slow
async def test_six_servers_cover_the_model_and_recover_from_two_deaths(
    model_dir, tmp_path, nursery
):
    fleet = Fleet(nursery)
    first = await fleet.start(auto_config(model_dir, tmp_path, []))
    assert first.serving.blocks == (0, 4)
    # Five more start at once, each seeing only what the first knows then.
    async with trio.open_nursery() as starting:
        for _ in range(5):
            starting.start_soon(fleet.start, auto_config(model_dir, tmp_path, [first.address]))
    assert all(s.serving.blocks[1] - s.serving.blocks[0] == 4 for s in fleet.servers)
    await wait_until(
        lambda: min(fleet.coverage()) >= 1 and fleet.views_agree(),
        limit=40,
        explain=fleet.describe,
    )

    failures: list[BaseException] = []
    outputs: list[list[int]] = []
    stop = trio.Event()

    # Both holders of a span die at once: the gap lasts until gossip declares
    # them dead and a server's next rebalance covers it (seconds here, about a
    # period in a real swarm). The client must wait that long, not the ~3 s
    # of the default retry policy: patience is the client's to configure.
    patient = RetryPolicy(max_failures=40, backoff_max=1.0)

    async def generate_throughout() -> None:
        async with Client(
            model_dir, [first.address], insecure=True, refresh_interval=0.5, retry=patient
        ) as c:
            while not stop.is_set():
                try:
                    outputs.append(await c.generate([5, 6, 7], max_new_tokens=12))
                except Exception as exc:  # any failure at all fails the test
                    failures.append(exc)
                    return

    async with trio.open_nursery() as clients:
        clients.start_soon(generate_throughout)
        await wait_until(lambda: failures or len(outputs) >= 1, limit=30)
        # Kill both holders of one span (not the first server, the client's peer).
        by_span: dict[tuple[int, int], list[BlockServer]] = {}
        for s in fleet.servers:
            by_span.setdefault(s.serving.blocks, []).append(s)
        victims = next(
            (group for group in by_span.values() if len(group) >= 2 and first not in group),
            [s for s in fleet.servers if s is not first][:2],
        )[:2]
        for victim in victims:
            fleet.kill(victim)
        served_at_kill = len(outputs)
        await wait_until(
            lambda: min(fleet.coverage()) >= 1 and fleet.views_agree(),
            limit=40,
            explain=fleet.describe,
        )
        await wait_until(lambda: failures or len(outputs) >= served_at_kill + 2, limit=30)
        stop.set()
    assert failures == []
    # Failover replays exactly: every generation gave the same tokens.
    assert all(o == outputs[0] for o in outputs)
    nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_server_announces_its_span_before_loading_it(
    model_dir, tmp_path, nursery, monkeypatch
):
    """While one server loads its blocks, the next to start sees where it
    will be (a joining record) and takes other blocks, instead of piling
    onto the same ones."""
    fleet = Fleet(nursery)
    first = await fleet.start(auto_config(model_dir, tmp_path, []))
    assert first.serving.blocks == (0, 4)
    loading = threading.Event()
    release = threading.Event()
    real_load_span = _server.load_span

    def slow_load_span(*args, **kwargs):
        loading.set()
        release.wait(60)
        return real_load_span(*args, **kwargs)

    monkeypatch.setattr(_server, "load_span", slow_load_span)
    second = BlockServer(auto_config(model_dir, tmp_path, [first.address]), Security.insecure())
    nursery.start_soon(second.run)
    try:
        await wait_until(loading.is_set, limit=30)
        monkeypatch.undo()  # the third server loads at once

        def joining_at(span: tuple[int, int]) -> bool:
            return any(
                r.record.peer_id == second.peer_id
                and r.record.state is RecordState.JOINING
                and r.record.span == span
                for r in first.node.view()
            )

        await wait_until(lambda: joining_at((4, 8)), limit=30, explain=fleet.describe)
        assert second.serving is None  # still loading
        third = await fleet.start(auto_config(model_dir, tmp_path, [first.address]))
        assert third.serving.blocks == (8, 12)
    finally:
        release.set()
    await wait_until(lambda: second.serving is not None, limit=30)
    assert second.serving.blocks == (4, 8)
    nursery.cancel_scope.cancel()


async def step(stream, position: int, hidden_size: int) -> dict:
    await stream.send({"position": position}, (torch.randn(1, 1, hidden_size),))
    return (await stream.receive()).meta


@pytest.mark.slow
async def test_move_keeps_open_sessions_until_the_grace_ends(model_dir, tmp_path, nursery):
    fleet = Fleet(nursery)
    server = await fleet.start(auto_config(model_dir, tmp_path, []))
    assert server.serving.blocks == (0, 4) and server.rebalancer is not None
    hidden = ModelConfig.from_file(model_dir).hidden_size
    opening = {"start": 0, "end": 4, "batch": 1, "max_length": 32}
    async with ConnectionPool(Security.insecure()) as pool:
        conn = await pool.get(server.address)
        async with conn.open_stream("inference", opening) as old:
            assert (await old.receive()).meta["position"] == 0
            assert (await step(old, 0, hidden))["position"] == 1
            moved = trio.Event()

            async def move() -> None:
                assert await server.rebalancer.move(4, 8)
                moved.set()

            nursery.start_soon(move)
            await wait_until(lambda: server.serving.blocks == (4, 8), limit=30)
            assert server.node.local_record.record.span == (4, 8)
            # The session opened on the old blocks goes on ...
            assert (await step(old, 1, hidden))["position"] == 2
            # ... new ones get the new blocks only: the old ones are "moved"
            # (draining: the client re-routes), blocks never held are invalid.
            with pytest.raises(DrainingError):
                async with conn.open_stream("inference", opening) as refused:
                    await refused.receive()
            with pytest.raises(DrainingError):
                await conn.call("forward", {"start": 1, "end": 3}, (torch.zeros(1, 2, hidden),))
            with pytest.raises(InvalidRequestError):
                await conn.call("forward", {"start": 8, "end": 9}, (torch.zeros(1, 2, hidden),))
            async with conn.open_stream("inference", {**opening, "start": 4, "end": 8}) as new:
                assert (await new.receive()).meta["position"] == 0
                assert (await step(new, 0, hidden))["position"] == 1
            # Past the grace period the old session is ended, and the move completes.
            with trio.fail_after(10):
                await moved.wait()
            with pytest.raises(DrainingError):
                await step(old, 2, hidden)
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory", "lots"], "--memory must be a size"),
        (["--num-blocks", "0"], "num_blocks must be at least 1"),
        (["--blocks", "0:4", "--num-blocks", "4"], "not with --blocks"),
        (["--memory", "0"], "memory_bytes must be positive"),
        (["--rebalance-period", "-1"], "rebalance_period must be positive"),
        (["--monitor", "70000"], "--monitor must be a port"),
    ],
)
def test_bad_placement_flags_are_config_errors(argv, message, tmp_path, capsys):
    assert server_main([str(tmp_path), "--insecure", *argv]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err
