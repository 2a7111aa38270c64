"""Scenarios: a model, servers, clients, the network between them, a workload.

Scenarios are data (``scenarios/*.json``, or any file a user writes); this
module turns one into the placement layer's own types (``PlacementProblem``:
the very inputs the placement algorithms take) plus the few costs only a
session's life needs (prefill transfer, session open). Units in the files are the
ones the paper publishes its constants in (ms, GB = 1e9 bytes), so a reader
can check a file against the paper line by line; here everything becomes
seconds and bytes.

File layout (every field checked, unknown fields refused)::

    name, description, [compute = "queue"]: how a server's compute is
             shared between sessions: "queue" (as the live executor runs
             it, see _compute.py) or "unshared" (the paper's model: every
             step as if alone; the built-in scenarios, which reproduce
             the paper, say so)
    model:   num_blocks, hidden_size, block_gb, [num_attention_heads,
             num_key_value_heads] (GQA: d_kv = hidden * kv_heads / heads),
             [cache_dtype_bytes = 2]
    server_classes: {NAME: decode_ms_per_block, prefill_ms_per_block:
             {per_prompt_token, fixed}, memory_gb, [max_blocks],
             [batch_row_ms_per_block = per_prompt_token]: what each further
             decode step batched into a pass adds (compute "queue")}
    network: per_token_overhead_ms (added to every hop's RTT per token),
             prefill_overhead_ms, prefill_ms_per_prompt_token (added to a
             hop's RTT for the prompt), session_open_ms
    workload: arrival_rate (sessions/s), prompt_tokens, max_new_tokens,
             [min_new_tokens = max_new_tokens], duration_s
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
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from ..placement import ModelSpec, Network, PlacementProblem, ServerSpec, Workload
from ._fields import Fields
from ._topology import random_geometric_topology

GB = 1e9
MS = 1e-3

_SCATTERED = re.compile(r"^scattered-(\d+)$")
# Bounds for scattered-<n>: at least two nodes; the all-pairs RTTs
# (Floyd-Warshall, n^3) stay quick well past the paper's 150.
MIN_SCATTERED_NODES = 2
MAX_SCATTERED_NODES = 1000
# Servers one scenario may list (counts expanded): ten times the largest
# swarm the placement code is sized for (500), and a bound on the memory a
# mistyped count can take before anything runs.
MAX_SERVERS = 5000
# Blocks a scenario's model may have: several times the deepest served
# models (Llama-3 405B has 126); placement and routing are polynomial in it,
# and a mistyped count would run for hours.
MAX_BLOCKS = 1000
# Scenario.compute: steps wait in each server's compute queue and batch, as
# live servers run them; or the paper's model, every step as if alone.
QUEUE = "queue"
UNSHARED = "unshared"
COMPUTE_MODELS = (QUEUE, UNSHARED)


@dataclass(frozen=True)
class SessionCosts:
    """Per-hop costs of a session's first token, outside the routing objective.

    The prompt crosses each hop once (RTT + ``prefill_transfer``) and a
    session is opened once (``session_open``); both come from the paper's
    calibration of PETALS.
    """

    prefill_overhead: float
    prefill_per_token: float
    session_open: float

    def prefill_transfer(self, prompt_tokens: int) -> float:
        return self.prefill_per_token * prompt_tokens + self.prefill_overhead


@dataclass(frozen=True)
class Scenario:
    """A placement problem (model, servers in join order, workload, network)
    and what the simulator adds: session costs, output lengths, duration."""

    name: str
    description: str
    problem: PlacementProblem
    costs: SessionCosts
    min_new_tokens: int  # output lengths are uniform in [min_new_tokens, l_max]
    duration: float  # seconds of arrivals
    server_classes: Mapping[str, str]  # server name -> class name (for reports)
    compute: str = QUEUE  # one of COMPUTE_MODELS
    # Server name -> seconds per block each further decode step batched into
    # a pass adds (compute "queue"); a server not named uses its forward
    # time per token (_compute.PassCost says why).
    batch_row: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_MODELS:
            raise ConfigError(
                f"scenario {self.name}: compute must be one of {', '.join(COMPUTE_MODELS)},"
                f" got {self.compute!r}"
            )
        names = {spec.name for spec in self.problem.servers}
        for name, seconds in self.batch_row.items():
            if name not in names:
                raise ConfigError(f"scenario {self.name}: batch_row names unknown server {name!r}")
            if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
                raise ConfigError(
                    f"scenario {self.name}: batch_row of {name} must be a finite number >= 0,"
                    f" got {seconds!r}"
                )

    @property
    def model(self) -> ModelSpec:
        return self.problem.model

    @property
    def servers(self) -> tuple[ServerSpec, ...]:
        return self.problem.servers

    @property
    def workload(self) -> Workload:
        return self.problem.workload

    @property
    def network(self) -> Network:
        return self.problem.network

    def with_workload(
        self,
        *,
        arrival_rate: float | None = None,
        l_max: int | None = None,
        duration: float | None = None,
    ) -> Scenario:
        """The same scenario under another load (the command line's overrides)."""
        workload = self.workload
        min_new = self.min_new_tokens
        if arrival_rate is not None:
            if not (math.isfinite(arrival_rate) and arrival_rate > 0):
                raise ConfigError(f"arrival rate must be > 0 sessions/s, got {arrival_rate}")
            workload = dataclasses.replace(workload, arrival_rate=float(arrival_rate))
        if l_max is not None:
            if l_max < 1:
                raise ConfigError(f"l_max must be >= 1 token, got {l_max}")
            workload = dataclasses.replace(workload, l_max=l_max)
            min_new = min(min_new, l_max)
        if duration is not None:
            if not (math.isfinite(duration) and duration > 0):
                raise ConfigError(f"duration must be > 0 s, got {duration}")
        problem = dataclasses.replace(self.problem, workload=workload)
        return dataclasses.replace(
            self,
            problem=problem,
            min_new_tokens=min_new,
            duration=self.duration if duration is None else float(duration),
        )


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
    "compute",
    "model",
    "server_classes",
    "network",
    "workload",
    "topology",
    "servers",
    "clients",
    "random_geometric",
}


@dataclass(frozen=True)
class _ServerClass:
    name: str
    memory_bytes: int
    tau_decode: float
    prefill_per_token: float
    prefill_fixed: float
    max_blocks: int | None
    batch_row: float | None

    def server(self, name: str, location: str) -> ServerSpec:
        return ServerSpec(
            name=name,
            memory_bytes=self.memory_bytes,
            tau_decode=self.tau_decode,
            prefill_per_token=self.prefill_per_token,
            prefill_fixed=self.prefill_fixed,
            location=location,
            max_blocks=self.max_blocks,
        )


def scenario_from_dict(data: object, *, source: str = "scenario") -> Scenario:
    top = Fields(data, source, allowed=_TOP)
    model = _model(top.child("model"))
    classes = _server_classes(top.child("server_classes"))
    hop_overhead, costs = _network_costs(top.child("network"))
    w = Fields(
        top.raw("workload"),
        top.path("workload"),
        allowed={"arrival_rate", "prompt_tokens", "max_new_tokens", "min_new_tokens", "duration_s"},
    )
    l_max = w.integer("max_new_tokens", minimum=1)
    if top.has("random_geometric"):
        for key in ("topology", "servers", "clients"):
            if top.has(key):
                raise ConfigError(
                    f"{top.path(key)}: not allowed with random_geometric (it generates them)"
                )
        network, servers, clients = _random_geometric(
            top.child("random_geometric"), classes, hop_overhead
        )
    else:
        network, servers, clients = _explicit_swarm(top, classes, hop_overhead)
    workload = Workload(
        l_in=w.integer("prompt_tokens", minimum=1),
        l_max=l_max,
        arrival_rate=w.number("arrival_rate", positive=True),
        clients=clients,
    )
    return Scenario(
        name=top.string("name"),
        description=top.string("description", default="-"),
        problem=PlacementProblem(
            model=model, servers=tuple(s for s, _ in servers), workload=workload, network=network
        ),
        costs=costs,
        min_new_tokens=w.integer("min_new_tokens", default=l_max, minimum=1, maximum=l_max),
        duration=w.number("duration_s", positive=True),
        server_classes={s.name: class_name for s, class_name in servers},
        compute=top.string("compute", default=QUEUE),
        batch_row={
            s.name: row
            for s, class_name in servers
            if (row := classes[class_name].batch_row) is not None
        },
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
    kv_dim = hidden // heads * kv_heads
    return ModelSpec(
        name=f.string("name", default="model"),
        num_blocks=f.integer("num_blocks", minimum=1, maximum=MAX_BLOCKS),
        hidden_size=hidden,
        block_bytes=round(f.number("block_gb", positive=True) * GB),
        # K and V of one token in one block: 2 * d_kv * dtype bytes.
        kv_bytes_per_token_block=2 * kv_dim * f.integer("cache_dtype_bytes", default=2, minimum=1),
    )


def _server_classes(f: Fields) -> dict[str, _ServerClass]:
    if not f.data:
        raise ConfigError(f"{f.where}: needs at least one server class")
    classes = {}
    for name in f.data:
        c = f.child(
            name,
            allowed={
                "decode_ms_per_block",
                "prefill_ms_per_block",
                "memory_gb",
                "max_blocks",
                "batch_row_ms_per_block",
            },
        )
        prefill = c.child("prefill_ms_per_block", allowed={"per_prompt_token", "fixed"})
        classes[name] = _ServerClass(
            name=name,
            tau_decode=c.number("decode_ms_per_block", positive=True) * MS,
            prefill_per_token=prefill.number("per_prompt_token", minimum=0) * MS,
            prefill_fixed=prefill.number("fixed", minimum=0) * MS,
            memory_bytes=round(c.number("memory_gb", positive=True) * GB),
            max_blocks=c.integer("max_blocks", minimum=1) if c.has("max_blocks") else None,
            batch_row=(
                c.number("batch_row_ms_per_block", minimum=0) * MS
                if c.has("batch_row_ms_per_block")
                else None
            ),
        )
    return classes


def _network_costs(f: Fields) -> tuple[float, SessionCosts]:
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
    costs = SessionCosts(
        prefill_overhead=f.number("prefill_overhead_ms", minimum=0) * MS,
        prefill_per_token=f.number("prefill_ms_per_prompt_token", minimum=0) * MS,
        session_open=f.number("session_open_ms", minimum=0) * MS,
    )
    return f.number("per_token_overhead_ms", minimum=0) * MS, costs


_Servers = list[tuple[ServerSpec, str]]  # (server, class name), in join order
_Clients = tuple[tuple[str, float], ...]  # (location, share)


def _explicit_swarm(
    top: Fields, classes: dict[str, _ServerClass], hop_overhead: float
) -> tuple[Network, _Servers, _Clients]:
    servers: _Servers = []
    for i, item in enumerate(top.objects("servers")):
        s = Fields(item, f"{top.path('servers')}[{i}]", allowed={"id", "class", "node", "count"})
        class_name = s.string("class")
        if class_name not in classes:
            raise ConfigError(
                f"{s.path('class')}: unknown server class {class_name!r}"
                f" (defined: {', '.join(classes)})"
            )
        base = s.string("id")
        count = s.integer("count", minimum=1, maximum=MAX_SERVERS) if s.has("count") else None
        if len(servers) + (count or 1) > MAX_SERVERS:
            raise ConfigError(f"{top.path('servers')}: more than {MAX_SERVERS} servers")
        ids = [base] if count is None else [f"{base}-{k}" for k in range(count)]
        node = s.string("node")
        servers += [(classes[class_name].server(name, node), class_name) for name in ids]
    seen: set[str] = set()
    for server, _ in servers:
        if server.name in seen:
            raise ConfigError(f"{top.path('servers')}: duplicate server id {server.name!r}")
        seen.add(server.name)

    clients = []
    for i, item in enumerate(top.objects("clients")):
        c = Fields(item, f"{top.path('clients')}[{i}]", allowed={"node", "weight"})
        clients.append((c.string("node"), c.number("weight", default=1.0, positive=True)))

    t = top.child("topology")
    kind = t.string("kind")
    if kind == "clusters":
        t = Fields(t.data, t.where, allowed={"kind", "intra_rtt_ms", "inter_rtt_ms"})
        locations = [s.location for s, _ in servers] + [node for node, _ in clients]
        network = Network.clustered(
            list(dict.fromkeys(locations)),
            intra=t.number("intra_rtt_ms", minimum=0) * MS,
            inter=t.number("inter_rtt_ms", minimum=0) * MS,
            hop_overhead=hop_overhead,
        )
    elif kind == "matrix":
        t = Fields(t.data, t.where, allowed={"kind", "nodes", "rtt_ms"})
        nodes, matrix = _matrix(t)
        network = Network.from_matrix(nodes, matrix, hop_overhead=hop_overhead)
        for where, node in [("servers", s.location) for s, _ in servers] + [
            ("clients", node) for node, _ in clients
        ]:
            if node not in nodes:
                raise ConfigError(f"{top.path(where)}: node {node!r} is not in topology.nodes")
    else:
        raise ConfigError(f"{t.path('kind')}: expected 'clusters' or 'matrix', got {kind!r}")
    return network, servers, tuple(clients)


def _matrix(t: Fields) -> tuple[list[str], list[list[float]]]:
    nodes = t.objects("nodes")
    rows = t.objects("rtt_ms")
    if not all(isinstance(n, str) and n for n in nodes) or len(set(nodes)) != len(nodes):
        raise ConfigError(f"{t.path('nodes')}: expected distinct node names (strings)")
    if len(rows) != len(nodes) or not all(
        isinstance(r, list) and len(r) == len(nodes) for r in rows
    ):
        raise ConfigError(f"{t.path('rtt_ms')}: expected a {len(nodes)} x {len(nodes)} matrix")
    matrix = []
    for i, row in enumerate(rows):
        fields = Fields({str(j): v for j, v in enumerate(row)}, f"{t.path('rtt_ms')}[{i}]")
        matrix.append([fields.number(str(j), minimum=0) * MS for j in range(len(row))])
    for i in range(len(nodes)):
        for j in range(i):
            if matrix[i][j] != matrix[j][i]:
                raise ConfigError(
                    f"{t.path('rtt_ms')}: not symmetric ({nodes[i]} -> {nodes[j]}"
                    f" {rows[i][j]} ms, back {rows[j][i]} ms)"
                )
    return nodes, matrix


def _random_geometric(
    f: Fields, classes: dict[str, _ServerClass], hop_overhead: float
) -> tuple[Network, _Servers, _Clients]:
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
    client_fraction = f.number("client_fraction", positive=True)
    if client_fraction > 1:
        raise ConfigError(f"{f.path('client_fraction')}: must be <= 1, got {client_fraction}")
    # The graph is part of the scenario: its seed is the file's (and n), not
    # the workload's, so every run of scattered-40 sees the same deployment.
    rng = random.Random(f"{f.integer('seed')}/{n}")
    graph = random_geometric_topology(
        n,
        rng=rng,
        radius=f.number("radius", positive=True) if f.has("radius") else None,
        link_rtt=f.number("link_rtt_ms", minimum=0) * MS,
        rtt_per_unit=f.number("rtt_ms_per_unit", minimum=0) * MS,
        local_rtt=f.number("local_rtt_ms", minimum=0) * MS,
    )
    fast = set(rng.sample(range(n), round(fraction * n)))
    servers: _Servers = []
    for i, node in enumerate(graph.nodes):
        class_name = f.string("fast_class" if i in fast else "slow_class")
        servers.append((classes[class_name].server(f"{class_name}-{i:03d}", node), class_name))
    num_clients = max(1, round(client_fraction * n))
    clients = tuple((graph.nodes[i], 1.0) for i in sorted(rng.sample(range(n), num_clients)))
    network = Network.from_matrix(graph.nodes, graph.rtt, hop_overhead=hop_overhead)
    return network, servers, clients


def describe(scenario: Scenario) -> Sequence[str]:
    """A few human lines about a scenario (for the command line's header)."""
    counts: dict[str, int] = {}
    for class_name in scenario.server_classes.values():
        counts[class_name] = counts.get(class_name, 0) + 1
    w = scenario.workload
    return [
        f"scenario {scenario.name}: {scenario.description}",
        f"  model {scenario.model.name}: {scenario.model.num_blocks} blocks;"
        f" servers {', '.join(f'{n} x {c}' for c, n in counts.items())};"
        f" {len(w.clients)} client location(s)",
        f"  workload: lambda {w.arrival_rate:g}/s, l_in {w.l_in}, l_max {w.l_max},"
        f" {scenario.duration:g} s of arrivals; server compute: {scenario.compute}",
    ]
