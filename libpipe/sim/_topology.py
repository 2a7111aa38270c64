"""Random geometric graphs: the paper's "scattered" deployments.

Nodes in the unit square, linked when close, RTT along the shortest path.
(Clustered deployments need no generator: ``Network.clustered``.)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class GeometricGraph:
    """A random geometric graph and the RTT matrix (seconds) its shortest paths give."""

    nodes: tuple[str, ...]
    rtt: tuple[tuple[float, ...], ...]
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
        nodes=names,
        rtt=tuple(tuple(float(v) for v in row) for row in rtt),
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
