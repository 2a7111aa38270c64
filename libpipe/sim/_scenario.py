"""Scenarios: a model, servers, clients, the network between them, a workload.

Scenarios are data (``scenarios/*.json``, or any file a user writes); this
module turns one into frozen, validated objects. Units in the files are the
ones the paper publishes its constants in (ms, GB = 1e9 bytes), so a reader
can check a file against the paper line by line; here everything becomes
seconds and bytes.

File layout (every field checked, unknown fields refused)::

    name, description
    model:   num_blocks, hidden_size, block_gb, [num_attention_heads,
             num_key_value_heads] (GQA: d_kv = hidden * kv_heads / heads),
             [cache_dtype_bytes = 2]
    server_classes: {NAME: decode_ms_per_block, prefill_ms_per_block:
             {per_prompt_token, fixed}, memory_gb, [max_blocks]}
    network: per_token_overhead_ms (added to every hop's RTT per token),
             prefill_overhead_ms, prefill_ms_per_prompt_token (added to a
             hop's RTT for the prompt), session_open_ms
    workload: arrival_rate (sessions/s), prompt_tokens, max_new_tokens,
             [min_new_tokens = max_new_tokens], duration_s
    petals_cache_tokens: the fixed per-block cache PETALS reserves (tokens)
    and either
      topology: {kind: "clusters", intra_rtt_ms, inter_rtt_ms}
              | {kind: "matrix", nodes: [...], rtt_ms: [[...]]}
      servers:  [{id, class, node, [count]}]  (join order; count n makes
                 ids id-0..id-(n-1))
      clients:  [{node, [weight = 1]}]
    or
      random_geometric: {nodes, seed, fast_fraction, fast_class, slow_class,
              client_fraction, [radius], link_rtt_ms, rtt_ms_per_unit,
              local_rtt_ms}   (one server per node; clients on random nodes)
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from ._fields import Fields
from ._topology import Topology, clustered_topology, random_geometric_topology

GB = 1e9
MS = 1e-3

_SCATTERED = re.compile(r"^scattered-(\d+)$")
# Bounds for scattered-<n>: at least a client and a server; the MILP and
# Floyd-Warshall stay tractable well past the paper's 150.
MIN_SCATTERED_NODES = 2
MAX_SCATTERED_NODES = 1000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_blocks: int
    hidden_size: int
    kv_dim: int  # width of K (and of V) per token per block: kv_heads * head_dim
    block_bytes: int
    cache_dtype_bytes: int

    @property
    def cache_bytes_per_token_block(self) -> int:
        """K and V of one token in one block (the paper's s_c per token)."""
        return 2 * self.kv_dim * self.cache_dtype_bytes


@dataclass(frozen=True)
class ServerClass:
    """A kind of hardware, with the paper's per-block timings."""

    name: str
    tau_decode: float  # seconds per block per decode step
    prefill_per_token: float  # seconds per block per prompt token
    prefill_fixed: float  # seconds per block per prefill
    memory_bytes: int
    max_blocks: int | None

    def prefill_time(self, prompt_tokens: int) -> float:
        """tau_I(l_in): one block's prefill of a prompt."""
        return self.prefill_per_token * prompt_tokens + self.prefill_fixed


@dataclass(frozen=True)
class NetworkCosts:
    """Fixed per-hop costs on top of the RTT (calibrated against PETALS)."""

    per_token_overhead: float
    prefill_overhead: float
    prefill_per_token: float
    session_open: float

    def prefill_transfer(self, prompt_tokens: int) -> float:
        return self.prefill_per_token * prompt_tokens + self.prefill_overhead


@dataclass(frozen=True)
class ServerSpec:
    peer_id: str
    server_class: ServerClass
    node: str


@dataclass(frozen=True)
class ClientSpec:
    node: str
    weight: float


@dataclass(frozen=True)
class WorkloadSpec:
    arrival_rate: float
    prompt_tokens: int
    max_new_tokens: int
    min_new_tokens: int
    duration: float

    @property
    def session_tokens(self) -> int:
        """Tokens a session's cache is sized for (l_in + l_max)."""
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    model: ModelSpec
    server_classes: tuple[ServerClass, ...]
    servers: tuple[ServerSpec, ...]  # in join order
    clients: tuple[ClientSpec, ...]
    topology: Topology
    network: NetworkCosts
    workload: WorkloadSpec
    petals_cache_tokens: int

    def with_workload(
        self,
        *,
        arrival_rate: float | None = None,
        max_new_tokens: int | None = None,
        duration: float | None = None,
    ) -> Scenario:
        """The same scenario under another load (the command line's overrides)."""
        workload = self.workload
        if arrival_rate is not None:
            if not arrival_rate > 0:
                raise ConfigError(f"arrival rate must be > 0 sessions/s, got {arrival_rate}")
            workload = dataclasses.replace(workload, arrival_rate=float(arrival_rate))
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ConfigError(f"l_max must be >= 1 token, got {max_new_tokens}")
            workload = dataclasses.replace(
                workload,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min(workload.min_new_tokens, max_new_tokens),
            )
        if duration is not None:
            if not duration > 0:
                raise ConfigError(f"duration must be > 0 s, got {duration}")
            workload = dataclasses.replace(workload, duration=float(duration))
        return dataclasses.replace(self, workload=workload)


def builtin_scenarios() -> list[str]:
    """Names ``load_scenario`` accepts besides paths (scattered takes any n)."""
    names = sorted(
        entry.name.removesuffix(".json")
        for entry in resources.files(__package__).joinpath("scenarios").iterdir()
        if entry.name.endswith(".json")
    )
    return [("scattered-<n>" if name == "scattered" else name) for name in names]


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name (``clustered``, ``scattered-40``...) or a JSON file."""
    text = str(name_or_path)
    match = _SCATTERED.match(text)
    if match:
        nodes = int(match.group(1))
        if not MIN_SCATTERED_NODES <= nodes <= MAX_SCATTERED_NODES:
            raise ConfigError(
                f"scattered-<n> takes {MIN_SCATTERED_NODES} <= n <= {MAX_SCATTERED_NODES}, got {nodes}"
            )
        data = _builtin_data("scattered")
        data["name"] = text
        data["random_geometric"]["nodes"] = nodes
        return scenario_from_dict(data, source=text)
    if "/" not in text and not text.endswith(".json"):
        return scenario_from_dict(_builtin_data(text), source=text)
    path = Path(text)
    try:
        raw = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read scenario file {path}: {exc.strerror}", path=text) from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})", path=text) from exc
    return scenario_from_dict(data, source=path.name)


def _builtin_data(name: str) -> dict:
    resource = resources.files(__package__).joinpath("scenarios", f"{name}.json")
    if not resource.is_file():
        raise ConfigError(
            f"unknown scenario {name!r}; built-in: {', '.join(builtin_scenarios())}, or a .json path",
            scenario=name,
        )
    return json.loads(resource.read_text())


_TOP = {
    "name",
    "description",
    "model",
    "server_classes",
    "network",
    "workload",
    "petals_cache_tokens",
    "topology",
    "servers",
    "clients",
    "random_geometric",
}


def scenario_from_dict(data: object, *, source: str = "scenario") -> Scenario:
    top = Fields(data, source, allowed=_TOP)
    model = _model(top.child("model"))
    classes = _server_classes(top.child("server_classes"))
    network = _network(top.child("network"))
    workload = _workload(top.child("workload"))
    if top.has("random_geometric"):
        for key in ("topology", "servers", "clients"):
            if top.has(key):
                raise ConfigError(
                    f"{top.path(key)}: not allowed with random_geometric (it generates them)"
                )
        topology, servers, clients = _random_geometric(top.child("random_geometric"), classes)
    else:
        topology, servers, clients = _explicit_swarm(top, classes)
    return Scenario(
        name=top.string("name"),
        description=top.string("description", default="-"),
        model=model,
        server_classes=tuple(classes.values()),
        servers=servers,
        clients=clients,
        topology=topology,
        network=network,
        workload=workload,
        petals_cache_tokens=top.integer("petals_cache_tokens", minimum=1),
    )


def _model(f: Fields) -> ModelSpec:
    f = Fields(
        f.data,
        f.where,
        allowed={
            "name",
            "num_blocks",
            "hidden_size",
            "block_gb",
            "num_attention_heads",
            "num_key_value_heads",
            "cache_dtype_bytes",
        },
    )
    hidden = f.integer("hidden_size", minimum=1)
    heads = f.integer("num_attention_heads", default=1, minimum=1)
    kv_heads = f.integer("num_key_value_heads", default=heads, minimum=1, maximum=heads)
    if hidden % heads or heads % kv_heads:
        raise ConfigError(
            f"{f.where}: hidden_size {hidden} must split into {heads} heads, and those"
            f" into {kv_heads} key/value groups"
        )
    return ModelSpec(
        name=f.string("name", default="model"),
        num_blocks=f.integer("num_blocks", minimum=1),
        hidden_size=hidden,
        kv_dim=hidden // heads * kv_heads,
        block_bytes=round(f.number("block_gb", positive=True) * GB),
        cache_dtype_bytes=f.integer("cache_dtype_bytes", default=2, minimum=1),
    )


def _server_classes(f: Fields) -> dict[str, ServerClass]:
    if not f.data:
        raise ConfigError(f"{f.where}: needs at least one server class")
    classes = {}
    for name in f.data:
        c = f.child(
            name, allowed={"decode_ms_per_block", "prefill_ms_per_block", "memory_gb", "max_blocks"}
        )
        prefill = c.child("prefill_ms_per_block", allowed={"per_prompt_token", "fixed"})
        classes[name] = ServerClass(
            name=name,
            tau_decode=c.number("decode_ms_per_block", positive=True) * MS,
            prefill_per_token=prefill.number("per_prompt_token", minimum=0) * MS,
            prefill_fixed=prefill.number("fixed", minimum=0) * MS,
            memory_bytes=round(c.number("memory_gb", positive=True) * GB),
            max_blocks=c.integer("max_blocks", minimum=1) if c.has("max_blocks") else None,
        )
    return classes


def _network(f: Fields) -> NetworkCosts:
    f = Fields(
        f.data,
        f.where,
        allowed={
            "per_token_overhead_ms",
            "prefill_overhead_ms",
            "prefill_ms_per_prompt_token",
            "session_open_ms",
        },
    )
    return NetworkCosts(
        per_token_overhead=f.number("per_token_overhead_ms", minimum=0) * MS,
        prefill_overhead=f.number("prefill_overhead_ms", minimum=0) * MS,
        prefill_per_token=f.number("prefill_ms_per_prompt_token", minimum=0) * MS,
        session_open=f.number("session_open_ms", minimum=0) * MS,
    )


def _workload(f: Fields) -> WorkloadSpec:
    f = Fields(
        f.data,
        f.where,
        allowed={"arrival_rate", "prompt_tokens", "max_new_tokens", "min_new_tokens", "duration_s"},
    )
    max_new = f.integer("max_new_tokens", minimum=1)
    return WorkloadSpec(
        arrival_rate=f.number("arrival_rate", positive=True),
        prompt_tokens=f.integer("prompt_tokens", minimum=1),
        max_new_tokens=max_new,
        min_new_tokens=f.integer("min_new_tokens", default=max_new, minimum=1, maximum=max_new),
        duration=f.number("duration_s", positive=True),
    )


def _explicit_swarm(
    top: Fields, classes: dict[str, ServerClass]
) -> tuple[Topology, tuple[ServerSpec, ...], tuple[ClientSpec, ...]]:
    servers: list[ServerSpec] = []
    for i, item in enumerate(top.objects("servers")):
        s = Fields(item, f"{top.path('servers')}[{i}]", allowed={"id", "class", "node", "count"})
        class_name = s.string("class")
        if class_name not in classes:
            raise ConfigError(
                f"{s.path('class')}: unknown server class {class_name!r}"
                f" (defined: {', '.join(classes)})"
            )
        base = s.string("id")
        ids = (
            [base]
            if not s.has("count")
            else [f"{base}-{k}" for k in range(s.integer("count", minimum=1))]
        )
        servers += [ServerSpec(peer_id, classes[class_name], s.string("node")) for peer_id in ids]
    seen: set[str] = set()
    for server in servers:
        if server.peer_id in seen:
            raise ConfigError(f"{top.path('servers')}: duplicate server id {server.peer_id!r}")
        seen.add(server.peer_id)

    clients = []
    for i, item in enumerate(top.objects("clients")):
        c = Fields(item, f"{top.path('clients')}[{i}]", allowed={"node", "weight"})
        clients.append(ClientSpec(c.string("node"), c.number("weight", default=1.0, positive=True)))

    t = top.child("topology")
    kind = t.string("kind")
    if kind == "clusters":
        t = Fields(t.data, t.where, allowed={"kind", "intra_rtt_ms", "inter_rtt_ms"})
        topology = clustered_topology(
            [s.node for s in servers] + [c.node for c in clients],
            intra_rtt=t.number("intra_rtt_ms", minimum=0) * MS,
            inter_rtt=t.number("inter_rtt_ms", minimum=0) * MS,
        )
    elif kind == "matrix":
        t = Fields(t.data, t.where, allowed={"kind", "nodes", "rtt_ms"})
        topology = _matrix_topology(t)
    else:
        raise ConfigError(f"{t.path('kind')}: expected 'clusters' or 'matrix', got {kind!r}")
    for where, node in [("servers", s.node) for s in servers] + [
        ("clients", c.node) for c in clients
    ]:
        if node not in topology:
            raise ConfigError(f"{top.path(where)}: node {node!r} is not in the topology")
    return topology, tuple(servers), tuple(clients)


def _matrix_topology(t: Fields) -> Topology:
    nodes = t.objects("nodes")
    rows = t.objects("rtt_ms")
    if not all(isinstance(n, str) and n for n in nodes):
        raise ConfigError(f"{t.path('nodes')}: expected node names (strings)")
    if len(rows) != len(nodes) or not all(
        isinstance(r, list) and len(r) == len(nodes) for r in rows
    ):
        raise ConfigError(f"{t.path('rtt_ms')}: expected a {len(nodes)} x {len(nodes)} matrix")
    matrix = []
    for i, row in enumerate(rows):
        fields = Fields({str(j): v for j, v in enumerate(row)}, f"{t.path('rtt_ms')}[{i}]")
        matrix.append(tuple(fields.number(str(j), minimum=0) * MS for j in range(len(row))))
    return Topology(tuple(nodes), tuple(matrix))


def _random_geometric(
    f: Fields, classes: dict[str, ServerClass]
) -> tuple[Topology, tuple[ServerSpec, ...], tuple[ClientSpec, ...]]:
    f = Fields(
        f.data,
        f.where,
        allowed={
            "nodes",
            "seed",
            "radius",
            "link_rtt_ms",
            "rtt_ms_per_unit",
            "local_rtt_ms",
            "fast_fraction",
            "fast_class",
            "slow_class",
            "client_fraction",
        },
    )
    n = f.integer("nodes", minimum=MIN_SCATTERED_NODES, maximum=MAX_SCATTERED_NODES)
    for key in ("fast_class", "slow_class"):
        if f.string(key) not in classes:
            raise ConfigError(f"{f.path(key)}: unknown server class {f.string(key)!r}")
    fraction = f.number("fast_fraction", minimum=0)
    if fraction > 1:
        raise ConfigError(f"{f.path('fast_fraction')}: must be <= 1, got {fraction}")
    # The topology is part of the scenario: its seed is the file's (plus n),
    # not the workload seed, so every run of scattered-40 sees one graph.
    rng = random.Random(f"{f.integer('seed')}/{n}")
    graph = random_geometric_topology(
        n,
        rng=rng,
        radius=f.number("radius", positive=True) if f.has("radius") else None,
        link_rtt=f.number("link_rtt_ms", minimum=0) * MS,
        rtt_per_unit=f.number("rtt_ms_per_unit", minimum=0) * MS,
        local_rtt=f.number("local_rtt_ms", minimum=0) * MS,
    )
    nodes = graph.topology.nodes
    fast = set(rng.sample(range(n), round(fraction * n)))
    servers = tuple(
        ServerSpec(
            f"{'fast' if i in fast else 'slow'}-{i:03d}",
            classes[f.string("fast_class" if i in fast else "slow_class")],
            nodes[i],
        )
        for i in range(n)
    )
    client_fraction = f.number("client_fraction", positive=True)
    if client_fraction > 1:
        raise ConfigError(f"{f.path('client_fraction')}: must be <= 1, got {client_fraction}")
    num_clients = max(1, round(client_fraction * n))
    clients = tuple(ClientSpec(nodes[i], 1.0) for i in sorted(rng.sample(range(n), num_clients)))
    return graph.topology, servers, clients


def describe(scenario: Scenario) -> Sequence[str]:
    """A few human lines about a scenario (for the CLI's header)."""
    counts: dict[str, int] = {}
    for server in scenario.servers:
        counts[server.server_class.name] = counts.get(server.server_class.name, 0) + 1
    w = scenario.workload
    return [
        f"scenario {scenario.name}: {scenario.description}",
        f"  model {scenario.model.name}: {scenario.model.num_blocks} blocks;"
        f" servers {', '.join(f'{n} x {c}' for c, n in counts.items())};"
        f" {len(scenario.clients)} client site(s)",
        f"  workload: lambda {w.arrival_rate:g}/s, l_in {w.prompt_tokens},"
        f" l_max {w.max_new_tokens}, {w.duration:g} s",
    ]
