"""Choosing tokens: greedy, temperature, top-k, top-p, seeds, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from libpipe.client import SamplingConfig
from libpipe.client._sampling import choose_next
from libpipe.errors import ConfigError, NonFiniteError

LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0], [5.0, 0.0, 0.0, 0.0, 4.9]])


def draws(config: SamplingConfig, n: int = 200) -> torch.Tensor:
    gen = config.generator()
    return torch.stack([choose_next(LOGITS, config, gen) for _ in range(n)])  # [n, B]


def test_greedy_is_argmax():
    assert choose_next(LOGITS, SamplingConfig(), torch.Generator()).tolist() == [1, 0]


def test_a_seed_reproduces_the_draws_and_another_seed_differs():
    config = SamplingConfig(temperature=1.0, seed=7)
    assert torch.equal(draws(config), draws(config))
    assert not torch.equal(draws(config), draws(SamplingConfig(temperature=1.0, seed=8)))


def test_top_k_keeps_only_the_k_best():
    picked = draws(SamplingConfig(temperature=5.0, top_k=2, seed=1))
    assert set(picked[:, 0].tolist()) == {1, 2}
    assert set(picked[:, 1].tolist()) == {0, 4}


def test_top_p_keeps_the_smallest_nucleus():
    # Row 0: p(1) ~ 0.47, p(2) ~ 0.43: a nucleus of 0.5 needs both, never more.
    picked = draws(SamplingConfig(temperature=1.0, top_p=0.5, seed=2))
    assert set(picked[:, 0].tolist()) == {1, 2}
    # A tiny nucleus is the most likely token alone.
    assert draws(SamplingConfig(temperature=1.0, top_p=1e-6, seed=2)).tolist() == [[1, 0]] * 200


def test_temperature_sharpens():
    hot = draws(SamplingConfig(temperature=10.0, seed=3))[:, 0]
    cold = draws(SamplingConfig(temperature=0.05, seed=3))[:, 0]
    assert len(set(hot.tolist())) == 5
    assert set(cold.tolist()) <= {1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.inf},
        {"temperature": math.nan},
        {"temperature": "1"},
        {"top_k": -1},
        {"top_k": 1.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": "x"},
        {"seed": True},
    ],
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(temperature=0.8, seed=1)])
@pytest.mark.parametrize(
    ("bad", "nan", "inf"),
    [(math.nan, 1, 0), (math.inf, 0, 1), (-math.inf, 0, 1)],
    ids=["nan", "inf", "-inf"],
)
def test_non_finite_logits_are_refused_greedy_and_sampled(config, bad, nan, inf):
    logits = LOGITS.clone()
    logits[1, 3] = bad
    with pytest.raises(NonFiniteError, match="no token can be chosen") as caught:
        choose_next(logits, config, config.generator())
    assert caught.value.details == {"nan": nan, "inf": inf}


def test_a_tiny_temperature_is_greedy_not_nan():
    picked = draws(SamplingConfig(temperature=1e-39, seed=4), n=20)
    assert picked.tolist() == [[1, 0]] * 20
