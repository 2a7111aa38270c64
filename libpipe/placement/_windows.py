"""Choosing a window of consecutive blocks for one server.

Two rules, both over a per-block score that the servers placed so far have
built up:

- PETALS' rule (``weakest_window``): the window whose sorted per-block
  throughputs are lexicographically smallest, i.e. the one containing the
  weakest block, then the second weakest, and so on.
- CG-BP's rule (``most_under_served_window``): the window with the largest
  total shortfall against a demand, then the least capacity.

Ties go to the leftmost window, so both are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence


def weakest_window(per_block: Sequence[float], blocks: int) -> int:
    """Start of the ``blocks``-long window whose sorted values are lowest."""
    blocks = min(blocks, len(per_block))
    return min(
        range(len(per_block) - blocks + 1),
        key=lambda s: (sorted(per_block[s : s + blocks]), s),
    )


def most_under_served_window(capacity: Sequence[float], demand: float, blocks: int) -> int:
    """Start of the ``blocks``-long window with the largest shortfall
    sum(max(0, demand - capacity[b])), ties to the least total capacity.

    Computed with prefix sums: O(number of blocks) per call, so a greedy pass
    over 500 servers and 80 blocks stays far below a millisecond a server.
    """
    n = len(capacity)
    blocks = min(blocks, n)
    short = [0.0] * (n + 1)
    held = [0.0] * (n + 1)
    for b, c in enumerate(capacity):
        short[b + 1] = short[b] + max(0.0, demand - c)
        held[b + 1] = held[b] + c
    return min(
        range(n - blocks + 1),
        key=lambda s: (-(short[s + blocks] - short[s]), held[s + blocks] - held[s], s),
    )
