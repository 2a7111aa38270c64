"""A hop's input history: what a replacement server is replayed."""

from __future__ import annotations

import contextlib

import torch

from libpipe.client._session import _Hop


def hop() -> _Hop:
    # The history needs neither a stream nor a server.
    return _Hop(planned=None, stream=None, exits=contextlib.AsyncExitStack(), chunks=[])  # type: ignore[arg-type]


def steps(n: int, start: int = 0) -> list[torch.Tensor]:
    return [torch.full((2, 1, 3), float(start + i)) for i in range(n)]


def test_history_is_every_input_in_order():
    h = hop()
    assert h.history(0) is None
    h.remember(0, torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3))  # prefill
    for i, x in enumerate(steps(3, 4)):
        h.remember(4 + i, x)
    assert h.length == 7
    full = h.history(7)
    assert full.shape == (2, 7, 3)
    assert full[:, 4:, 0].tolist() == [[4.0, 5.0, 6.0]] * 2
    assert h.history(5).shape == (2, 5, 3)  # positions the servers hold, not more
    assert torch.equal(h.history(2), full[:, :2])


def test_a_rollback_overwrites_the_forgotten_positions():
    h = hop()
    for i, x in enumerate(steps(6)):
        h.remember(i, x)
    h.remember(3, torch.full((2, 2, 3), 9.0))  # speculative tokens replaced
    assert h.length == 5
    assert h.history(5)[0, :, 0].tolist() == [0.0, 1.0, 2.0, 9.0, 9.0]


def test_a_replay_replaces_the_history_with_one_chunk():
    h = hop()
    for i, x in enumerate(steps(4)):
        h.remember(i, x)
    replay = torch.full((2, 4, 3), 7.0)
    h.remember(0, replay)
    assert len(h.chunks) == 1 and torch.equal(h.history(4), replay)
