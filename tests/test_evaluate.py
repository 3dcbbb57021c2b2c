"""The run evaluator: a resumed run's series continues the interrupted one's rounds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layerfed.simulation.evaluate import GYM_FILE, RunEvaluator
from layerfed.simulation.settings import SimSettings


def test_resumed_run_keeps_the_earlier_rounds_and_pins_torch(tmp_path: Path) -> None:
    """With resume, the series starts from the rounds already written; torch uses one thread."""
    earlier = [{"round": 1, "violation": 0.5}, {"round": 2, "violation": 0.25}]
    (tmp_path / GYM_FILE).write_text(json.dumps({"run_id": "demo-0", "rounds": earlier}))
    evaluator = RunEvaluator(SimSettings(out=str(tmp_path), resume=True))
    assert [r["round"] for r in evaluator.series] == [1, 2]
    assert torch.get_num_threads() == 1
    fresh = RunEvaluator(SimSettings(out=str(tmp_path)))
    assert fresh.series == []
    record = json.loads(fresh.write(tmp_path / "again.json").read_text())
    assert record["policy"] == "default" and record["base_model"] == "tiny"
    assert record["base"]["margin"] > 0 and record["base"]["violation"] <= 0.05
