"""Merge rules: newer incarnation wins; dead beats suspect beats alive."""

from __future__ import annotations

import pytest

from libpipe.swarm import MemberState, supersedes
from libpipe.swarm._state import refutation_incarnation

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


@pytest.mark.parametrize(
    ("new", "old", "wins"),
    [
        ((2, A), (1, D), True),  # a newer incarnation beats any state
        ((2, A), (1, S), True),
        ((1, D), (2, A), False),  # an older one never wins
        ((1, S), (2, A), False),
        ((3, S), (3, A), True),  # equal incarnation: suspect over alive
        ((3, D), (3, S), True),  # dead over suspect
        ((3, L), (3, S), True),
        ((3, A), (3, S), False),  # stale good news cannot undo a suspicion
        ((3, S), (3, D), False),
        ((3, A), (3, A), False),  # duplicates are not news
        ((3, D), (3, L), False),  # the first final verdict stays
    ],
)
def test_supersedes_table(new, old, wins):
    assert supersedes(new[0], new[1], old[0], old[1]) is wins


@pytest.mark.parametrize(("own", "accused", "expected"), [(1, 1, 2), (5, 3, 6), (2, 9, 10)])
def test_refutation_beats_the_accusation_and_our_own(own, accused, expected):
    assert refutation_incarnation(own, accused) == expected


def test_live_states():
    assert A.is_live and S.is_live and not D.is_live and not L.is_live
