"""Round trips to other members, from the SWIM probes, for the record.

Every probe round already times one ping to a member; keeping a smoothed
figure per member costs nothing more, and published in the signed record
(``peer_rtt_us``) it tells clients what a step forwarded from this server to
that one costs. A record has room for ``MAX_PEER_RTTS`` of them: the nearest
members, because those are the hops a forwarding route gains on (a pair a
record leaves out is priced pessimistically by the client).
"""

from __future__ import annotations

from ._record import MAX_PEER_RTT_US, MAX_PEER_RTTS, PEER_RTT_PREFIX

# Weight of a new sample: about the last five pings matter, as in the
# client's own RTT estimate (one probe round pings one member, so a swarm of
# n servers refreshes each figure every n rounds).
RTT_EMA_ALPHA = 0.3


class PeerRtts:
    """A smoothed round trip per member, in seconds."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._seconds)

    def observe(self, peer_id: str, seconds: float) -> None:
        old = self._seconds.get(peer_id)
        self._seconds[peer_id] = seconds if old is None else old + RTT_EMA_ALPHA * (seconds - old)

    def forget(self, peer_id: str) -> None:
        self._seconds.pop(peer_id, None)

    def get(self, peer_id: str) -> float | None:
        return self._seconds.get(peer_id)

    def published(self, limit: int = MAX_PEER_RTTS) -> tuple[tuple[str, int], ...]:
        """The ``limit`` nearest members as the record's ``peer_rtt_us``
        (prefix -> whole microseconds, sorted by prefix, capped at
        ``MAX_PEER_RTT_US``)."""
        nearest = sorted(self._seconds.items(), key=lambda item: (item[1], item[0]))[:limit]
        table = {
            peer_id[:PEER_RTT_PREFIX]: min(round(seconds * 1e6), MAX_PEER_RTT_US)
            for peer_id, seconds in nearest
        }
        return tuple(sorted(table.items()))
