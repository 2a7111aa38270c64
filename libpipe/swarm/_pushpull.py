"""Anti-entropy: a full-state exchange with one random member, periodically.

Piggybacked news is sent a bounded number of times and may be lost; a
push-pull repairs whatever it missed, and it is also how a node joins (its
first push-pull with a bootstrap peer gives it the whole membership at
once). Each entry carries the member's own signed record, so the receiver
learns about members it has never heard of and can verify them.

Merging follows memberlist's mergeState: a remote *dead* verdict only makes
us suspect the member (the remote side may be the one that is wrong, and a
suspicion gives the member a chance to refute), while *left* is final.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from ._state import MemberState

if TYPE_CHECKING:
    from ._node import GossipNode

# A state larger than this is refused before it is walked: a few times the
# largest swarm we plan for.
MAX_STATE_ENTRIES = 10_000


def local_state(node: GossipNode) -> list[list[Any]]:
    """Our table as [state, incarnation, signed record] entries.

    Live members whose records have expired are left out: passing them on
    would only make every receiver count and drop them."""
    entries = []
    for member in node.members.values():
        if member.state.is_live and member.peer_id != node.peer_id and node.record_expired(member):
            continue
        entries.append([member.state.value, member.incarnation, member.record.to_wire()])
    return entries


def merge_state(node: GossipNode, entries: Any) -> None:
    """Apply a peer's table to ours (raises InvalidRequestError on a bad shape)."""
    if not isinstance(entries, list) or len(entries) > MAX_STATE_ENTRIES:
        raise InvalidRequestError("push-pull state must be a list of entries")
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
        ):
            raise InvalidRequestError("push-pull entry must be [state, incarnation, record]")
        try:
            state = MemberState(entry[0])
        except ValueError:
            raise InvalidRequestError("push-pull entry has an unknown state") from None
        peer_id = node.on_alive(entry[2], announce_unknown=state.is_live)
        if peer_id is None:
            continue
        if state is MemberState.LEFT:
            node.on_dead(peer_id, entry[1], peer_id)
        elif state is not MemberState.ALIVE:
            node.on_suspect(peer_id, entry[1], node.peer_id)


async def push_pull_round(node: GossipNode) -> bool:
    """Exchange full state with one random live member; True when it answered."""
    peers = node.probe_order.sample(1, node.is_probeable)
    if not peers:
        return False
    return await node.push_pull(node.members[peers[0]].address)
