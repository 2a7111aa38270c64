"""Dissemination: one gossip round, as a plain function the scheduler calls.

News rides on every ping and ack (see ``GossipNode.call``), but probes go
to one member per ``probe_interval``; memberlist adds these rounds so news
spreads at ``gossip_nodes`` members per ``gossip_interval`` instead. A round
with an empty queue sends nothing, so a quiet swarm costs only its probes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._node import GossipNode


def gossip_round(node: GossipNode) -> int:
    """Send queued news to up to ``gossip_nodes`` random members; returns messages sent."""
    if not node.broadcasts:
        return 0
    config = node.config
    sent = 0
    for peer_id in node.probe_order.sample(config.gossip_nodes, node.is_probeable):
        news = node.broadcasts.take(config.max_piggyback_bytes)
        if not news:
            break
        node.send_notify(node.members[peer_id].address, "swarm.gossip", {"gossip": news})
        sent += 1
    return sent
