"""What routing and placement know about a server, and what a route is.

These are the types the client, the server, the swarm and the simulator all
share: the live system fills a ``ServerView`` from a gossiped record plus the
client's own RTT measurements; the simulator fills it from a scenario.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from ._blocks import check_seconds, is_int, is_number


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
        if not (is_int(self.start) and is_int(self.end) and 0 <= self.start <= self.end):
            raise ConfigError(
                f"server {self.peer_id}: span [{self.start}, {self.end}) is not a block range",
                peer_id=self.peer_id,
            )
        for name in ("tau_decode", "tau_forward", "rtt"):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"server {self.peer_id}: {name} must be a finite number >= 0, got {value!r}",
                    peer_id=self.peer_id,
                )
        for name in ("free_cache_bytes", "cache_bytes_per_token_block"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 0):
                raise ConfigError(
                    f"server {self.peer_id}: {name} must be an int >= 0, got {value!r}",
                    peer_id=self.peer_id,
                )
        for item in self.cache_release:
            if not (
                isinstance(item, tuple)
                and len(item) == 2
                and is_number(item[0])
                and math.isfinite(item[0])
                and item[0] >= 0
                and is_int(item[1])
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
class Forwarding:
    """Server-to-server forwarding: a decode step goes client -> s1 -> s2 ->
    ... -> sk -> client, each server pushing its output straight to the next
    (the client still receives every hop's output, off the critical path).

    A route's per-token time is then the one-way trips on that path plus the
    compute: client_rtt(s1) / 2 + sum server_rtt(s_i, s_i+1) / 2 +
    client_rtt(sk) / 2 + (k + 1) * ``message_overhead`` + sum k_j * tau_j
    (+ each hop's cache penalty, as without forwarding).

    - ``server_rtt(a, b)``: round trip in seconds between the sites of two
      servers (the caller's best estimate; it must answer for every pair
      routing asks about, with a finite number >= 0). It is asked once per
      pair of sites among the servers routed over, for the life of this
      Forwarding (answers are kept: build a new one when RTTs change);
      never for a server with itself.
    - ``client_rtt``: the client's round trip to each server by peer id; a
      server not in it uses its view's ``rtt``.
    - ``message_overhead``: seconds charged per message on the critical path
      (k + 1 messages for k hops), for costs the RTTs leave out.
    - ``site``: peer id -> the name of its site, for servers that share
      their RTTs to everyone (a cluster, a host): ``server_rtt`` is then
      asked about sites, which keeps swarms of hundreds of servers fast. A
      server not in it is its own site, named by its peer id; so without
      ``site``, ``server_rtt`` is asked about peer ids.
    """

    server_rtt: Callable[[str, str], float]
    client_rtt: Mapping[str, float] = field(default_factory=dict)
    message_overhead: float = 0.0
    site: Mapping[str, str] = field(default_factory=dict)
    # Trip times asked so far, kept by _forward.trip_matrix.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.server_rtt):
            raise ConfigError(f"forwarding needs a callable server_rtt, got {self.server_rtt!r}")
        if not isinstance(self.client_rtt, Mapping):
            raise ConfigError(
                f"forwarding client_rtt must map peer ids to seconds, got {self.client_rtt!r}"
            )
        for peer, value in self.client_rtt.items():
            check_seconds(f"forwarding client_rtt of {peer}", value)
        if not (
            isinstance(self.site, Mapping)
            and all(isinstance(name, str) for name in self.site.values())
        ):
            raise ConfigError(f"forwarding site must map peer ids to names, got {self.site!r}")
        check_seconds("forwarding message_overhead", self.message_overhead)

    def client_one_way(self, view: ServerView) -> float:
        """Seconds for one message between the client and ``view``'s server."""
        return self.client_rtt.get(view.peer_id, view.rtt) / 2 + self.message_overhead

    def wire_time(self, peers: Sequence[str], message_overhead: float | None = None) -> float:
        """Seconds on the wire for one step forwarded through the servers
        ``peers`` in order: client -> first, each server to the next, last ->
        client, with ``message_overhead`` (default: this Forwarding's) per
        message. Every peer must be in ``client_rtt`` (a ``ConfigError``
        otherwise): this is for callers that know each server's RTT, like
        the simulator."""
        if not peers:
            return 0.0
        overhead = self.message_overhead if message_overhead is None else message_overhead
        check_seconds("message_overhead", overhead)
        for peer in (peers[0], peers[-1]):
            if peer not in self.client_rtt:
                raise ConfigError(f"forwarding has no client RTT for {peer}", peer_id=peer)
        seconds = (self.client_rtt[peers[0]] + self.client_rtt[peers[-1]]) / 2
        for a, b in itertools.pairwise(peers):
            value = self.server_rtt(self.site_of(a), self.site_of(b))
            check_seconds(f"forwarding server_rtt({a!r}, {b!r})", value)
            seconds += value / 2
        return seconds + (len(peers) + 1) * overhead

    def site_of(self, peer_id: str) -> str:
        return self.site.get(peer_id, peer_id)

    def site_one_way(self, a: str, b: str) -> float:
        """Seconds for one message from a server at site ``a`` to one at ``b``."""
        value = self.server_rtt(a, b)
        check_seconds(f"forwarding server_rtt({a!r}, {b!r})", value)
        return value / 2 + self.message_overhead


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
    spreading factor). With ``Forwarding`` the per-hop ``rtt`` terms are
    replaced by the one-way trips of the forwarded path (see ``Forwarding``).
    """

    hops: tuple[Hop, ...]
    cost: float
    forwarded: bool = False  # costed for server-to-server forwarding

    @property
    def start(self) -> int | None:
        return self.hops[0].start if self.hops else None

    @property
    def end(self) -> int | None:
        return self.hops[-1].end if self.hops else None
