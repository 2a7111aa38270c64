"""Each formula of GossipConfig pinned to numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from libpipe.errors import ConfigError
from libpipe.swarm import GossipConfig


@pytest.mark.parametrize("preset", [GossipConfig.lan, GossipConfig.wan, GossipConfig.local])
def test_presets_are_valid_and_detect_before_push_pull(preset):
    config = preset()
    assert config.probe_timeout < config.probe_interval
    assert config.record_ttl > config.record_refresh_interval


@pytest.mark.parametrize(
    ("n", "expected"),
    # mult=4, interval=1: 4 * max(1, log10(n + 1))
    [(1, 4.0), (9, 4.0), (99, 8.0), (999, 12.0)],
)
def test_suspicion_timeout_formula(n, expected):
    assert GossipConfig.lan().suspicion_timeout(n) == pytest.approx(expected)


def test_suspicion_timeout_scales_with_interval_and_mult():
    config = GossipConfig.wan()  # mult 6, interval 5
    assert config.suspicion_timeout(99) == pytest.approx(6 * 2 * 5.0)
    assert config.suspicion_max_timeout(99) == pytest.approx(6 * 60.0)


@pytest.mark.parametrize(("n", "expected"), [(1, 0), (3, 0), (4, 2), (100, 2)])
def test_suspicion_confirmations(n, expected):
    # lan: suspicion_mult 4 -> k = 2, unless fewer than k other members exist.
    assert GossipConfig.lan().suspicion_confirmations(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 4), (9, 4), (10, 8), (100, 12), (500, 12), (1000, 16)]
)
def test_retransmit_limit_formula(n, expected):
    # retransmit_mult 4 * ceil(log10(n + 1))
    assert GossipConfig.lan().retransmit_limit(n) == expected


@pytest.mark.parametrize(
    ("n", "multiplier"), [(1, 1), (32, 1), (33, 2), (64, 2), (65, 3), (500, 5)]
)
def test_push_pull_period_formula(n, multiplier):
    # 30 s * (ceil(log2(n) - log2(32)) + 1) beyond 32 members
    assert GossipConfig.lan().push_pull_period(n) == pytest.approx(30.0 * multiplier)
    if n > 32:
        assert multiplier == math.ceil(math.log2(n) - 5) + 1


def test_record_ttl_formula():
    config = GossipConfig.lan().replace(record_refresh_interval=7.0, record_ttl_mult=2.5)
    assert config.record_ttl == pytest.approx(17.5)


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_interval": 0.0},
        {"probe_timeout": 1.0},  # equal to the interval: no time left for indirect probes
        {"indirect_checks": 0},
        {"gossip_nodes": 0},
        {"record_ttl_mult": 1.0},
        {"max_piggyback_bytes": 100},
        {"dead_reclaim_time": -1.0},
        {"suspicion_max_timeout_mult": 0},
    ],
)
def test_invalid_settings_raise_config_error(changes):
    with pytest.raises(ConfigError):
        GossipConfig.lan().replace(**changes)
