"""From the client's swarm view to a chain of servers, via ``placement.route``.

The algorithm (Dijkstra over block boundaries, WS-RR cache penalty,
throughput spreading) lives in ``libpipe.placement`` so that the simulator
routes with the very same code; here we only translate. A server's
per-block times come from the throughputs it measured over its whole span
(steps/s and tokens/s), divided over its blocks; a server that has not
measured yet is charged ``DEFAULT_TAU`` per block, pessimistic like the
default RTT.

A session that forwards (the default) sends a decode step client -> s1 ->
... -> sk -> client, so its route is priced as such (``placement.Forwarding``):
the client's RTTs to the first and last hop, and between servers the round
trips their records publish (``peer_rtt_us``, from their SWIM probes). A
pair neither record measured costs the sum of both servers' client RTTs:
what the client pays carrying that hop itself, so an unmeasured pair prices
the route as the client-centric cost does, never better. Each message of
a forwarded step also costs ``FORWARD_MESSAGE_OVERHEAD``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import NoRouteError
from ..placement import Forwarding, ServerView, route
from ._view import ServerEntry, SwarmView

# Per-block seconds charged to a server that announced no throughput yet:
# a CPU block of a small model takes about a millisecond, a 7B block on a
# consumer GPU a few; 20 ms keeps such a server the last choice.
DEFAULT_TAU = 0.02
# Seconds charged per message of a forwarded step (k + 1 messages for k
# hops; placement's ``message_overhead``) for what round trips leave out: a
# server receiving, decoding and pushing on. Half of the 1 ms an extra hop
# may add per token on loopback (issue 5's target, which bench/e2e.py
# checks), split half per message as docs/placement.md does. Without it a
# hop between two servers a fraction of a millisecond apart looks free, and
# a route picks up extra hops on noise in the servers' figures.
FORWARD_MESSAGE_OVERHEAD = 0.0005


@dataclass(frozen=True)
class PlannedHop:
    """Blocks ``[start, end)`` to compute on ``server``."""

    server: ServerEntry
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    def describe(self) -> str:
        return f"{self.server.peer_id[:12]}@{self.server.address}[{self.start}:{self.end})"


def server_views(
    entries: list[ServerEntry], view: SwarmView, *, start: int, end: int, tokens: int = 1
) -> list[ServerView]:
    """Routing's picture of ``entries``, spans clipped to ``[start, end)``.

    ``tokens``: how many tokens one bulk request carries; the bulk time per
    block is for all of them, so that it weighs against the RTT as it will
    (a 4k-token forward is compute-bound, a 4-token one is not)."""
    out = []
    for e in entries:
        lo, hi = max(e.span[0], start), min(e.span[1], end)
        if lo >= hi:
            continue
        blocks = e.blocks
        out.append(
            ServerView(
                peer_id=e.peer_id,
                start=lo,
                end=hi,
                tau_decode=_per_block(e.throughput_decode, blocks),
                tau_forward=tokens * _per_block(e.throughput_forward, blocks),
                rtt=view.rtt_of(e.peer_id),
                free_cache_bytes=e.free_cache_bytes,
                cache_bytes_per_token_block=e.cache_bytes_per_token // blocks,
            )
        )
    return out


def plan_route(
    view: SwarmView,
    *,
    start: int,
    end: int,
    objective: Literal["latency", "throughput"] = "latency",
    session_tokens: int = 0,
    batch: int = 1,
    load: Mapping[str, float] | None = None,
    rng: random.Random | None = None,
    tokens: int = 1,
    forwarding: bool = False,
) -> list[PlannedHop]:
    """The best chain over blocks ``[start, end)`` among routable servers
    (``tokens``: per bulk request, for the "throughput" objective;
    ``forwarding``: price a "latency" route as forwarded server to server).

    Raises ``NoRouteError`` naming the uncovered blocks (and, when servers
    are banned or were left out, why)."""
    entries = view.routable(max_length=session_tokens or None)
    views = server_views(entries, view, start=start, end=end, tokens=tokens)
    try:
        chosen = route(
            views,
            view.num_blocks,
            start=start,
            end=end,
            session_tokens=session_tokens,
            batch=batch,
            objective=objective,
            load=load,
            rng=rng,
            forwarding=forwarding_costs(entries, view) if forwarding else None,
        )
    except NoRouteError as exc:
        raise NoRouteError(
            f"{exc.message}{_why_not(view)}", **exc.details, known_servers=len(view.servers)
        ) from None
    by_id = {e.peer_id: e for e in entries}
    return [PlannedHop(by_id[h.peer_id], h.start, h.end) for h in chosen.hops]


def forwarding_costs(entries: list[ServerEntry], view: SwarmView) -> Forwarding:
    """``placement.Forwarding`` for routes over ``entries``: client RTTs as
    probed, server-to-server RTTs as the servers' records say (see the
    module docstring)."""
    by_id = {e.peer_id: e for e in entries}

    def server_rtt(a: str, b: str) -> float:
        measured = _measured_rtt(by_id[a], by_id[b])
        return view.rtt_of(a) + view.rtt_of(b) if measured is None else measured

    client_rtt = {e.peer_id: view.rtt_of(e.peer_id) for e in entries}
    return Forwarding(
        server_rtt=server_rtt, client_rtt=client_rtt, message_overhead=FORWARD_MESSAGE_OVERHEAD
    )


def _measured_rtt(a: ServerEntry, b: ServerEntry) -> float | None:
    """The round trip between ``a`` and ``b`` by their records (the mean of
    both directions' figures when both measured), or None. A figure counts
    only where a push between them goes to the address it was measured at
    (``push_address`` is the announced one)."""
    if a.push_address not in a.announced or b.push_address not in b.announced:
        return None
    measured = [rtt for rtt in (a.rtt_to(b.peer_id), b.rtt_to(a.peer_id)) if rtt is not None]
    return sum(measured) / len(measured) if measured else None


def _per_block(throughput: float, blocks: int) -> float:
    if throughput <= 0:
        return DEFAULT_TAU
    return 1.0 / throughput / blocks


def _why_not(view: SwarmView) -> str:
    notes = []
    banned = [p for p in view.servers if view.is_banned(p)]
    if banned:
        notes.append(f"{len(banned)} server(s) banned after failures")
    probation = [p for p in view.servers if view.on_probation(p)]
    if probation:
        notes.append(f"{len(probation)} ban(s) over, awaiting a probe's answer")
    offline = [e.peer_id for e in view.servers.values() if e.state != "online"]
    if offline:
        notes.append(f"{len(offline)} not online")
    notes.extend(f"{n} left out ({why})" for why, n in sorted(view.skipped.items()))
    return f" ({'; '.join(notes)})" if notes else ""
