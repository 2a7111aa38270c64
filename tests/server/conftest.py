"""Shared fixtures: small checkpoints (generated once) and in-process servers."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from libpipe.model import (
    BlockSpan,
    ModelConfig,
    load_span,
    write_random_checkpoint,
    write_random_lora_adapter,
)
from libpipe.net import ConnectionPool, Security
from libpipe.server import BlockServer, ServerConfig
from libpipe.swarm import GossipConfig

# Gossip on one machine, with timers short enough for tests in real time.
FAST_GOSSIP = GossipConfig.local().replace(
    probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, request_timeout=1.0
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server-checkpoints")
    return {
        name: write_random_checkpoint(root / name, name, seed=11)
        for name in ("llama-gqa", "llama3")
    }


@pytest.fixture
def gqa(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["llama-gqa"]


@pytest.fixture(scope="module")
def lora_span(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> BlockSpan:
    """Blocks [1, 6) of the GQA checkpoint with a LoRA adapter named ``tuned``
    (bulk forward and backward tests)."""
    model_dir = checkpoints["llama-gqa"]
    adapter = write_random_lora_adapter(
        tmp_path_factory.mktemp("adapters") / "tuned",
        ModelConfig.from_file(model_dir),
        target_modules=("q_proj", "v_proj", "down_proj"),
        seed=5,
    )
    return load_span(model_dir, 1, 6, progress=False, adapters=[adapter])


def server_config(
    model_dir: Path, blocks: tuple[int, int], tmp_path: Path, **kw: Any
) -> ServerConfig:
    """A test server: fixed throughput (the measured path has its own tests),
    a tmp cache dir, no progress bars, fast gossip."""
    kw.setdefault("throughput", (100.0, 1000.0))
    kw.setdefault("gossip", FAST_GOSSIP)
    return ServerConfig(model_dir, blocks, cache_dir=tmp_path / "cache", progress=False, **kw)


@asynccontextmanager
async def running_servers(
    configs: list[ServerConfig],
) -> AsyncIterator[tuple[list[BlockServer], ConnectionPool]]:
    """Start the servers in-process; yield them and a client connection pool."""
    async with trio.open_nursery() as nursery:
        servers = [BlockServer(c, Security.insecure()) for c in configs]
        for server in servers:
            await nursery.start(server.run)
        async with ConnectionPool(Security.insecure()) as pool:
            yield servers, pool
        nursery.cancel_scope.cancel()


@pytest.fixture
def make_config(tmp_path: Path):
    return functools.partial(server_config, tmp_path=tmp_path)
