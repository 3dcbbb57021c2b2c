"""`layerfed simulate` writes plain lines to a log: no progress bar is drawn when stdout is
not a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLI = "from layerfed.cli import main; main()"


def test_simulate_to_a_pipe_prints_one_plain_line_per_round(tmp_path: Path) -> None:
    """Piped stdout has exactly one 'round N: ...' line per round, no bar characters and no
    unnumbered 'round' line (the progress bar's last frame)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    args = [sys.executable, "-c", CLI, "simulate", "--rounds", "1", "--out", str(tmp_path / "o")]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    rounds = [line for line in lines if re.match(r"round(\s|$)", line)]
    assert len(rounds) == 1 and re.match(r"round 1: accepted \d+", rounds[0]), lines
    assert not any("━" in line for line in lines), lines
    assert any(line.startswith("done: 1 rounds") for line in lines), lines
