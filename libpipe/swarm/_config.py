"""Gossip tuning: every derived quantity is a method here, beside its formula.

The constants of the presets come from hashicorp/memberlist's
``DefaultLANConfig`` / ``DefaultWANConfig`` / ``DefaultLocalConfig`` (the
values its authors tuned on real networks), plus our record lifetime, which
memberlist does not have. Tests pin each formula so that the docstrings and
the code cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError

# Above this many members the push-pull period grows (memberlist's
# pushPullScaleThreshold): full-state exchanges are O(N) bytes each, so
# doing them at a fixed rate would make the swarm's traffic O(N^2).
PUSH_PULL_SCALE_THRESHOLD = 32


@dataclass(frozen=True)
class GossipConfig:
    """Timing and fan-out of the membership protocol (seconds, counts).

    ``n`` below is the number of live members (alive or suspect, ourselves
    included), which each node estimates from its own table.
    """

    # A probe round starts every probe_interval; one member is pinged per round.
    probe_interval: float = 1.0
    # How long a direct ping waits for its ack before indirect probes start.
    # Must be below probe_interval: the indirect probes use the rest of it.
    probe_timeout: float = 0.5
    # k: members asked to ping the target for us when our direct ping fails,
    # so that one bad link between us and it does not make it suspect.
    indirect_checks: int = 3
    # suspicion_timeout(n) = suspicion_mult * max(1, log10(n + 1)) * probe_interval
    suspicion_mult: int = 4
    # suspicion_max_timeout(n) = suspicion_max_timeout_mult * suspicion_timeout(n):
    # where a lone suspicion starts; independent confirmations shorten it
    # towards suspicion_timeout(n) (see _suspicion.py).
    suspicion_max_timeout_mult: int = 6
    # retransmit_limit(n) = retransmit_mult * ceil(log10(n + 1)): how often a
    # piece of news is piggybacked before it is dropped from the queue.
    retransmit_mult: int = 4
    # Every gossip_interval, queued news goes to gossip_nodes random members.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # push_pull_period(n) = push_pull_interval * (ceil(log2(n) - log2(32)) + 1)
    # for n > 32, else push_pull_interval: full-state anti-entropy.
    push_pull_interval: float = 30.0
    # Budget for a request or reply (join, push-pull, indirect ping).
    request_timeout: float = 10.0
    # Dead and departed members are kept (and gossiped about) this long, so
    # a wrongly declared node can still hear the news and refute it.
    dead_reclaim_time: float = 30.0
    # Bytes of piggybacked news per message.
    max_piggyback_bytes: int = 4096
    # A node re-signs its record every 0.5-1.0 x record_refresh_interval
    # (jittered, so a swarm started at once spreads its refreshes). Each refresh
    # is news to every member, so it dominates a quiet swarm's traffic:
    # about n * retransmit_limit(n) * record bytes / interval per node.
    record_refresh_interval: float = 60.0
    # record_ttl = record_ttl_mult * record_refresh_interval: a record not
    # refreshed for that long is expired and dropped by every receiver.
    record_ttl_mult: float = 3.0
    # Records stamped further in the future than this (by the receiver's
    # clock) are rejected: bounds how long a forged future stamp could live.
    max_clock_skew: float = 60.0

    def __post_init__(self) -> None:
        positive = (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "push_pull_interval",
            "request_timeout",
            "record_refresh_interval",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError(
                "probe_timeout must be below probe_interval (indirect probes need the rest)",
                probe_timeout=self.probe_timeout,
                probe_interval=self.probe_interval,
            )
        for name in ("indirect_checks", "gossip_nodes", "suspicion_mult", "retransmit_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.suspicion_max_timeout_mult < 1:
            raise ConfigError("suspicion_max_timeout_mult must be at least 1")
        if self.record_ttl_mult <= 1:
            raise ConfigError("record_ttl_mult must exceed 1, or records expire before a refresh")
        if self.dead_reclaim_time < 0 or self.max_clock_skew < 0:
            raise ConfigError("dead_reclaim_time and max_clock_skew must not be negative")
        if self.max_piggyback_bytes < 256:
            raise ConfigError("max_piggyback_bytes below 256 cannot carry one signed record")

    # --- presets ---------------------------------------------------------------

    @classmethod
    def lan(cls) -> GossipConfig:
        """One data centre: memberlist's LAN values."""
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        """Volunteers across the Internet: slow, lossy links (memberlist's WAN)."""
        return cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6,
            gossip_interval=0.5,
            gossip_nodes=4,
            push_pull_interval=60.0,
            request_timeout=30.0,
            dead_reclaim_time=60.0,
            record_refresh_interval=120.0,
        )

    @classmethod
    def local(cls) -> GossipConfig:
        """One machine (tests, ``libpipe demo``): fast detection (memberlist's Local).

        Unlike memberlist's Local we keep retransmit_mult at 4: with 2, news
        dies out before reaching a few percent of a 100-node swarm (each
        member misses it with probability ~ exp(-transmissions)) and waits
        for the next push-pull."""
        return cls(
            probe_interval=1.0,
            probe_timeout=0.2,
            suspicion_mult=3,
            gossip_interval=0.1,
            push_pull_interval=15.0,
            request_timeout=1.0,
            dead_reclaim_time=15.0,
            record_refresh_interval=10.0,
        )

    def replace(self, **changes: object) -> GossipConfig:
        """A copy with some fields changed (validated like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # --- formulas --------------------------------------------------------------

    def suspicion_timeout(self, n: int) -> float:
        """Shortest time a suspect member has to refute before it is dead.

        Grows with log(n) because news needs about log(n) gossip rounds to
        reach the suspect and its refutation as long to come back."""
        return self.suspicion_mult * max(1.0, math.log10(n + 1)) * self.probe_interval

    def suspicion_max_timeout(self, n: int) -> float:
        """Time a suspicion lasts when nobody else confirms it."""
        return self.suspicion_max_timeout_mult * self.suspicion_timeout(n)

    def suspicion_confirmations(self, n: int) -> int:
        """Independent confirmations that bring a suspicion down to its minimum.

        memberlist's rule: suspicion_mult - 2, or 0 in swarms too small to
        have that many other members."""
        k = self.suspicion_mult - 2
        return 0 if n - 2 < k else max(0, k)

    def retransmit_limit(self, n: int) -> int:
        """Times each piece of news is sent before it leaves the queue."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def push_pull_period(self, n: int) -> float:
        """Push-pull period, stretched beyond 32 members to keep traffic O(N log N)."""
        if n <= PUSH_PULL_SCALE_THRESHOLD:
            return self.push_pull_interval
        multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
        return self.push_pull_interval * multiplier

    @property
    def record_ttl(self) -> float:
        """Age after which a record is expired."""
        return self.record_ttl_mult * self.record_refresh_interval
