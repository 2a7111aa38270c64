"""examples/prompt_tuning.py refuses a run with no step before it starts any server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prompt_tuning.py"


def test_zero_steps_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "0"], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 2
    assert "--steps must be at least 1, got 0" in done.stderr
