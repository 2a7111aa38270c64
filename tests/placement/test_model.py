"""Each formula of the performance model pinned to numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from libpipe.errors import ConfigError
from libpipe.placement import (
    ModelSpec,
    Network,
    PlacementProblem,
    ServerSpec,
    Workload,
    block_capacity,
    design_sessions,
)

from .conftest import GB, tiny_problem

# BLOOM-176B-like model of the paper's testbed: hidden 14336, NF4 blocks of
# 1.32 GB, fp16 cache.
BLOOM = ModelSpec(
    num_blocks=70,
    block_bytes=1_320_000_000,
    hidden_size=14336,
    kv_bytes_per_token_block=2 * 14336 * 2,
)
A100 = ServerSpec("a100", 79_100_000_000, 0.00322, 0.0000743, 0.033, "x")
MIG = ServerSpec("mig", 8_200_000_000, 0.01625, 0.0001041, 0.2064, "y", max_blocks=4)


def test_session_cache_bytes():
    # s_c = 2 * d_kv * (l_in + l_max) * bytes = 2 * 14336 * 148 * 2
    workload = Workload(20, 128, 0.1, (("c", 1.0),))
    assert BLOOM.session_cache_bytes(workload) == 8_486_912


def test_petals_reservation_and_block_counts():
    # 2 * hidden * 4096 tokens * 2 bytes
    assert BLOOM.petals_cache_reservation() == 234_881_024
    reserve = BLOOM.petals_cache_reservation()
    # floor(79.1e9 / (1.32e9 + 0.2349e9)) = 50; the MIG fits 5 but is capped at 4.
    assert block_capacity(A100, BLOOM, reserve) == 50
    assert block_capacity(MIG, BLOOM, reserve) == 4


@pytest.mark.parametrize(
    ("r", "expected"),
    # floor(79.1e9 / (1.32e9 + 8_486_912 * R)), capped at L = 70
    [(0, 59), (1, 59), (8, 56), (53, 44), (1000, 8)],
)
def test_cg_bp_block_count(r, expected):
    assert block_capacity(A100, BLOOM, 8_486_912 * r) == expected


def test_prefill_time():
    # a * l_in + b per block: 0.0743 ms * 20 + 33 ms
    assert A100.prefill_time(20) == pytest.approx(0.034486)
    assert A100.forward_time == pytest.approx(0.0000743)


def test_design_sessions_little_law_plus_margin():
    problem = tiny_problem(arrival_rate=0.5)
    # ideal token time: 6 blocks * 3 ms + 1 hop (8 GB holds all 6 blocks) * (0.1 + 0.1)
    ideal = 6 * 0.003 + 0.2
    mean = 0.5 * 128 * ideal
    assert design_sessions(problem) == math.ceil(mean + 2 * math.sqrt(mean))
    assert design_sessions(problem, token_time=1.0) == math.ceil(64 + 2 * 8)


def test_network_lookups():
    net = Network.clustered(["a", "b"], 0.005, 0.1, hop_overhead=0.1)
    assert net.between("a", "a") == 0.005
    assert net.between("a", "b") == 0.1
    assert net.hop_time("a", "b") == pytest.approx(0.2)
    matrix = Network.from_matrix(["p", "q"], [[0.0, 0.03], [0.03, 0.0]])
    assert matrix.between("q", "p") == 0.03
    with pytest.raises(ConfigError, match="no RTT"):
        net.between("a", "nowhere")


def test_views_of_a_placement(problem):
    views = {v.peer_id: v for v in problem.views({"a": (0, 6), "m0": (2, 4)}, "K")}
    assert (views["a"].start, views["a"].end) == (0, 6)
    assert views["a"].free_cache_bytes == 2 * GB  # 8 GB - 6 blocks of 1 GB
    assert views["a"].rtt == pytest.approx(0.2)  # 100 ms RTT + 100 ms per-hop overhead
    assert (views["b"].start, views["b"].end) == (0, 0)  # not placed: holds nothing


def test_workload_shares():
    w = Workload(1, 1, 1.0, (("a", 1.0), ("b", 3.0), ("c", 0.0)))
    assert w.client_shares() == [("a", 0.25), ("b", 0.75)]


@pytest.mark.parametrize(
    "build",
    [
        lambda: ModelSpec(0, 1, 1, 1),
        lambda: ModelSpec(4, -1, 1, 1),
        lambda: ServerSpec("", 1, 0.1, 0, 0, "x"),
        lambda: ServerSpec("s", 1, -0.1, 0, 0, "x"),
        lambda: ServerSpec("s", 1, 0.1, 0, 0, "x", max_blocks=0),
        lambda: Workload(0, 1, 1.0, (("a", 1.0),)),
        lambda: Workload(1, 1, math.nan, (("a", 1.0),)),
        lambda: Workload(1, 1, 1.0, ()),
        lambda: Workload(1, 1, 1.0, (("a", 0.0),)),
        lambda: Network({("a", "b"): -1.0}),
        lambda: Network.from_matrix(["a", "b"], [[0.0]]),
        lambda: PlacementProblem(BLOOM, (), Workload(1, 1, 1.0, (("a", 1.0),)), Network({})),
        lambda: PlacementProblem(
            BLOOM, (A100, A100), Workload(1, 1, 1.0, (("a", 1.0),)), Network({})
        ),
    ],
)
def test_bad_specs(build):
    with pytest.raises(ConfigError):
        build()
