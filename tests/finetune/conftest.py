"""Shared generated checkpoints and adapters for the fine-tuning tests."""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from libpipe.client._context import SwarmContext
from libpipe.client._failover import RetryPolicy
from libpipe.client._view import SwarmView
from libpipe.model import ModelConfig, write_random_checkpoint, write_random_lora_adapter
from libpipe.net import ConnectionPool, Security
from libpipe.server import BlockServer, ServerConfig
from libpipe.swarm import GossipConfig


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ft") / "llama", "llama", seed=3)


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ft") / "gqa", "llama-gqa", seed=4)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Path]:
    """Two adapters of the llama checkpoint: attention only, and everything."""
    root = tmp_path_factory.mktemp("adapters")
    config = ModelConfig.from_file(checkpoint)
    return {
        "attn": write_random_lora_adapter(root / "attn", config, rank=4, alpha=8.0, seed=1),
        "all": write_random_lora_adapter(
            root / "all",
            config,
            rank=2,
            alpha=3.0,
            target_modules=(
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
            seed=2,
        ),
    }


# --- in-process swarms ---------------------------------------------------------------

FAST_GOSSIP = GossipConfig.local().replace(
    probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, request_timeout=1.0
)


def server_config(
    model_dir: Path, blocks: tuple[int, int], tmp_path: Path, **kw: Any
) -> ServerConfig:
    """A test server: announced (not measured) throughput, no progress bars."""
    kw.setdefault("throughput", (100.0, 1000.0))
    kw.setdefault("gossip", FAST_GOSSIP)
    return ServerConfig(model_dir, blocks, cache_dir=tmp_path / "cache", progress=False, **kw)


@asynccontextmanager
async def running_swarm(
    configs: list[ServerConfig], *, wire_dtype: torch.dtype = torch.float32, seed: int = 0
) -> AsyncIterator[tuple[list[BlockServer], SwarmContext]]:
    """Servers in-process and a client context that learned them all."""
    model = ModelConfig.from_file(configs[0].model_dir)
    async with trio.open_nursery() as nursery:
        servers = [BlockServer(c, Security.insecure()) for c in configs]
        for server in servers:
            await nursery.start(server.run)
        async with ConnectionPool(Security.insecure()) as pool:
            view = SwarmView(
                model_id=model.model_id,
                num_blocks=model.num_hidden_layers,
                kv_values_per_token_block=2 * model.num_key_value_heads * model.head_dim,
            )
            ctx = SwarmContext(
                view=view,
                pool=pool,
                peers=[s.address for s in servers if s.address is not None],
                policy=RetryPolicy(backoff_base=0.01, step_timeout=30.0),
                wire_dtype=wire_dtype,
                num_blocks=model.num_hidden_layers,
                hidden_size=model.hidden_size,
                rng=random.Random(seed),
            )
            await ctx.refresh()
            # Equal RTTs: routes depend on announced throughputs and hop
            # counts only, not on how loaded the test machine was at a ping.
            for server in servers:
                ctx.view.rtt[server.peer_id] = 1e-3
            yield servers, ctx
        nursery.cancel_scope.cancel()


def kill(server: BlockServer) -> None:
    """Stop a server at once, as a crash would: connections drop mid-call."""
    assert server._scope is not None
    server._scope.cancel()


@pytest.fixture
def make_config(tmp_path: Path):
    return functools.partial(server_config, tmp_path=tmp_path)
