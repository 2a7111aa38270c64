"""Round trips to other members, from the SWIM probes, for the record.

Every probe round already times one ping to a member; keeping a figure
per member costs nothing more, and published in the signed record
(``peer_rtt_us``) it tells clients what a step forwarded from this server to
that one costs. A record has room for ``MAX_PEER_RTTS`` of them: the nearest
members, because those are the hops a forwarding route gains on (a pair a
record leaves out is priced pessimistically by the client).

The figure is the median of the last ``RTT_WINDOW`` pings, not an average:
a ping's round trip includes the time the peer's event loop takes to
answer it (a decode pass run inline, a burst of signature checks), which
comes in spikes of many milliseconds between servers a fraction of one
apart. An average carries such a spike for several rounds and a route
avoids a near pair meanwhile; the median ignores up to two spikes in five
and follows a real change within three pings.
"""

from __future__ import annotations

import statistics
from collections import deque

from ._record import MAX_PEER_RTT_US, MAX_PEER_RTTS, PEER_RTT_PREFIX

# Pings a figure is the median of (one probe round pings one member, so in
# a swarm of n servers a figure covers the last 5n rounds).
RTT_WINDOW = 5


class PeerRtts:
    """A round trip per member, in seconds: the median of its last pings."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, peer_id: str, seconds: float) -> None:
        samples = self._samples.get(peer_id)
        if samples is None:
            samples = self._samples[peer_id] = deque(maxlen=RTT_WINDOW)
        samples.append(seconds)

    def forget(self, peer_id: str) -> None:
        self._samples.pop(peer_id, None)

    def get(self, peer_id: str) -> float | None:
        samples = self._samples.get(peer_id)
        return None if samples is None else statistics.median(samples)

    def published(self, limit: int = MAX_PEER_RTTS) -> tuple[tuple[str, int], ...]:
        """The ``limit`` nearest members as the record's ``peer_rtt_us``
        (prefix -> whole microseconds, sorted by prefix, capped at
        ``MAX_PEER_RTT_US``)."""
        figures = {peer_id: statistics.median(s) for peer_id, s in self._samples.items()}
        nearest = sorted(figures.items(), key=lambda item: (item[1], item[0]))[:limit]
        table = {
            peer_id[:PEER_RTT_PREFIX]: min(round(seconds * 1e6), MAX_PEER_RTT_US)
            for peer_id, seconds in nearest
        }
        return tuple(sorted(table.items()))
