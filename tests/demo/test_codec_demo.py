"""`libpipe demo --codec`: the wire codec on a real activation."""

from __future__ import annotations

import pytest
import torch

from libpipe.cli import _demo_codec
from libpipe.cli.main import main


def test_codec_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--codec"]) == 0
    out = capsys.readouterr().out
    for row in (
        "in memory, fp32",
        "wire fp16, raw",
        "wire fp16, zstd negotiated",
        "no byte-shuffle",
    ):
        assert row in out


def test_rows_measure_the_frames_actually_sent() -> None:
    gen = torch.Generator().manual_seed(1)
    # Quarter steps: few distinct fp16 values, so zstd certainly pays.
    activation = ((torch.randn(1, 256, 256, generator=gen) * 4).round() / 4).half()
    rows = {r.name: r for r in _demo_codec.measure(activation)}
    payload = activation.numel() * 2
    raw = rows["wire fp16, raw"].nbytes
    assert rows["in memory, fp32"].nbytes == 2 * payload
    assert payload < raw < payload + 256  # header and metadata only
    assert rows["wire fp16, zstd negotiated"].nbytes < 0.9 * raw
    assert all(r.seconds > 0 for r in rows.values() if r.name != "in memory, fp32")
