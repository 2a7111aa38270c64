"""Span choice for a live server: block count, position, moves with hysteresis."""

from __future__ import annotations

import random

import pytest

from libpipe.errors import ConfigError
from libpipe.placement import (
    ModelSpec,
    ServerView,
    choose_span,
    should_move,
    span_blocks,
    swarm_score,
)

KV = 1000  # bytes per token per block
MODEL = ModelSpec(num_blocks=12, block_bytes=10**9, hidden_size=1024, kv_bytes_per_token_block=KV)


def server(peer, start, end, tokens=1000, tau=0.01, rtt=0.05):
    """A server holding ``tokens`` tokens of cache on each of its blocks."""
    return ServerView(
        peer,
        start,
        end,
        tau,
        tau,
        rtt=rtt,
        free_cache_bytes=tokens * (end - start) * KV,
        cache_bytes_per_token_block=KV,
    )


def test_span_blocks_formula():
    # floor(M / (s_m + kv * cache_tokens)): 4.2e9 / (1e9 + 1000 * 1000) = 4.19
    assert span_blocks(4_200_000_000, MODEL, 1000) == 4
    assert span_blocks(10**12, MODEL, 0) == 12  # capped at L
    assert span_blocks(10**12, MODEL, 0, max_blocks=3) == 3
    with pytest.raises(ConfigError, match="cannot hold one block"):
        span_blocks(10**9, MODEL, 1000)
    with pytest.raises(ConfigError, match="cache_tokens"):
        span_blocks(10**10, MODEL, -1)
    with pytest.raises(ConfigError, match="memory_bytes must be an int"):
        span_blocks(5e9, MODEL, 0)
    with pytest.raises(ConfigError, match="max_blocks must be an int >= 1"):
        span_blocks(10**12, MODEL, 0, max_blocks=0)


def test_joining_servers_tile_the_model_then_replicate_it():
    views: list[ServerView] = []
    spans = []
    for i in range(8):
        start, end = choose_span(
            views, MODEL, blocks=4, cache_tokens=1000, tau_decode=0.01, peer_id=f"s{i}"
        )
        views.append(server(f"s{i}", start, end))
        spans.append((start, end))
    assert spans == [(0, 4), (4, 8), (8, 12), (0, 4), (4, 8), (8, 12), (0, 4), (4, 8)]
    # A settled swarm stays put.
    assert all(should_move(v, views, MODEL) is None for v in views)


def test_a_gap_is_covered_first():
    views = [server("a", 0, 4, tokens=10), server("b", 8, 12, tokens=10)]
    assert choose_span(views, MODEL, blocks=4, cache_tokens=10**6, tau_decode=0.01) == (4, 8)


def test_the_window_that_saves_a_hop_wins_among_equal_capacities():
    model = ModelSpec(
        num_blocks=6, block_bytes=10**9, hidden_size=1024, kv_bytes_per_token_block=KV
    )
    views = [server("a", 0, 3), server("b", 3, 5), server("c", 5, 6)]
    # Every 3-block window adds the same cache to three blocks; only [3, 6)
    # lets a route take two hops (a, then us) instead of three.
    assert choose_span(views, model, blocks=3, cache_tokens=1000, tau_decode=0.01) == (3, 6)


def test_the_weakest_blocks_get_the_new_cache():
    views = [
        server("a", 0, 4, tokens=5000),
        server("b", 4, 8, tokens=100),
        server("c", 8, 12, tokens=5000),
    ]
    assert choose_span(views, MODEL, blocks=4, cache_tokens=1000, tau_decode=0.01) == (4, 8)


def test_a_pile_of_replicas_spreads_out_past_the_margin():
    pile = [server(f"p{i}", 0, 4) for i in range(4)] + [server("q", 4, 12)]
    # Moving one replica to [4, 8) cuts the pressure by 18.5% (sum of 1/tokens:
    # 4/4000 + 8/1000 -> 4/3000 + 4/2000 + 4/1000).
    assert should_move(pile[0], pile, MODEL, margin=0.1) == (4, 8)
    assert should_move(pile[0], pile, MODEL, margin=0.2) is None
    assert should_move(pile[4], pile, MODEL, margin=0.1) is None  # q is the only holder


def test_the_only_holder_of_blocks_never_leaves_them():
    views = [
        server("a", 0, 4, tokens=10**6),
        server("b", 0, 4, tokens=10**6),
        server("solo", 8, 12, tokens=10),
        server("c", 4, 8, tokens=10),
    ]
    assert should_move(views[2], views, MODEL, margin=0.0) is None


@pytest.mark.parametrize("seed", range(6))
def test_moves_converge(seed):
    rng = random.Random(seed)
    views = []
    for i in range(rng.randint(3, 9)):
        blocks = rng.randint(2, 6)
        start = rng.randint(0, 12 - blocks)
        views.append(server(f"s{i}", start, start + blocks, tokens=rng.choice([500, 1000, 3000])))
    views.append(server("cover", 0, 12))
    for _ in range(200):
        moved = False
        for n, v in enumerate(views):
            span = should_move(v, views, MODEL)
            if span is not None:
                before = swarm_score(views, MODEL)
                tokens = v.free_cache_bytes // (v.num_blocks * KV)
                views[n] = server(v.peer_id, *span, tokens=tokens)
                assert swarm_score(views, MODEL) < before  # every move is a strict improvement
                moved = True
        if not moved:
            break
    else:
        pytest.fail("servers kept moving")


def test_bad_arguments():
    views = [server("a", 0, 4)]
    with pytest.raises(ConfigError):
        choose_span(views, MODEL, blocks=0, cache_tokens=1, tau_decode=0.01)
    with pytest.raises(ConfigError):
        choose_span(views, MODEL, blocks=13, cache_tokens=1, tau_decode=0.01)
    with pytest.raises(ConfigError, match="cache_tokens must be an int >= 0"):
        choose_span(views, MODEL, blocks=2, cache_tokens=-1, tau_decode=0.01)
    with pytest.raises(ConfigError):
        should_move(views[0], views, MODEL, margin=1.5)
    with pytest.raises(ConfigError, match="holds no blocks"):
        should_move(ServerView("x", 0, 0, 0.1, 0.1), views, MODEL)
