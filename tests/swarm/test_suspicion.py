"""The suspicion timer's decay with independent confirmations."""

from __future__ import annotations

import math

import pytest

from libpipe.swarm import Suspicion


def test_lone_suspicion_waits_the_maximum():
    s = Suspicion("a", k=3, min_timeout=2.0, max_timeout=30.0, started=100.0)
    assert s.timeout() == 30.0
    assert s.deadline == 130.0


def test_confirmations_decay_logarithmically_to_the_minimum():
    s = Suspicion("a", k=3, min_timeout=2.0, max_timeout=30.0, started=0.0)
    assert s.confirm("b")
    assert s.timeout() == pytest.approx(30.0 - 28.0 * math.log(2) / math.log(4))
    assert s.confirm("c")
    assert s.timeout() == pytest.approx(30.0 - 28.0 * math.log(3) / math.log(4))
    assert s.confirm("d")
    assert s.timeout() == pytest.approx(2.0)
    # Beyond k, nothing changes and nothing is news.
    assert not s.confirm("e")
    assert s.timeout() == pytest.approx(2.0)


def test_repeated_accuser_is_not_independent():
    s = Suspicion("a", k=2, min_timeout=1.0, max_timeout=10.0, started=0.0)
    assert not s.confirm("a")
    assert s.confirm("b")
    assert not s.confirm("b")
    assert s.confirmations == 1


def test_no_expected_confirmations_means_minimum_at_once():
    s = Suspicion("a", k=0, min_timeout=4.0, max_timeout=40.0, started=1.0)
    assert s.deadline == 5.0
    assert not s.confirm("b")
