"""Experiments: files, arms, patches, plans; one short end-to-end run for reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from layerfed.governance.loader import load_policy
from layerfed.simulation.experiments import (
    EXPERIMENTS_DIR,
    ExperimentError,
    deep_merge,
    list_experiments,
    load_experiment,
    plan_experiment,
    run_experiments,
)
from layerfed.simulation.scenario import load_scenario

ESSAY_EXPERIMENTS = {
    "early_late",
    "turkey",
    "extinction",
    "memory",
    "marks_thumbs",
    "redo_alternatives",
    "cues",
    "contrast",
}


def test_every_experiment_file_loads_and_the_essays_eight_are_there() -> None:
    """All shipped experiment files validate; the issue's eight experiments exist."""
    names = {spec.name for spec in list_experiments()}
    assert names >= ESSAY_EXPERIMENTS
    for spec in list_experiments():
        assert len(spec.arms) >= 2, spec.name


def test_deep_merge_patches_list_items_by_key() -> None:
    """A dict patch on a list merges into the item with that id, id_prefix or name."""
    base = {"instances": [{"id": "a", "user": {"kind": "rater", "examples": 8}}], "rounds": 3}
    patched = deep_merge(base, {"instances": {"a": {"user": {"examples": 2}}}, "rounds": 5})
    assert patched == {
        "instances": [{"id": "a", "user": {"kind": "rater", "examples": 2}}],
        "rounds": 5,
    }
    assert base["rounds"] == 3  # untouched
    with pytest.raises(KeyError):
        deep_merge(base, {"instances": {"missing": {}}})


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), max_size=5))
@settings(max_examples=50, deadline=None)
def test_deep_merge_with_empty_patch_is_identity(data: dict[str, int]) -> None:
    """Merging an empty patch returns an equal value."""
    assert deep_merge(data, {}) == data


def test_plan_writes_valid_scenarios_and_patched_policies(tmp_path: Path) -> None:
    """Each arm and seed gets its own folder, a valid scenario and, if patched, a policy."""
    spec = load_experiment(EXPERIMENTS_DIR / "turkey.yaml")
    plans = plan_experiment(spec, 2, tmp_path)
    assert len(plans) == 2 * len(spec.arms)
    assert len({p.settings.run_id for p in plans}) == len(plans)
    for plan in plans:
        scenario = load_scenario(plan.settings.scenario)
        assert scenario.seed == plan.seed
        if plan.arm == "ungoverned":
            assert all(s.layers == ["shared"] for s in scenario.roster)
            assert plan.settings.verify  # the shipped ungoverned policy is signed
        if plan.arm == "no_vetoes":
            assert load_policy(plan.settings.policy).vetoes == []
            assert not plan.settings.verify


def test_bad_experiment_names_the_field(tmp_path: Path) -> None:
    """A wrong metric or arm patch is refused with the file and field named."""
    data = yaml.safe_load((EXPERIMENTS_DIR / "contrast.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "metrics": ["violation", "happiness"]}))
    with pytest.raises(ExperimentError, match=r"metrics.*happiness"):
        load_experiment(bad)
    data["arms"][0]["scenario_patch"] = {"rounds": 0}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ExperimentError, match=r"arms\.none: scenario\.rounds"):
        load_experiment(bad)


TINY = {
    "name": "tiny",
    "title": "Tiny",
    "essay": "test",
    "question": "Does the same seed give the same metrics?",
    "scenario": {
        "rounds": 2,
        "instances": [
            {"id": "rater-0", "layers": ["creator"], "user": {"kind": "rater", "examples": 4}},
            {
                "id": "person-0",
                "layers": ["individual"],
                "user": {"kind": "stylist", "style": "ok", "feedback": "preference", "examples": 4},
            },
        ],
    },
    "arms": [
        {"name": "default"},
        {"name": "ungoverned", "policy": "ungoverned", "shared_layer": "shared"},
    ],
    "metrics": ["violation", "pref_individual", "leakage"],
}


@pytest.mark.slow
def test_same_seed_gives_same_metrics_end_to_end(tmp_path: Path) -> None:
    """Two runs of one experiment with the same seed give identical per-round metrics."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    spec = load_experiment(path)
    first = run_experiments([spec], 1, tmp_path / "a")
    second = run_experiments([spec], 1, tmp_path / "b")
    for arm in ("default", "ungoverned"):
        a = json.loads((tmp_path / "a" / "tiny" / arm / "seed-0" / "gym.json").read_text())
        b = json.loads((tmp_path / "b" / "tiny" / arm / "seed-0" / "gym.json").read_text())
        assert len(a["rounds"]) == 2
        assert a["rounds"] == b["rounds"]
        assert first["tiny"]["arms"][arm]["values"] == second["tiny"]["arms"][arm]["values"]
