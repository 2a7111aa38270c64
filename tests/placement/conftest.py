"""Small placement problems with numbers that can be checked by hand."""

from __future__ import annotations

import pytest

from libpipe.placement import ModelSpec, Network, PlacementProblem, ServerSpec, Workload

GB = 10**9


def tiny_problem(
    *,
    fast_memory: int = 8 * GB,
    kv_bytes: int = 10**6,
    arrival_rate: float = 0.1,
    slow: int = 3,
    num_blocks: int = 6,
) -> PlacementProblem:
    """Two fast servers beside the clients' cluster, ``slow`` small ones
    (two blocks at most) in another; 1 GB blocks; 100 ms between clusters
    plus a 100 ms per-hop overhead. With kv_bytes = 1 MB a session costs
    s_c = 148 MB per block."""
    model = ModelSpec(
        num_blocks=num_blocks, block_bytes=GB, hidden_size=1024, kv_bytes_per_token_block=kv_bytes
    )
    servers = [
        ServerSpec("a", fast_memory, 0.003, 0.0001, 0.03, "A"),
        ServerSpec("b", fast_memory, 0.003, 0.0001, 0.03, "A"),
    ]
    servers += [
        ServerSpec(f"m{i}", 3 * GB, 0.016, 0.0001, 0.2, "B", max_blocks=2) for i in range(slow)
    ]
    network = Network.clustered(["A", "B", "K"], 0.005, 0.1, hop_overhead=0.1)
    workload = Workload(l_in=20, l_max=128, arrival_rate=arrival_rate, clients=(("K", 1.0),))
    return PlacementProblem(model, tuple(servers), workload, network)


@pytest.fixture
def problem() -> PlacementProblem:
    return tiny_problem()
