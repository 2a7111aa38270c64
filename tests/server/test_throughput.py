"""Throughput self-measurement: measured, cached on disk by model, span,
dtype and device, reused, and reported in `info`."""

from __future__ import annotations

import json

import pytest

from libpipe.model import load_span
from libpipe.server import Throughput, _throughput as throughput_module, load_or_measure

from .conftest import running_servers


@pytest.fixture
def span(gqa):
    return load_span(gqa, 2, 6, progress=False)


def test_measures_once_then_reads_the_cache(span, tmp_path, monkeypatch):
    first = load_or_measure(span, tmp_path, seconds=0.05, progress=False)
    assert first.decode > 0 and first.forward > 0
    entries = json.loads((tmp_path / "throughput.json").read_text())
    key = f"v1|{span.config.model_id}|2:6|float32|cpu"
    assert entries[key]["decode"] == first.decode

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(throughput_module, "measure", no_measuring)
    assert load_or_measure(span, tmp_path, seconds=0.05, progress=False) == first


def test_another_span_is_another_key(gqa, span, tmp_path):
    load_or_measure(span, tmp_path, seconds=0.05, progress=False)
    other = load_span(gqa, 0, 2, progress=False)
    load_or_measure(other, tmp_path, seconds=0.05, progress=False)
    keys = sorted(json.loads((tmp_path / "throughput.json").read_text()))
    assert [k.split("|")[2] for k in keys] == ["0:2", "2:6"]


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", '{"v1|x": 3}', '{"KEY": {"decode": "fast"}}']
)
def test_a_corrupt_cache_is_measured_over(span, tmp_path, content):
    key = throughput_module.cache_key(span)
    (tmp_path / "throughput.json").write_text(content.replace("KEY", key))
    result = load_or_measure(span, tmp_path, seconds=0.05, progress=False)
    assert result.decode > 0
    assert json.loads((tmp_path / "throughput.json").read_text())[key]["decode"] == result.decode


def test_an_unwritable_cache_dir_does_not_stop_the_server(span, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = load_or_measure(span, blocker / "sub", seconds=0.05, progress=False)
    assert isinstance(result, Throughput) and result.forward > 0


async def test_a_server_reports_what_it_measured(gqa, make_config, tmp_path):
    config = make_config(gqa, (2, 6), throughput=None, measure_seconds=0.05)
    async with running_servers([config]) as (servers, pool):
        info = (await (await pool.get(servers[0].address)).call("info")).meta
    cached = json.loads((config.cache_dir / "throughput.json").read_text())
    entry = cached[throughput_module.cache_key(servers[0].serving.span)]
    assert info["throughput_decode"] == entry["decode"] > 0
    assert info["throughput_forward"] == entry["forward"] > 0
