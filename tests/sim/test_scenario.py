"""Scenario files: the built-ins carry the paper's constants; bad files get clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from libpipe.errors import ConfigError
from libpipe.sim._scenario import builtin_scenarios, load_scenario, scenario_from_dict


def test_builtin_names():
    assert builtin_scenarios() == [
        "clustered",
        "clustered-large",
        "llama70b-clustered",
        "scattered-<n>",
    ]


def test_clustered_is_the_papers_testbed():
    s = load_scenario("clustered")
    assert [spec.name for spec in s.servers] == ["a100-0", "a100-1"] + [
        f"mig-{i}" for i in range(7)
    ]
    a100, mig = s.servers[0], s.servers[2]
    assert s.model.num_blocks == 70
    assert s.model.block_bytes == 1_320_000_000
    assert s.model.kv_bytes_per_token_block == 2 * 14336 * 2
    assert (a100.tau_decode, mig.tau_decode) == pytest.approx((0.00322, 0.01625))
    assert a100.prefill_time(20) == pytest.approx((0.0743 * 20 + 33.0) / 1000)
    assert mig.prefill_time(20) == pytest.approx((0.1041 * 20 + 206.4) / 1000)
    assert (a100.memory_bytes, mig.memory_bytes) == (79_100_000_000, 8_200_000_000)
    assert (a100.max_blocks, mig.max_blocks) == (None, 4)
    net = s.network
    assert net.between("cluster-clients", "cluster-a100") == pytest.approx(0.1)
    assert net.between("cluster-mig", "cluster-mig") == pytest.approx(0.005)
    assert net.hop_time("cluster-clients", "cluster-mig") == pytest.approx(0.2)
    assert s.costs.prefill_transfer(20) == pytest.approx((0.705 * 20 + 67) / 1000)
    assert s.costs.session_open == pytest.approx(0.07)
    w = s.workload
    assert (w.l_in, w.l_max, w.arrival_rate) == (20, 128, 0.1)


def test_server_compute_queues_unless_a_scenario_says_unshared(tiny):
    # The built-ins reproduce the paper, whose model has no compute sharing.
    for name in ("clustered", "clustered-large", "llama70b-clustered", "scattered-5"):
        assert load_scenario(name).compute == "unshared"
    scenario = scenario_from_dict(tiny)
    assert scenario.compute == "queue" and scenario.batch_row == {}
    tiny["server_classes"]["slow"]["batch_row_ms_per_block"] = 2.5
    rows = scenario_from_dict(tiny).batch_row
    assert rows == {"slow-0": pytest.approx(0.0025), "slow-1": pytest.approx(0.0025)}


def test_batch_row_of_an_unknown_server_is_refused(tiny):
    scenario = scenario_from_dict(tiny)
    with pytest.raises(ConfigError, match="unknown server 'ghost'"):
        dataclasses.replace(scenario, batch_row={"ghost": 0.001})
    with pytest.raises(ConfigError, match="finite number >= 0"):
        dataclasses.replace(scenario, batch_row={"fast": float("nan")})


def test_clustered_large_and_llama():
    large = load_scenario("clustered-large")
    assert sorted(large.server_classes.values()).count("a100") == 5
    assert sorted(large.server_classes.values()).count("mig") == 21
    llama = load_scenario("llama70b-clustered")
    assert llama.model.num_blocks == 80
    assert llama.model.kv_bytes_per_token_block == 2 * 1024 * 2  # 8 KV heads of 128


@pytest.mark.parametrize("n", [2, 20, 150])
def test_scattered_has_n_servers_a_fifth_fast_and_is_reproducible(n):
    s = load_scenario(f"scattered-{n}")
    assert s.name == f"scattered-{n}"
    assert len(s.servers) == n
    assert list(s.server_classes.values()).count("a100") == round(0.2 * n)
    for client, _ in s.workload.client_shares():
        for spec in s.servers:
            assert s.network.between(client, spec.location) >= 0.002  # connected
    again = load_scenario(f"scattered-{n}")
    assert again.network == s.network and again.servers == s.servers


def test_a_scenario_file_path_works(tmp_path, tiny):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(tiny))
    assert load_scenario(str(path)).name == "tiny"


def test_a_matrix_topology(tiny):
    tiny["topology"] = {"kind": "matrix", "nodes": ["dc", "home"], "rtt_ms": [[1, 50], [50, 0]]}
    s = scenario_from_dict(tiny)
    assert s.network.between("home", "dc") == pytest.approx(0.05)
    assert s.network.between("dc", "dc") == pytest.approx(0.001)


def test_overrides():
    s = load_scenario("clustered").with_workload(arrival_rate=0.5, l_max=64, duration=10)
    assert (s.workload.arrival_rate, s.workload.l_max, s.duration) == (0.5, 64, 10.0)
    assert s.min_new_tokens == 64
    for bad in (
        {"arrival_rate": 0},
        {"l_max": 0},
        {"duration": -1},
        {"arrival_rate": float("nan")},
    ):
        with pytest.raises(ConfigError):
            s.with_workload(**bad)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("nowhere", "unknown scenario 'nowhere'"),
        ("scattered-1", "scattered-<n> takes"),
        ("scattered-100000", "scattered-<n> takes"),
        ("/no/such/file.json", "cannot read scenario file"),
    ],
)
def test_bad_names(name, match):
    with pytest.raises(ConfigError, match=match):
        load_scenario(name)


def test_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_scenario(str(path))


def _set(data, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[int(key)] if isinstance(data, list) else data[key]
    if isinstance(data, list):
        last = int(last)
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model.num_blocks", _DELETE, r"tiny\.model\.num_blocks: missing"),
        ("model.num_blocks", "70", r"model\.num_blocks: expected an integer"),
        ("model.num_blocks", 0, r"model\.num_blocks: must be >= 1"),
        ("model.num_blocks", 10**6, r"model\.num_blocks: must be <= 1000"),
        ("model.block_gb", -1, r"model\.block_gb: must be > 0"),
        ("model.num_attention_heads", 3, "must split into 3 heads"),
        ("model.colour", "red", r"tiny\.model: unknown field\(s\) colour"),
        ("server_classes.fast.decode_ms_per_block", float("inf"), "finite number"),
        ("server_classes.fast.memory_gb", True, "expected a finite number"),
        ("server_classes.slow.max_blocks", 0, "max_blocks: must be >= 1"),
        ("network.session_open_ms", -5, "session_open_ms: must be >= 0"),
        ("workload.arrival_rate", 0, "arrival_rate: must be > 0"),
        ("workload.min_new_tokens", 7, "min_new_tokens: must be <= 6"),
        ("servers", [], "servers: expected a non-empty list"),
        ("servers.0.class", "gpu", "unknown server class 'gpu'"),
        ("servers.1.count", 0, "count: must be >= 1"),
        ("servers.1.count", 10**9, "count: must be <= 5000"),
        ("servers.1.count", 5000, "servers: more than 5000 servers"),
        ("servers.1", {"id": "fast", "class": "slow", "node": "dc"}, "duplicate server id"),
        ("clients.0.weight", 0, "weight: must be > 0"),
        ("topology.kind", "mesh", "expected 'clusters' or 'matrix'"),
        ("topology.inter_rtt_ms", _DELETE, "inter_rtt_ms: missing"),
        ("random_geometric", {"nodes": 4}, "not allowed with random_geometric"),
        ("name", "", "expected a non-empty string"),
        ("compute", "shared", "compute must be one of queue, unshared"),
        ("compute", 1, r"tiny\.compute: expected a non-empty string"),
        ("server_classes.fast.batch_row_ms_per_block", -1, "batch_row_ms_per_block: must be >= 0"),
    ],
)
def test_bad_fields_are_named(tiny, field, value, match):
    _set(tiny, field, value)
    with pytest.raises(ConfigError, match=match):
        scenario_from_dict(tiny, source="tiny")


@pytest.mark.parametrize(
    ("topology", "match"),
    [
        (
            {"kind": "matrix", "nodes": ["dc", "home"], "rtt_ms": [[1, 50], [60, 0]]},
            "not symmetric",
        ),
        ({"kind": "matrix", "nodes": ["dc", "home"], "rtt_ms": [[1, 50]]}, "2 x 2 matrix"),
        ({"kind": "matrix", "nodes": ["dc"], "rtt_ms": [[1]]}, "'home' is not in topology.nodes"),
        ({"kind": "matrix", "nodes": ["dc", "dc"], "rtt_ms": [[1, 1], [1, 1]]}, "distinct"),
    ],
)
def test_bad_matrices(tiny, topology, match):
    tiny["topology"] = topology
    with pytest.raises(ConfigError, match=match):
        scenario_from_dict(tiny)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("fast_class", "tpu", "unknown server class 'tpu'"),
        ("fast_fraction", 1.5, "must be <= 1"),
        ("client_fraction", 0, "must be > 0"),
        ("nodes", 1, "must be >= 2"),
    ],
)
def test_bad_random_geometric(field, value, match):
    data = json.loads(json.dumps(_scattered()))
    data["random_geometric"][field] = value
    with pytest.raises(ConfigError, match=match):
        scenario_from_dict(data)


def _scattered() -> dict:
    from importlib import resources

    return json.loads(
        resources.files("libpipe.sim").joinpath("scenarios/scattered.json").read_text()
    )
