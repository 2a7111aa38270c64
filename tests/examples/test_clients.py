"""The client examples run against a real swarm and print what they promise."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TIMEOUT = 180  # a loaded 2-core machine imports torch slowly


def run_example(name: str, swarm: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    peers = [arg for address in swarm.peers for arg in ("--peer", address)]
    argv = [sys.executable, str(EXAMPLES / name), "--model", str(swarm.model), *peers]
    done = subprocess.run(
        [*argv, "--identity", str(swarm.client_identity), *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_trio_client_streams_text_through_both_servers(swarm: Any) -> None:
    done = run_example("trio_client.py", swarm, "--tokens", "8", "--prompt", "In the beginning")
    assert done.stdout.startswith("In the beginning")
    assert len(done.stdout.strip()) > len("In the beginning") + 10
    assert "8 tokens in" in done.stderr
    assert "[0:4)" in done.stderr and "[4:8)" in done.stderr


def test_trio_client_stops_at_a_string(swarm: Any) -> None:
    done = run_example("trio_client.py", swarm, "--tokens", "30", "--stop", ",")
    new_text = done.stdout.removeprefix("And God said")
    assert new_text.count(",") == 1
    assert int(done.stderr.split(" tokens in")[0].split()[-1]) < 30


def test_sync_client_generates_streams_and_steps(swarm: Any) -> None:
    done = run_example("sync_client.py", swarm, "--tokens", "16", "--stop", ",")
    lines = done.stdout.splitlines()
    labels = [line.split(":")[0].strip() for line in lines[:3]]
    assert labels == ["generate", "stream", "until"]
    greedy, until = (
        ast.literal_eval(line.split(":", 1)[1].strip()) for line in (lines[0], lines[2])
    )
    # The same greedy text, cut after the token that completes the first ",".
    assert greedy.startswith(until) and "," in until
    assert until.index(",") == greedy.index(",") and until.count(",") == 1
    assert lines[3].startswith("next token after 'And God said': ")
    assert len(lines[3].split(", ")) == 5
