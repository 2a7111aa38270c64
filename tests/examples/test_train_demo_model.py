"""examples/train_demo_model.py end to end, in miniature: a few steps on a
slice of the corpus, written in the Hugging Face layout, read back by the
loaders servers use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from libpipe.model import load_client_head, load_span

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_script_trains_writes_and_reads_back_a_checkpoint(tmp_path: Path) -> None:
    corpus = (EXAMPLES / "corpus" / "genesis-kjv.txt").read_text(encoding="utf-8")
    text = tmp_path / "slice.txt"
    text.write_text(corpus[:20000], encoding="utf-8")
    out = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_demo_model.py"), "--text", str(text),
         "--out", str(out), "--steps", "2", "--log-every", "1", "--batch", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "step     2  loss" in done.stdout
    assert "greedy:   And God said" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    # the same architecture as the committed demo model
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (EXAMPLES / "demo_model" / "config.json").read_text()
    )
    head = load_client_head(out, progress=False)
    span = load_span(out, 0, head.config.num_hidden_layers, progress=False)
    logits = head.logits(span(head.embed(torch.tensor([[1, 2, 3]]))))
    assert logits.shape == (1, 3, head.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--length", "--threads", "--log-every"])
def test_counts_below_one_are_usage_errors_before_any_training(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_demo_model.py"), flag, "0"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2
    assert f"{flag} must be at least 1, got 0" in done.stderr
