"""A whole federation on Flower's simulation engine: rounds, outputs, resume, bad policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerfed.governance.audit import verify_audit
from layerfed.governance.errors import PolicyError
from layerfed.governance.signing import PolicyTrustError
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.simulate import SimulationError, simulate

pytestmark = pytest.mark.slow


def _kinds(audit: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in audit.read_text().splitlines()]


def test_simulation_writes_metrics_audit_and_state_and_resumes_to_the_same_digest(
    tmp_path: Path,
) -> None:
    """Three rounds uninterrupted equal two rounds plus a resumed third, bit for bit."""
    full = simulate(SimSettings(out=str(tmp_path / "full")))
    assert full.round == 3
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [m["round"] for m in metrics["rounds"]] == [1, 2, 3]
    first = metrics["rounds"][0]
    assert set(first["layers"]) == {"creator", "government", "community", "in_group", "individual"}
    assert all(s["accepted"] == s["sampled"] for s in first["layers"].values())
    assert (
        first["layers"]["individual"]["local_commits"] == first["layers"]["individual"]["sampled"]
    )
    assert set(first["probes"]) == {"red_line_refusals", "near_misses"}
    report = verify_audit(tmp_path / "full" / "audit.jsonl")
    assert report.ok
    kinds = _kinds(tmp_path / "full" / "audit.jsonl")
    assert kinds[0] == "policy_load" and kinds.count("round_end") == 3 and "commit" in kinds
    assert (tmp_path / "full" / "state" / "instances").is_dir()

    part = tmp_path / "part"
    assert simulate(SimSettings(out=str(part), rounds=2)).round == 2
    resumed = simulate(SimSettings(out=str(part), rounds=3, resume=True))
    assert resumed.digest() == full.digest()
    assert "resume" in _kinds(part / "audit.jsonl") and verify_audit(part / "audit.jsonl").ok


def test_unsigned_policy_stops_before_round_one(tmp_path: Path) -> None:
    """A policy that fails verification stops the run before Flower starts, with the reason."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        Path(SimSettings().policy)
        .read_text(encoding="utf-8")
        .replace("\nversion: 1", "\nversion: 2", 1)
    )
    with pytest.raises(PolicyTrustError) as info:
        simulate(SimSettings(policy=str(policy), out=str(tmp_path / "out")))
    assert info.value.reason in ("under_threshold", "malformed", "unreadable")
    assert not (tmp_path / "out" / "state").exists()


def test_existing_output_needs_resume(tmp_path: Path) -> None:
    """A second run into the same folder is refused unless --resume is given."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text("{}")
    with pytest.raises(SimulationError, match="use --resume"):
        simulate(SimSettings(out=str(tmp_path)))


def test_broken_policy_is_a_policy_error(tmp_path: Path) -> None:
    """A policy with a schema error is reported as a PolicyError naming the file."""
    policy = tmp_path / "p.yaml"
    policy.write_text("name: x\n")
    with pytest.raises(PolicyError, match=r"p\.yaml"):
        simulate(SimSettings(policy=str(policy), out=str(tmp_path / "o"), verify=False))
