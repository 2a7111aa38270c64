"""A small private swarm over the committed demo model, shared by the
example tests: a fresh CA, two TLS servers holding half the blocks each,
and a client identity."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libpipe.model import ModelConfig
from libpipe.net import SwarmCA
from libpipe.server import ServerProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMO_MODEL = EXAMPLES / "demo_model"


@dataclass(frozen=True)
class Swarm:
    model: Path
    peers: list[str]
    client_identity: Path


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("swarm")
    ca = SwarmCA.create("examples test CA")
    ca.issue("client").save(root / "client")
    half = ModelConfig.from_file(DEMO_MODEL).num_hidden_layers // 2
    servers: list[ServerProcess] = []
    try:
        for i, span in enumerate([(0, half), (half, 2 * half)]):
            ca.issue(f"server {i}").save(root / f"server{i}")
            peers = ["--peers", servers[0].address] if servers else []
            servers.append(
                ServerProcess.start(
                    DEMO_MODEL,
                    blocks=span,
                    insecure=False,
                    log_dir=root,
                    # Announced, not measured: routing has one choice here.
                    extra_args=[
                        "--identity",
                        str(root / f"server{i}"),
                        "--gossip",
                        "local",
                        "--throughput",
                        "100,1000",
                        *peers,
                    ],
                )
            )
        yield Swarm(DEMO_MODEL, [s.address for s in servers], root / "client")
    finally:
        for s in servers:
            s.close()
