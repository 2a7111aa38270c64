"""The performance model's inputs (Sun, He, Ji and Parag, arXiv 2512.21884).

Symbols, as in ../shared/DESIGN.md:

- L blocks of s_m bytes each (``ModelSpec``); a session's KV cache costs
  s_c = 2 * d_kv * (l_in + l_max) * bytes per block it passes through
  (``ModelSpec.session_cache_bytes``).
- Server j (``ServerSpec``): usable memory M_j, decode time tau_j per block per
  token, prefill time per block tau_I_j(l_in) = a_j * l_in + b_j.
- Per-token time of a route: sum over hops of (rtt_cj + k_j * tau_j); the
  first token adds sum over hops of (rtt_cj + k_j * tau_I_j(l_in)).
- Memory: s_m * m_j + s_c * (sessions x blocks used) <= M_j.

A placement problem bundles these with the workload (``Workload``) and the
network (``Network``). The simulator builds one from a scenario file; the
live system builds ``ServerView`` objects from measurements instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ._view import Forwarding, ServerView

# PETALS reserves cache for this many tokens per hosted block whatever the
# workload (its server's default attention cache size), in fp16.
PETALS_CACHE_TOKENS = 4096
PETALS_CACHE_DTYPE_BYTES = 2

Placement = dict[str, tuple[int, int]]
"""Server name -> half-open block span [start, end) it should hold."""


@dataclass(frozen=True)
class ModelSpec:
    """The served model, as far as placement cares.

    ``block_bytes`` is s_m: one block's weights as served (after
    quantisation). ``kv_bytes_per_token_block`` is the KV cache one token of
    one sequence costs in one block: 2 (K and V) * d_kv * dtype bytes, where
    d_kv = kv heads * head dim (hidden size without GQA).
    """

    num_blocks: int
    block_bytes: int
    hidden_size: int
    kv_bytes_per_token_block: int
    name: str = "model"

    def __post_init__(self) -> None:
        for field in ("num_blocks", "block_bytes", "hidden_size", "kv_bytes_per_token_block"):
            _positive_int(f"model {self.name}", field, getattr(self, field))

    def session_cache_bytes(self, workload: Workload) -> int:
        """s_c: the cache one session holds in one block, for its whole life."""
        return self.kv_bytes_per_token_block * (workload.l_in + workload.l_max)

    def petals_cache_reservation(self) -> int:
        """Bytes PETALS sets aside per hosted block: 2 * hidden * 4096 * 2."""
        return 2 * self.hidden_size * PETALS_CACHE_TOKENS * PETALS_CACHE_DTYPE_BYTES


@dataclass(frozen=True)
class ServerSpec:
    """One server of a scenario.

    ``memory_bytes`` is M_j (usable for weights and cache). Times are seconds
    per block: ``tau_decode`` for one decode step, ``prefill_per_token`` (a)
    and ``prefill_fixed`` (b) for a prompt of l_in tokens (a * l_in + b),
    ``tau_forward`` per token of bulk forward (defaults to a). ``location``
    names the server's node in the ``Network``. ``max_blocks`` caps the
    blocks it can hold whatever its memory (the paper caps MIG slices at 4).
    """

    name: str
    memory_bytes: int
    tau_decode: float
    prefill_per_token: float
    prefill_fixed: float
    location: str
    max_blocks: int | None = None
    tau_forward: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"server needs a non-empty name, got {self.name!r}")
        _positive_int(f"server {self.name}", "memory_bytes", self.memory_bytes)
        for field in ("tau_decode", "prefill_per_token", "prefill_fixed"):
            _non_negative(f"server {self.name}", field, getattr(self, field))
        if self.tau_forward is not None:
            _non_negative(f"server {self.name}", "tau_forward", self.tau_forward)
        if self.max_blocks is not None:
            _positive_int(f"server {self.name}", "max_blocks", self.max_blocks)

    def prefill_time(self, l_in: int) -> float:
        """tau_I_j(l_in): seconds per block to prefill a prompt of l_in tokens."""
        return self.prefill_per_token * l_in + self.prefill_fixed

    @property
    def forward_time(self) -> float:
        """Seconds per block per token of bulk forward."""
        return self.prefill_per_token if self.tau_forward is None else self.tau_forward


@dataclass(frozen=True)
class Workload:
    """The offered load: prompts of ``l_in`` tokens, ``l_max`` generated
    tokens, sessions arriving as a Poisson process of ``arrival_rate`` per
    second from ``clients``: (location in the Network, share of arrivals)
    pairs; shares are normalised, so (("a", 1), ("b", 3)) sends 1/4 of
    sessions from a."""

    l_in: int
    l_max: int
    arrival_rate: float
    clients: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        _positive_int("workload", "l_in", self.l_in)
        _positive_int("workload", "l_max", self.l_max)
        _non_negative("workload", "arrival_rate", self.arrival_rate)
        if not self.clients:
            raise ConfigError("workload needs at least one client location")
        for item in self.clients:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ConfigError(f"workload clients are (location, share) pairs, got {item!r}")
            _non_negative("workload client", item[0], item[1])
        if sum(share for _, share in self.clients) <= 0:
            raise ConfigError("workload client shares must not all be zero")

    @property
    def session_tokens(self) -> int:
        """Tokens a session holds in cache at its end: l_in + l_max."""
        return self.l_in + self.l_max

    def client_shares(self) -> list[tuple[str, float]]:
        """(location, fraction of sessions) with fractions summing to 1."""
        total = sum(share for _, share in self.clients)
        return [(loc, share / total) for loc, share in self.clients if share > 0]


@dataclass(frozen=True)
class Network:
    """Round-trip times between named locations (clients' and servers').

    ``rtt`` maps a pair of locations to seconds; it is symmetric (giving
    (a, b) gives (b, a)), and a location not paired with itself has RTT 0 to
    itself. ``hop_overhead`` is charged once per hop on top of the RTT (a
    calibration constant of the simulator; 0 for the live system).
    """

    rtt: Mapping[tuple[str, str], float]
    hop_overhead: float = 0.0

    def __post_init__(self) -> None:
        for pair, seconds in self.rtt.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ConfigError(f"network RTT keys are (location, location), got {pair!r}")
            _non_negative("network rtt", f"{pair[0]}-{pair[1]}", seconds)
        _non_negative("network", "hop_overhead", self.hop_overhead)

    @classmethod
    def clustered(
        cls, clusters: Sequence[str], intra: float, inter: float, hop_overhead: float = 0.0
    ) -> Network:
        """Every location is a cluster: ``intra`` inside one, ``inter`` between."""
        rtt = {(a, b): (intra if a == b else inter) for a in clusters for b in clusters}
        return cls(rtt, hop_overhead)

    @classmethod
    def from_matrix(
        cls, locations: Sequence[str], seconds: Sequence[Sequence[float]], hop_overhead: float = 0.0
    ) -> Network:
        """A full matrix, row i and column j for locations[i] and locations[j]."""
        if len(seconds) != len(locations) or any(len(row) != len(locations) for row in seconds):
            raise ConfigError(f"RTT matrix must be {len(locations)} x {len(locations)}")
        rtt = {
            (a, b): float(seconds[i][j])
            for i, a in enumerate(locations)
            for j, b in enumerate(locations)
        }
        return cls(rtt, hop_overhead)

    def between(self, a: str, b: str) -> float:
        """RTT in seconds between two locations."""
        if (a, b) in self.rtt:
            return self.rtt[(a, b)]
        if (b, a) in self.rtt:
            return self.rtt[(b, a)]
        if a == b:
            return 0.0
        raise ConfigError(f"network has no RTT between {a!r} and {b!r}", missing=[a, b])

    def hop_time(self, client: str, server: str) -> float:
        """What one hop costs per token on the wire: RTT plus the hop overhead."""
        return self.between(client, server) + self.hop_overhead


@dataclass(frozen=True)
class PlacementProblem:
    """Everything an offline placement algorithm needs.

    ``servers`` are in join order (PETALS' rule depends on it).
    """

    model: ModelSpec
    servers: tuple[ServerSpec, ...]
    workload: Workload
    network: Network

    def __post_init__(self) -> None:
        names = [s.name for s in self.servers]
        if not names:
            raise ConfigError("a placement problem needs at least one server")
        if len(set(names)) != len(names):
            raise ConfigError("server names in a placement problem must be unique")

    def server(self, name: str) -> ServerSpec:
        for spec in self.servers:
            if spec.name == name:
                return spec
        raise ConfigError(f"no server named {name!r} in the problem")

    def views(self, placement: Mapping[str, tuple[int, int]], client: str) -> list[ServerView]:
        """ServerViews of the placed servers as seen from ``client``, with the
        cache left after weights as their free cache (no sessions yet)."""
        out = []
        for spec in self.servers:
            start, end = placement.get(spec.name, (0, 0))
            weights = (end - start) * self.model.block_bytes
            out.append(
                ServerView(
                    peer_id=spec.name,
                    start=start,
                    end=end,
                    tau_decode=spec.tau_decode,
                    tau_forward=spec.forward_time,
                    rtt=self.network.hop_time(client, spec.location),
                    free_cache_bytes=max(0, spec.memory_bytes - weights),
                    cache_bytes_per_token_block=self.model.kv_bytes_per_token_block,
                )
            )
        return out

    def forwarding(self, client: str) -> Forwarding:
        """Forwarding as seen from ``client``: server-to-server RTTs from the
        servers' locations, and the network's per-hop overhead split over
        the hop's two messages (a client-centric hop is a request and a
        reply, each paying half; a forwarded route of k hops sends k + 1
        messages, see docs/placement.md)."""
        where = {spec.name: spec.location for spec in self.servers}
        client_rtt = {name: self.network.between(client, loc) for name, loc in where.items()}
        return Forwarding(self.network.between, client_rtt, self.network.hop_overhead / 2, where)


def block_capacity(spec: ServerSpec, model: ModelSpec, per_block_reserve: int) -> int:
    """Blocks a server can hold when each needs s_m plus ``per_block_reserve``
    bytes of cache: min(floor(M_j / (s_m + reserve)), L, max_blocks)."""
    count = spec.memory_bytes // (model.block_bytes + per_block_reserve)
    count = min(count, model.num_blocks)
    if spec.max_blocks is not None:
        count = min(count, spec.max_blocks)
    return count


def _positive_int(owner: str, field: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{owner}: {field} must be an int >= 1, got {value!r}")


def _non_negative(owner: str, field: str, value: object) -> None:
    if not (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        raise ConfigError(f"{owner}: {field} must be a finite number >= 0, got {value!r}")
