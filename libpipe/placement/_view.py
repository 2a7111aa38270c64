"""What routing and placement know about a server, and what a route is.

These are the types the client, the server, the swarm and the simulator all
share: the live system fills a ``ServerView`` from a gossiped record plus the
client's own RTT measurements; the simulator fills it from a scenario.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ServerView:
    """One server as routing and placement see it.

    ``start``/``end`` is the half-open block span the server holds
    (``start == end``: none yet). Times are seconds:

    - ``tau_decode``: one decode step (one token per sequence) through one
      block; the paper's tau_j.
    - ``tau_forward``: one token of bulk forward through one block
      (1 / per-block throughput); used by the "throughput" objective.
    - ``rtt``: the round trip between the routing client and this server,
      plus any fixed per-hop overhead the caller wants charged per hop (the
      simulator folds its per-hop network constant in here). The default is
      deliberately pessimistic so that an unprobed server is not preferred.

    Cache (for the WS-RR waiting penalty):

    - ``free_cache_bytes``: KV cache bytes free right now.
    - ``cache_bytes_per_token_block``: what one token of one sequence costs in
      one block (``2 * d_kv * dtype bytes``); 0 means "do not model cache".
    - ``cache_release``: future releases the router may wait for, as
      ``(seconds from now, bytes freed then)`` pairs in any order. The
      simulator knows them (every session has a deadline); the live system
      leaves them empty, and a server whose free cache is short then costs
      ``UNSCHEDULED_WAIT_S`` of waiting (see ``_route.py``).
    """

    peer_id: str
    start: int
    end: int
    tau_decode: float
    tau_forward: float
    rtt: float = 0.05
    free_cache_bytes: int = 2**62
    cache_bytes_per_token_block: int = 0
    cache_release: tuple[tuple[float, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ConfigError(f"server view needs a non-empty peer_id, got {self.peer_id!r}")
        if not (_is_int(self.start) and _is_int(self.end) and 0 <= self.start <= self.end):
            raise ConfigError(
                f"server {self.peer_id}: span [{self.start}, {self.end}) is not a block range",
                peer_id=self.peer_id,
            )
        for name in ("tau_decode", "tau_forward", "rtt"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"server {self.peer_id}: {name} must be a finite number >= 0, got {value!r}",
                    peer_id=self.peer_id,
                )
        for name in ("free_cache_bytes", "cache_bytes_per_token_block"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                raise ConfigError(
                    f"server {self.peer_id}: {name} must be an int >= 0, got {value!r}",
                    peer_id=self.peer_id,
                )
        for item in self.cache_release:
            if not (
                isinstance(item, tuple)
                and len(item) == 2
                and _is_number(item[0])
                and math.isfinite(item[0])
                and item[0] >= 0
                and _is_int(item[1])
                and item[1] >= 0
            ):
                raise ConfigError(
                    f"server {self.peer_id}: cache_release entries are (seconds >= 0, bytes >= 0),"
                    f" got {item!r}",
                    peer_id=self.peer_id,
                )

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) of the model computed on server ``peer_id``."""

    peer_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Route:
    """A chain of hops covering consecutive blocks.

    ``cost`` is the predicted seconds per token under the objective it was
    computed for: for "latency", sum over hops of ``rtt + blocks * tau_decode``
    plus the waiting penalty spread over the session's tokens; for
    "throughput", the load-weighted bulk-forward time (without the random
    spreading factor).
    """

    hops: tuple[Hop, ...]
    cost: float

    @property
    def start(self) -> int | None:
        return self.hops[0].start if self.hops else None

    @property
    def end(self) -> int | None:
        return self.hops[-1].end if self.hops else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
