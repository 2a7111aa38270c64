"""Failure detection: one probe round, as a plain function the scheduler calls.

SWIM's detector, shaped like memberlist's probeNode: every round we ping
one member (round-robin over a shuffled list, so every member is probed
within one pass, unlike pure random choice whose worst case is unbounded).
No ack within ``probe_timeout`` and we ask ``indirect_checks`` other members
to ping it for us, which tells a dead member apart from one bad link of
ours. Only when nobody got an ack by the end of the round do we suspect it;
the suspicion (see _suspicion.py) gives it time to refute before it is
declared dead.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._node import GossipNode

# Below this many candidates sampling filters the whole list; above, it
# draws at random and rejects (O(k) instead of O(N) for large swarms).
_SMALL = 64


class ProbeResult(enum.Enum):
    IDLE = "idle"  # nobody to probe
    ACK = "ack"  # the direct ping was answered
    INDIRECT_ACK = "indirect_ack"  # only a helper reached it
    SUSPECTED = "suspected"


class ProbeOrder:
    """The shuffled round-robin list of members to probe (and to sample from)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._ids: list[str] = []
        self._index = 0

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, peer_id: str) -> None:
        """Insert at a random place, so new members are probed soon but not first."""
        pos = self._rng.randint(0, len(self._ids))
        self._ids.insert(pos, peer_id)
        if pos < self._index:
            self._index += 1

    def remove(self, peer_id: str) -> None:
        pos = self._ids.index(peer_id)
        del self._ids[pos]
        if pos < self._index:
            self._index -= 1

    def next(self, probeable: Callable[[str], bool]) -> str | None:
        """The next member to probe; reshuffles at the end of each pass."""
        for _ in range(len(self._ids) + 1):
            if self._index >= len(self._ids):
                self._rng.shuffle(self._ids)
                self._index = 0
                if not self._ids:
                    return None
            peer_id = self._ids[self._index]
            self._index += 1
            if probeable(peer_id):
                return peer_id
        return None

    def sample(self, k: int, accept: Callable[[str], bool]) -> list[str]:
        """Up to ``k`` distinct members for which ``accept`` holds, at random."""
        if len(self._ids) <= _SMALL:
            candidates = [p for p in self._ids if accept(p)]
            return self._rng.sample(candidates, min(k, len(candidates)))
        chosen: list[str] = []
        for _ in range(8 * k):
            peer_id = self._ids[self._rng.randrange(len(self._ids))]
            if peer_id not in chosen and accept(peer_id):
                chosen.append(peer_id)
                if len(chosen) == k:
                    break
        return chosen


async def probe_round(node: GossipNode) -> ProbeResult:
    """Probe the next member; suspect it if neither we nor our helpers reach it."""
    config = node.config
    target_id = node.probe_order.next(node.is_probeable)
    if target_id is None:
        return ProbeResult.IDLE
    target = node.members[target_id]
    # The incarnation we probe at: if it refutes meanwhile, our suspicion
    # below names an older incarnation and is ignored everywhere.
    incarnation = target.incarnation
    deadline = trio.current_time() + config.probe_interval
    if await node.ping(target.address, target_id, timeout=config.probe_timeout):
        return ProbeResult.ACK

    helpers = node.probe_order.sample(
        config.indirect_checks, lambda p: p != target_id and node.is_probeable(p)
    )
    reached = False

    async def ask(helper_id: str, done: trio.CancelScope) -> None:
        nonlocal reached
        helper = node.members.get(helper_id)
        if helper is None:
            return
        body = {"target": target_id, "address": target.address}
        # Never negative: on a loaded machine the direct ping can overrun the round.
        remaining = max(0.0, deadline - trio.current_time())
        reply = await node.call(helper.address, "swarm.ping_req", body, timeout=remaining)
        if reply is not None and reply.get("ack") is True:
            reached = True
            done.cancel()

    async with trio.open_nursery() as nursery:
        for helper_id in helpers:
            nursery.start_soon(ask, helper_id, nursery.cancel_scope)
    if reached:
        return ProbeResult.INDIRECT_ACK
    node.on_suspect(target_id, incarnation, node.peer_id)
    return ProbeResult.SUSPECTED
