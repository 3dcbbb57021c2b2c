"""`layerfed audit replay` on a real simulated run: a stricter veto refuses a recorded commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policy_helpers import default_data, write_yaml
from typer.testing import CliRunner

from layerfed.cli import build_app
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.simulate import simulate

pytestmark = pytest.mark.slow


def test_stricter_norm_veto_retroactively_refuses_a_recorded_commit(tmp_path: Path) -> None:
    """Replay under a lower norm cap names the (round, slot) it refuses, the veto and why."""
    run = tmp_path / "run"
    simulate(SimSettings(out=str(run), rounds=2, keep_candidates=2))
    kept = sorted(p.name for p in (run / "candidates").iterdir())
    assert kept == ["round-000001", "round-000002"]
    data = default_data()
    data["vetoes"].append(
        {
            "name": "strict_norm",
            "holder": "creator",
            "applies_to": ["government", "community", "in_group"],
            "condition": {"kind": "norm", "max_norm": 1e-9},
            "action": "reject",
        }
    )
    strict = write_yaml(tmp_path, data, "strict.yaml")
    report, plot = tmp_path / "replay.json", tmp_path / "replay.png"
    args = ["audit", "replay", str(run), "--policy", str(strict), "--json", str(report)]
    result = CliRunner().invoke(build_app("audit"), [*args, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["rows"]
    refused = [
        r
        for r in rows
        if r["recorded"]["decision"] == "committed" and r["replayed"]["decision"] == "vetoed"
    ]
    assert refused, rows
    first = refused[0]
    assert first["replayed"]["vetoes"] == ["strict_norm"]
    assert "update norm: expected at most 1e-09" in first["replayed"]["reasons"][0]
    assert first["slot"] in result.output and "strict_norm" in result.output, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same = CliRunner().invoke(
        build_app("audit"),
        ["audit", "replay", str(run), "--policy", str(write_yaml(tmp_path, default_data()))],
    )
    assert same.exit_code == 0 and "0 decision(s) differ" in same.output, same.output
