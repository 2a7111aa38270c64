"""Interim span choice: PETALS' rule, until ``libpipe.placement`` exports its own.

A server adds its throughput to every block it holds, so the swarm's
capacity at block b is the sum over the servers covering b. A new server
covers the window whose weakest blocks are weakest (windows compared by
their sorted per-block throughput, lowest first). A running server moves
when placing itself afresh makes the swarm's sorted per-block throughput
clearly better: compared lowest block first, the first pair that differs
by more than ``margin`` decides. Lexicographic max-min has no cycles (each
move raises it), and the margin keeps measurement noise from triggering
moves, so a stable swarm stays put.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    """One server's blocks and its throughput (tokens/s through the whole span)."""

    peer_id: str
    start: int
    end: int
    throughput: float


def block_throughput(holdings: Sequence[Holding], num_blocks: int) -> list[float]:
    """Swarm capacity per block: the sum of the throughputs of its servers."""
    per_block = [0.0] * num_blocks
    for h in holdings:
        for b in range(max(0, h.start), min(num_blocks, h.end)):
            per_block[b] += h.throughput
    return per_block


def best_start(per_block: Sequence[float], blocks: int, rng: random.Random | None = None) -> int:
    """Start of the ``blocks``-long window whose sorted throughputs are lowest.

    Among equal windows, those that fit snugly into their gap (each side
    an end of the model or a stronger block) come first, so that servers
    joining one by one tile the model instead of leaving slivers no one
    fills. What ties remain are broken at random, so that servers choosing
    at once from the same view spread out instead of piling onto one."""
    blocks = min(blocks, len(per_block))
    keys = {s: sorted(per_block[s : s + blocks]) for s in range(len(per_block) - blocks + 1)}
    lowest = min(keys.values())
    ties = [s for s, key in keys.items() if key == lowest]
    snugness = {s: _snug_sides(per_block, s, blocks) for s in ties}
    best = [s for s in ties if snugness[s] == max(snugness.values())]
    return best[0] if rng is None else rng.choice(best)


def _snug_sides(per_block: Sequence[float], start: int, blocks: int) -> int:
    """How many sides of the window are an end of the model or a stronger block."""
    end = start + blocks
    weakest = min(per_block[start:end])
    left = start == 0 or per_block[start - 1] > weakest
    right = end == len(per_block) or per_block[end] > weakest
    return int(left) + int(right)


def clearly_better(new: Sequence[float], old: Sequence[float], margin: float) -> bool:
    """Whether ``new`` beats ``old`` (sorted ascending) by more than ``margin``
    at the first block where they differ that much."""
    for a, b in zip(sorted(new), sorted(old), strict=True):
        if abs(a - b) > margin * max(a, b):
            return a > b
    return False


def should_move(
    others: Sequence[Holding],
    me: Holding,
    num_blocks: int,
    *,
    margin: float,
    rng: random.Random | None = None,
) -> tuple[int, int] | None:
    """The span ``me`` should move to, or None when staying is as good."""
    blocks = me.end - me.start
    without_me = block_throughput(others, num_blocks)
    start = best_start(without_me, blocks, rng)
    if start == me.start:
        return None
    now = block_throughput([*others, me], num_blocks)
    moved = Holding(me.peer_id, start, start + blocks, me.throughput)
    after = block_throughput([*others, moved], num_blocks)
    return (start, start + blocks) if clearly_better(after, now, margin) else None
