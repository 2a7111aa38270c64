"""`libpipe demo`: a real local swarm generating text, a server killed mid-way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libpipe.cli._demo_generate import pick_victim
from libpipe.cli.main import main
from libpipe.model import write_random_checkpoint

# Server start-up imports torch in each process: slow on a loaded machine.
TIMEOUT = 300


def test_demo_runs_a_swarm_survives_a_kill_and_shuts_down(tmp_path: Path) -> None:
    env = dict(os.environ, LIBPIPE_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "libpipe.cli.main", "demo", "--servers", "3", "--tokens", "16",
         "--kill-after", "6"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "learned all 3 servers from it" in out
    assert "[route: " in out
    assert "with SIGKILL, mid-generation" in out
    assert "[new route: " in out
    assert "16 tokens generated" in out
    assert "failover lost nothing" in out
    # the two survivors drained and exited cleanly
    assert out.count(": exited 0") == 2
    assert out.count("killed earlier (SIGKILL)") == 1


def test_a_model_without_tokenizer_is_refused_before_any_server_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_random_checkpoint(tmp_path / "m", "llama", tokenizer=False)
    assert main(["demo", "--model", str(model)]) == 2
    assert "has no tokenizer.json: the demo prints text" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--prompt", ""], "--prompt must not be empty"),
        (["--tokens", "10", "--kill-after", "10"], "--kill-after must be in [0, 10)"),
        (["--model", "/nonexistent/model"], "no demo model at /nonexistent/model"),
    ],
)
def test_bad_options_are_refused_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_victim_is_a_hop_whose_blocks_stay_covered() -> None:
    route = [("a", 0, 4), ("b", 4, 8)]
    spans = {"a": (0, 4), "b": (4, 8), "c": (4, 8)}
    assert pick_victim(route, spans) == ("b", 4, 8)
    # the replica of b's blocks is split over two servers
    assert pick_victim(route, {"a": (0, 4), "b": (4, 8), "c": (3, 6), "d": (6, 8)}) == (
        "b",
        4,
        8,
    )
    # only a has a replica
    assert pick_victim(route, {"a": (0, 4), "b": (4, 8), "c": (0, 3), "d": (2, 5)}) == (
        "a",
        0,
        4,
    )
    assert pick_victim(route, {"a": (0, 4), "b": (4, 8), "c": (5, 8)}) is None
    # a, moving, computes both hops; its old blocks have no other server
    moving = [("a", 0, 4), ("a", 4, 8)]
    assert pick_victim(moving, {"a": (4, 8), "b": (4, 8)}) is None
    assert pick_victim(moving, {"a": (4, 8), "b": (4, 8), "c": (0, 4)}) == ("a", 4, 8)
