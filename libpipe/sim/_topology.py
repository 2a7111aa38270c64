"""Where servers and clients sit, and the round trip between any two places.

Two shapes: named clusters (one RTT inside a cluster, another between
clusters: the paper's testbeds) and random geometric graphs (nodes in the
unit square, linked when close, RTT along the shortest path: the paper's
"scattered" deployments).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """Symmetric RTT (seconds) between named nodes; a node to itself is its local RTT."""

    nodes: tuple[str, ...]
    rtt_matrix: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if n == 0 or len(set(self.nodes)) != n:
            raise ConfigError("topology: node names must be non-empty and unique")
        if len(self.rtt_matrix) != n or any(len(row) != n for row in self.rtt_matrix):
            raise ConfigError(f"topology: the RTT matrix must be {n} x {n}")
        for i, row in enumerate(self.rtt_matrix):
            for j, value in enumerate(row):
                if not (math.isfinite(value) and value >= 0):
                    raise ConfigError(
                        f"topology: RTT {self.nodes[i]} -> {self.nodes[j]} must be >= 0, got {value}"
                    )
                if value != self.rtt_matrix[j][i]:
                    raise ConfigError(
                        f"topology: RTT must be symmetric ({self.nodes[i]}, {self.nodes[j]})"
                    )
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.nodes)})

    def rtt(self, a: str, b: str) -> float:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return self.rtt_matrix[index[a]][index[b]]

    def __contains__(self, node: object) -> bool:
        return node in self._index  # type: ignore[attr-defined]


def clustered_topology(clusters: Sequence[str], *, intra_rtt: float, inter_rtt: float) -> Topology:
    names = tuple(dict.fromkeys(clusters))
    matrix = tuple(tuple(intra_rtt if a == b else inter_rtt for b in names) for a in names)
    return Topology(names, matrix)


@dataclass(frozen=True)
class GeometricGraph:
    """A random geometric graph and the RTT matrix its shortest paths give."""

    topology: Topology
    positions: tuple[tuple[float, float], ...]
    edges: tuple[tuple[int, int], ...]


def random_geometric_topology(
    num_nodes: int,
    *,
    rng: random.Random,
    radius: float | None,
    link_rtt: float,
    rtt_per_unit: float,
    local_rtt: float,
) -> GeometricGraph:
    """Nodes uniform in the unit square, an edge between nodes closer than ``radius``.

    A link's RTT is ``link_rtt + rtt_per_unit * distance`` (a fixed cost per
    router hop plus propagation); node-to-node RTT is the shortest path. The
    default radius is 1.5x the connectivity threshold sqrt(ln n / (pi n)) of
    random geometric graphs, so most draws are connected already; any
    component left over is joined to the rest by its shortest possible link,
    so the graph is always connected and the draw stays deterministic.
    """
    if num_nodes < 2:
        raise ConfigError(f"a random geometric graph needs >= 2 nodes, got {num_nodes}")
    if radius is None:
        radius = 1.5 * math.sqrt(math.log(num_nodes) / (math.pi * num_nodes))
    points = np.array([(rng.random(), rng.random()) for _ in range(num_nodes)])
    distance = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2))
    adjacency = (distance <= radius) & ~np.eye(num_nodes, dtype=bool)
    _connect_components(adjacency, distance)

    link = np.where(adjacency, link_rtt + rtt_per_unit * distance, np.inf)
    np.fill_diagonal(link, 0.0)
    rtt = _all_pairs_shortest(link)
    np.fill_diagonal(rtt, local_rtt)
    rtt = np.round(rtt, 9)  # exact symmetry after float sums
    rtt = np.minimum(rtt, rtt.T)

    names = tuple(f"node-{i:03d}" for i in range(num_nodes))
    edges = tuple((int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(adjacency)), strict=True))
    return GeometricGraph(
        topology=Topology(names, tuple(tuple(float(v) for v in row) for row in rtt)),
        positions=tuple((float(x), float(y)) for x, y in points),
        edges=edges,
    )


def _connect_components(adjacency: np.ndarray, distance: np.ndarray) -> None:
    """Join components (in place) by their shortest cross link until one remains."""
    while True:
        labels = _component_labels(adjacency)
        if labels.max() == 0:
            return
        inside = labels == 0
        cross = np.where(inside[:, None] & ~inside[None, :], distance, np.inf)
        i, j = np.unravel_index(np.argmin(cross), cross.shape)
        adjacency[i, j] = adjacency[j, i] = True


def _component_labels(adjacency: np.ndarray) -> np.ndarray:
    n = adjacency.shape[0]
    labels = np.full(n, -1)
    label = 0
    for root in range(n):
        if labels[root] >= 0:
            continue
        stack = [root]
        labels[root] = label
        while stack:
            node = stack.pop()
            for other in np.nonzero(adjacency[node])[0]:
                if labels[other] < 0:
                    labels[other] = label
                    stack.append(int(other))
        label += 1
    return labels


def _all_pairs_shortest(link: np.ndarray) -> np.ndarray:
    """Floyd-Warshall, vectorised by rows (n <= a few hundred here)."""
    dist = link.copy()
    for k in range(dist.shape[0]):
        np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :], out=dist)
    return dist
