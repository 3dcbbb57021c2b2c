"""What-if replay core on synthetic recorded candidates: kept means judged again by the real stages."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from policy_helpers import default_data, write_yaml

from layerfed.federation.candidates import CandidateError, CandidateKeeper
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.replay import model_stack, replay_run
from layerfed.federation.round_context import RoundContext
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy
from layerfed.layers.slots import SlotId

RUN = "replay-test"
SLOT = SlotId("community", "global")


def _policy(tmp: Path, name: str, max_norm: float | None = None) -> Policy:
    """The default policy without probes (fast); ``max_norm``: a strict norm veto on community."""
    data = default_data()
    data["vetoes"] = [v for v in data["vetoes"] if v["condition"]["kind"] != "probe_regression"]
    data["red_lines"]["probes"] = []
    data["superego"]["enabled"] = False
    if max_norm is not None:
        data["vetoes"].append(
            {
                "name": "strict_norm",
                "holder": "creator",
                "applies_to": ["community"],
                "condition": {"kind": "norm", "max_norm": max_norm},
                "action": "reject",
            }
        )
    return load_policy(write_yaml(tmp, data, f"{name}.yaml"))


def _record(run: Path, policy: Policy, keep_rounds: int = 5) -> None:
    """A two-round run of one slot: each round's mean kept, committed as v1 and v2."""
    stack, tokenizer = model_stack(policy, 0)
    state = ServerState(run, policy, RUN)
    keeper = CandidateKeeper(run, keep_rounds, 0)
    rng = np.random.default_rng(0)
    with AuditLog(run / "audit.jsonl") as audit:
        audit.append(AuditKind.POLICY_LOAD, run_id=RUN)
        for round_ in (1, 2):
            ctx = RoundContext(
                policy, RUN, round_, state, stack, tokenizer, audit, {}, {},
                ProbeRunner(policy, stack, tokenizer), profiles=frozenset({("eu", ("g1",))}),
            )  # fmt: skip
            shapes = stack.spec(SLOT).shapes()
            mean = {n: rng.normal(0, 1e-3, s).astype(np.float32) for n, s in shapes.items()}
            for e in keeper.keep(ctx, SLOT, mean, ()).events:
                audit.append(e.kind, **e.as_fields())
            current = state.current(SLOT, stack.spec(SLOT), round_)
            step = {k: np.float32(0.3) * v for k, v in mean.items()}
            arrays = {k: current[k] + step[k] for k in mean}
            version = state.commit(SLOT, arrays, stack.spec(SLOT), round_)
            audit.append(AuditKind.COMMIT, round=round_, slot=str(SLOT), version=version)
            audit.append(AuditKind.ROUND_END, round=round_, committed=[str(SLOT)])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A recorded run folder and the folder holding the policies."""
    tmp = tmp_path_factory.mktemp("replay")
    _record(tmp / "run", _policy(tmp, "lenient"))
    return tmp / "run", tmp


def test_same_policy_replays_the_recorded_decisions(run: tuple[Path, Path]) -> None:
    """Under the policy the run judged with, every kept candidate commits the same version."""
    folder, tmp = run
    report = replay_run(folder, _policy(tmp, "lenient"), model_stack)
    assert [(r.round, r.slot) for r in report.rows] == [(1, str(SLOT)), (2, str(SLOT))]
    assert [r.replayed.decision for r in report.rows] == ["committed", "committed"]
    assert not report.changed
    assert [r.replayed.version for r in report.rows] == [1, 2]
    assert report.versions == {str(SLOT): (2, 2)}


def test_strict_norm_veto_refuses_recorded_commits_and_says_why(run: tuple[Path, Path]) -> None:
    """A norm veto below the kept means' step refuses both recorded commits, naming the veto."""
    folder, tmp = run
    report = replay_run(folder, _policy(tmp, "strict", max_norm=1e-9), model_stack)
    first = report.rows[0]
    assert (first.round, first.slot) == (1, str(SLOT))
    assert first.recorded.decision == "committed" and first.recorded.version == 1
    assert first.replayed.decision == "vetoed" and first.replayed.vetoes == ("strict_norm",)
    assert "update norm: expected at most 1e-09" in first.replayed.reasons[0]
    assert len(report.changed) == 2
    assert report.versions == {str(SLOT): (2, 0)}
    as_json: dict[str, Any] = report.as_json()
    assert as_json["changed"] == 2 and as_json["rows"][0]["replayed"]["vetoes"] == ["strict_norm"]


def test_a_rewritten_candidate_is_refused(run: tuple[Path, Path], tmp_path: Path) -> None:
    """Replay refuses a kept file whose bytes are not the ones the audit recorded."""
    folder, tmp = run
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    kept = copy / "candidates" / "round-000002" / "0000.safetensors"
    data = bytearray(kept.read_bytes())
    data[-1] ^= 1
    kept.write_bytes(bytes(data))
    with pytest.raises(
        CandidateError, match=r"0000\.safetensors: expected the bytes the run judged"
    ):
        replay_run(copy, _policy(tmp, "lenient"), model_stack)


def test_retention_keeps_the_last_rounds_and_replay_starts_after_them(tmp_path: Path) -> None:
    """With keep 1, round 1's candidates are deleted; replay seeds round 1's commit and says so."""
    policy = _policy(tmp_path, "lenient")
    _record(tmp_path / "run", policy, keep_rounds=1)
    assert sorted(p.name for p in (tmp_path / "run" / "candidates").iterdir()) == ["round-000002"]
    report = replay_run(tmp_path / "run", policy, model_stack)
    assert [(r.round, r.replayed.version) for r in report.rows] == [(2, 2)]
    assert any("rounds before 2 were not kept" in n for n in report.notes)
