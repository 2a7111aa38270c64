"""Span choice for a live server: where to start, and when to move.

A running swarm has no scenario file: a server sees the others through
gossip (``ServerView``: span, speed, free cache) and knows its own memory.
It applies libpipe's rule one server at a time:

- Block count from memory: weights plus the KV cache it promises,
  ``cache_tokens`` tokens of cache for every block it holds:
  m = min(floor(M / (s_m + kv_bytes_per_token_block * cache_tokens)), L, cap).
- Position: every window of m blocks is scored by what the swarm would look
  like with the server there, compared in this order: blocks left without
  any server (fewer is better); the cache pressure, sum over blocks of
  1 / capacity where a block's capacity is the KV cache (in tokens) its
  servers hold for it (lower is better: lifting the weakest blocks counts
  most, as in PETALS' max-min rule, but every block counts, so the second
  weakest breaks ties with the weakest); the per-token cost of the best
  route through the swarm (``route``, lower is better: fewer and faster
  hops). Pressures within ``PRESSURE_TOLERANCE`` of the best count as
  equal, so that a saved hop beats a sliver of extra cache. Ties go to the
  leftmost window.
- Moving (``should_move``) uses the same scores with hysteresis: a server
  moves only when the move covers blocks nobody holds, or cuts the pressure
  by more than ``margin``, or, the pressure being no worse, cuts the route
  cost by more than ``margin``. Each accepted move lowers (uncovered,
  pressure, route cost) lexicographically by a clear step, so a swarm
  cannot cycle, and noise below the margin never moves anyone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ._blocks import is_int, uncovered_ranges
from ._model import ModelSpec
from ._route import route
from ._view import ServerView

# Hysteresis of should_move: measured speeds drift by a few percent between
# gossip rounds; 10% of the swarm's total cache pressure is well clear of
# that, yet small enough that one server leaving a pile of four replicas
# for an unreplicated stretch (an 18% cut in a 12-block model) does move.
DEFAULT_MOVE_MARGIN = 0.1
# Windows whose cache pressure is within this fraction of the best one count
# as equally good for capacity, and the route cost decides between them:
# without it, tiny differences in measured free cache would always win over
# a hop saved.
PRESSURE_TOLERANCE = 0.05


def span_blocks(
    memory_bytes: int, model: ModelSpec, cache_tokens: int, max_blocks: int | None = None
) -> int:
    """Blocks a server holds: min(floor(M / (s_m + kv * cache_tokens)), L, cap).

    Raises ``ConfigError`` when not even one block fits with its cache."""
    _check_cache_tokens(cache_tokens)
    if not is_int(memory_bytes):
        raise ConfigError(f"memory_bytes must be an int, got {memory_bytes!r}")
    if max_blocks is not None and not (is_int(max_blocks) and max_blocks >= 1):
        raise ConfigError(f"max_blocks must be an int >= 1, got {max_blocks!r}")
    per_block = model.block_bytes + model.kv_bytes_per_token_block * cache_tokens
    count = min(memory_bytes // per_block, model.num_blocks)
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count < 1:
        raise ConfigError(
            f"a memory budget of {memory_bytes} bytes cannot hold one block"
            f" ({model.block_bytes} bytes) with {cache_tokens} tokens of cache",
            memory_bytes=memory_bytes,
            needed=per_block,
        )
    return count


@dataclass(frozen=True, order=True)
class SwarmScore:
    """How good a swarm looks; smaller compares better (see module docstring)."""

    uncovered: int  # blocks no server holds
    pressure: float  # sum over held blocks of 1 / (tokens of cache for the block)
    route_cost: float  # seconds per token of the best route (inf when uncovered)


def swarm_score(views: Sequence[ServerView], model: ModelSpec) -> SwarmScore:
    """Score the swarm the views describe (the server itself included)."""
    num_blocks = model.num_blocks
    missing = uncovered_ranges(((v.start, v.end) for v in views), 0, num_blocks)
    capacity = [0.0] * num_blocks
    for v in views:
        if v.start < v.end:
            tokens = v.free_cache_bytes / (v.num_blocks * model.kv_bytes_per_token_block)
            for b in range(v.start, min(v.end, num_blocks)):
                capacity[b] += tokens
    cost = math.inf if missing else route(views, num_blocks).cost
    unheld = {b for a, e in missing for b in range(a, e)}
    # A held block with no free cache counts as one token: very high pressure,
    # yet finite, so that windows still compare.
    pressure = sum(1.0 / max(c, 1.0) for b, c in enumerate(capacity) if b not in unheld)
    return SwarmScore(sum(b - a for a, b in missing), pressure, cost)


def choose_span(
    others: Sequence[ServerView],
    model: ModelSpec,
    *,
    blocks: int,
    cache_tokens: int,
    tau_decode: float,
    tau_forward: float | None = None,
    rtt: float = 0.05,
    peer_id: str = "(joining)",
) -> tuple[int, int]:
    """The span [start, start + blocks) a joining server should take.

    ``others``: the other servers of the same model (their ``rtt`` is the
    per-hop cost a client is expected to pay; the default is fine when
    unknown). ``blocks`` usually comes from ``span_blocks``; the server's
    own cache is ``cache_tokens`` tokens per block."""
    _check_cache_tokens(cache_tokens)
    best, _ = _best_span(
        others,
        model,
        blocks=blocks,
        me=_me(peer_id, model, blocks, cache_tokens, tau_decode, tau_forward, rtt),
    )
    return best


def should_move(
    me: ServerView,
    others: Sequence[ServerView],
    model: ModelSpec,
    *,
    margin: float = DEFAULT_MOVE_MARGIN,
) -> tuple[int, int] | None:
    """The span ``me`` should move to (same block count), or None to stay.

    ``me.free_cache_bytes`` is the server's cache as a fresh span would have
    it (its budget, not what running sessions left free), so that a busy
    server does not look like a poor one."""
    if not 0 <= margin < 1:
        raise ConfigError(f"move margin must lie in [0, 1), got {margin!r}")
    blocks = me.num_blocks
    if blocks == 0:
        raise ConfigError(f"server {me.peer_id} holds no blocks; use choose_span")
    others = [v for v in others if v.peer_id != me.peer_id]
    now = swarm_score([*others, me], model)
    (start, end), after = _best_span(others, model, blocks=blocks, me=me)
    if start == me.start:
        return None
    return (start, end) if _clearly_better(after, now, margin) else None


def _clearly_better(new: SwarmScore, old: SwarmScore, margin: float) -> bool:
    if new.uncovered != old.uncovered:
        return new.uncovered < old.uncovered
    if new.pressure < old.pressure * (1 - margin):
        return True
    return new.pressure <= old.pressure and new.route_cost < old.route_cost * (1 - margin)


def _best_span(
    others: Sequence[ServerView], model: ModelSpec, *, blocks: int, me: ServerView
) -> tuple[tuple[int, int], SwarmScore]:
    num_blocks = model.num_blocks
    if not (isinstance(blocks, int) and 1 <= blocks <= num_blocks):
        raise ConfigError(f"blocks must be an int in [1, {num_blocks}], got {blocks!r}")
    others = [v for v in others if v.peer_id != me.peer_id]
    scored = []
    for start in range(num_blocks - blocks + 1):
        placed = dataclasses.replace(me, start=start, end=start + blocks)
        scored.append((swarm_score([*others, placed], model), start))
    fewest = min(score.uncovered for score, _ in scored)
    scored = [(score, start) for score, start in scored if score.uncovered == fewest]
    lowest = min(score.pressure for score, _ in scored)
    edges = {0, num_blocks} | {v.start for v in others} | {v.end for v in others}
    # Scores equal up to float rounding tie; then a window whose sides meet
    # other spans (or the model's ends) beats one that leaves slivers.
    near = [
        (
            _rounded(score.route_cost),
            _rounded(score.pressure),
            -((start in edges) + (start + blocks in edges)),
            start,
            score,
        )
        for score, start in scored
        if score.pressure <= lowest * (1 + PRESSURE_TOLERANCE)
    ]
    *_, start, score = min(near)
    return (start, start + blocks), score


def _check_cache_tokens(cache_tokens: object) -> None:
    if not (is_int(cache_tokens) and cache_tokens >= 0):
        raise ConfigError(f"cache_tokens must be an int >= 0, got {cache_tokens!r}")


def _rounded(x: float) -> float:
    return x if math.isinf(x) else float(f"{x:.9g}")


def _me(
    peer_id: str,
    model: ModelSpec,
    blocks: int,
    cache_tokens: int,
    tau_decode: float,
    tau_forward: float | None,
    rtt: float,
) -> ServerView:
    return ServerView(
        peer_id=peer_id,
        start=0,
        end=0,
        tau_decode=tau_decode,
        tau_forward=tau_decode if tau_forward is None else tau_forward,
        rtt=rtt,
        free_cache_bytes=cache_tokens * blocks * model.kv_bytes_per_token_block,
        cache_bytes_per_token_block=model.kv_bytes_per_token_block,
    )
