"""Member states and the rules that merge news about them.

Theory of operation (SWIM, as memberlist implements it): every member owns
an *incarnation* number that only it may raise. News about a member is a
pair (incarnation, state). Newer incarnations always win; at equal
incarnation the more pessimistic state wins (dead or left over suspect over
alive), so that a suspicion cannot be undone by stale good news. The only
way out of a suspicion is therefore a *refutation*: the accused member
hears of it and announces itself alive with an incarnation above the one it
was accused at. Alive news is the member's own signed record (see
_record.py), so nobody else can refute on its behalf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._record import SignedRecord


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    # Declared dead by itself: a graceful leave, never a failure.
    LEFT = "left"

    @property
    def is_live(self) -> bool:
        """Still counted as a member (a suspect is usually a lossy link)."""
        return self in (MemberState.ALIVE, MemberState.SUSPECT)


# Precedence at equal incarnation. DEAD and LEFT share the top rank: both
# are final for that incarnation, and whichever came first stays.
_RANK = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2, MemberState.LEFT: 2}


def supersedes(
    new_incarnation: int, new_state: MemberState, old_incarnation: int, old_state: MemberState
) -> bool:
    """Whether news (new_incarnation, new_state) replaces what we hold."""
    if new_incarnation != old_incarnation:
        return new_incarnation > old_incarnation
    return _RANK[new_state] > _RANK[old_state]


def refutation_incarnation(own: int, accused: int) -> int:
    """The incarnation a live member announces to beat an accusation."""
    return max(own, accused) + 1


@dataclass
class Member:
    """What one node believes about one member.

    ``incarnation`` can run ahead of ``record.record.incarnation``: a
    suspicion may name an incarnation whose record we never received.
    ``since`` is the local monotonic time of the last state change.
    """

    record: SignedRecord
    incarnation: int
    state: MemberState
    since: float

    @property
    def peer_id(self) -> str:
        return self.record.record.peer_id

    @property
    def address(self) -> str:
        return self.record.record.addresses[0]
