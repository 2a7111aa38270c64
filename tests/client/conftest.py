"""Fixtures for the client tests: one small checkpoint, real server processes.

Servers are started in parallel (each start is mostly importing torch) and
shared by every test of a module; they announce a fixed throughput so that
no test waits for a measurement and routing decisions are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from libpipe.client import SamplingConfig
from libpipe.client._sampling import choose_next
from libpipe.model import load_client_head, load_span, write_random_checkpoint
from libpipe.server import ServerProcess

NUM_BLOCKS = 8


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, hidden 64, 8 blocks, byte-level tokenizer."""
    return write_random_checkpoint(tmp_path_factory.mktemp("client-model"), "llama", seed=5)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-server-cache")


def start_servers(
    model_dir: Path,
    specs: Sequence[tuple[tuple[int, int], Sequence[str]]],
    cache_dir: Path,
) -> list[ServerProcess]:
    """Start one server per ``(blocks, extra_args)``, all at once."""

    def one(spec: tuple[tuple[int, int], Sequence[str]]) -> ServerProcess:
        blocks, extra = spec
        args = ["--cache-dir", str(cache_dir), "--log-level", "WARNING", *extra]
        if "--throughput" not in extra:
            args += ["--throughput", "200,4000"]
        return ServerProcess.start(model_dir, blocks=blocks, extra_args=args)

    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        futures = [pool.submit(one, spec) for spec in specs]
        started, failure = [], None
        for future in futures:
            try:
                started.append(future.result())
            except Exception as exc:  # keep the first error; stop what did start
                failure = failure or exc
    if failure is not None:
        for server in started:
            server.close()
        raise failure
    return started


@pytest.fixture(scope="session")
def spawn(model_dir: Path, cache_dir: Path) -> Iterator[Callable[..., list[ServerProcess]]]:
    """``spawn([(blocks, extra_args), ...])``: servers closed at the end of the session."""
    everything: list[ServerProcess] = []

    def spawn_(specs: Sequence[tuple[tuple[int, int], Sequence[str]]]) -> list[ServerProcess]:
        servers = start_servers(model_dir, specs, cache_dir)
        everything.extend(servers)
        return servers

    yield spawn_
    for server in everything:
        server.close()


@pytest.fixture(scope="session")
def chain(spawn) -> list[str]:
    """Three servers: [0:3) [3:5) [5:8)."""
    servers = spawn([((0, 3), ()), ((3, 5), ()), ((5, 8), ())])
    return [s.address for s in servers]


class LocalModel:
    """The whole model in this process: the reference the swarm must equal."""

    def __init__(self, model_dir: Path) -> None:
        self.head = load_client_head(model_dir, progress=False)
        self.blocks = load_span(model_dir, 0, NUM_BLOCKS, progress=False)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.head.logits(self.blocks(self.head.embed(torch.tensor([ids]))))[0]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.sample(prompt, n, SamplingConfig())

    def sample(self, prompt: list[int], n: int, sampling: SamplingConfig) -> list[int]:
        """What the client must generate, chosen by the client's own sampler."""
        generator = sampling.generator()
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(choose_next(self.logits(ids)[-1:], sampling, generator)[0]))
        return ids[len(prompt) :]


@pytest.fixture(scope="session")
def local_model(model_dir: Path) -> LocalModel:
    return LocalModel(model_dir)
