"""Verdicts: exact paired tests, Holm across a suite, 'not testable', survival, provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR, load_experiment
from layerfed.simulation.provenance import (
    experiment_digest,
    package_digest,
    read_provenance,
    stamp_runs,
    write_suite,
)
from layerfed.simulation.report import results_markdown, write_experiment_report
from layerfed.simulation.summaries import MECHANISMS, RATES, SUMMARIES, mechanism_totals
from layerfed.simulation.verdicts import VerdictSpec, adjust, judge

LOW = [0.0, 0.01, 0.0, 0.02, 0.0, 0.01, 0.0, 0.0, 0.03, 0.0]
HIGH = [0.5, 0.6, 0.7, 0.4, 0.5, 0.6, 0.9, 0.8, 0.5, 0.6]


def _arm(values: list[float], bounds: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    metrics = {"x": values, "violation": values, "n50": values}
    return {"values": metrics, "bounds": {"n50": bounds} if bounds else {}, **extra}


def _spec(metric: str = "violation", **kw: Any) -> VerdictSpec:
    return VerdictSpec(
        metric=metric, arm="a", baseline="b", expect="lower", claim="a is lower", **kw
    )


def test_ten_seeds_in_the_predicted_direction_are_supported_with_the_exact_p() -> None:
    """Ten seeds all lower: p = 2/1024, supported; the other way round: contradicted."""
    v = judge(_spec(), {"a": _arm(LOW), "b": _arm(HIGH)})
    assert v["status"] == "supported" and v["p"] == 2 / 1024 and v["seeds"] == 10
    assert "p = 0.00195" in v["text"] and "Newcombe" in v["method"]
    low, high = v["interval"]
    assert -1.0 <= low <= v["difference"] <= high <= 0.0
    assert judge(_spec(), {"a": _arm(HIGH), "b": _arm(LOW)})["status"] == "contradicted"


def test_five_seeds_can_never_support_a_prediction() -> None:
    """At 5 seeds the exact p is at least 0.0625: even a clear effect is 'not detectable'."""
    v = judge(_spec(), {"a": _arm(LOW[:5]), "b": _arm(HIGH[:5])})
    assert v["p"] == 0.0625 and v["status"] == "not detectable"
    assert "smallest attainable p is 0.0625" in v["text"]


def test_identical_arms_are_not_testable() -> None:
    """Arms equal in every seed (e.g. a removed mechanism that never acted) are not testable."""
    v = judge(_spec(metric="x"), {"a": _arm(HIGH), "b": _arm(list(HIGH))})
    assert v["status"] == "not testable" and "identical in every one of the 10 seeds" in v["text"]


def test_a_credited_mechanism_that_never_acted_makes_the_prediction_not_testable() -> None:
    """A verdict naming 'vetoes' is not testable when the arm fired none; judged when it did."""
    spec = _spec(mechanism="vetoes")
    idle = {"a": _arm(LOW, mechanisms={"vetoes": [0.0] * 10}), "b": _arm(HIGH)}
    acted = {"a": _arm(LOW, mechanisms={"vetoes": [1.0] + [0.0] * 9}), "b": _arm(HIGH)}
    unrecorded = {"a": _arm(LOW), "b": _arm(HIGH)}
    assert judge(spec, idle)["status"] == "not testable"
    assert "vetoes) never acted in arm a" in judge(spec, idle)["reason"]
    assert judge(spec, acted)["status"] == "supported"
    v = judge(spec, unrecorded)
    assert v["status"] == "supported" and "not recorded in gym.json" in v["text"]


def test_censored_metrics_are_compared_as_survival_restricted_to_the_common_bound() -> None:
    """N50 censored at 80 in every seed of one arm: restricted means 80 vs 20, KM censoring shown."""
    spec = VerdictSpec(metric="n50", arm="a", baseline="b", expect="higher", claim="a needs more")
    arms = {"a": _arm([math.inf] * 10, [80.0] * 10), "b": _arm([20.0] * 9 + [40.0], [80.0] * 10)}
    v = judge(spec, arms)
    survival = v["survival"]
    assert survival["tau"] == 80.0
    assert (
        survival["arms"]["a"]["censored"] == 10 and survival["arms"]["a"]["restricted_mean"] == 80
    )
    assert survival["arms"]["b"]["restricted_mean"] == pytest.approx(22.0)
    assert v["status"] == "supported" and v["difference"] == pytest.approx(58.0)
    assert "censored 10/10" in v["text"] and "restricted to 80" in v["text"]
    both = {"a": _arm([math.inf] * 10, [192.0] * 10), "b": _arm([math.inf] * 10, [192.0] * 10)}
    assert judge(spec, both)["status"] == "not testable"  # marks_thumbs: censored in both arms


def test_missing_arm_is_reported_not_judged() -> None:
    """A verdict whose arm has no runs says so instead of judging."""
    assert judge(_spec(), {"b": _arm(HIGH)})["status"] == "missing"


def test_holm_over_a_suite_demotes_what_the_family_cannot_carry() -> None:
    """Holm scales the sorted p by 3, 2, 1; four 7-seed predictions (p = 2/128 each) fail together."""
    ten = judge(_spec(), {"a": _arm(LOW), "b": _arm(HIGH)})
    seven = judge(_spec(), {"a": _arm(LOW[:7]), "b": _arm(HIGH[:7])})  # p = 2/128 = 0.0156
    same = judge(_spec(metric="x"), {"a": _arm(HIGH), "b": _arm(list(HIGH))})
    assert seven["status"] == "supported"
    results: dict[str, Any] = {"e1": {"verdicts": [ten, seven]}, "e2": {"verdicts": [same]}}
    family = adjust(results)
    assert family["predictions"] == 3 and family["min_seeds"] == 7
    assert ten["p_holm"] == pytest.approx(3 * 2 / 1024) and ten["status"] == "supported"
    assert seven["p_holm"] == pytest.approx(2 * 2 / 128) and seven["status"] == "supported"
    assert same["p_holm"] == 1.0 and same["status"] == "not testable"
    assert "over 3" in ten["text"]
    four = [judge(_spec(), {"a": _arm(LOW[:7]), "b": _arm(HIGH[:7])}) for _ in range(4)]
    adjust({"e": {"verdicts": four}})
    assert all(v["p_holm"] == 0.0625 and v["status"] == "not detectable" for v in four)


@given(st.lists(st.lists(st.floats(-1, 1), min_size=10, max_size=10), min_size=1, max_size=6))
@settings(max_examples=20, deadline=None)
def test_adjusted_p_is_never_below_the_raw_p(diffs: list[list[float]]) -> None:
    """After Holm every verdict's p lies in (0, 1] and its adjusted p is at least its raw p."""
    verdicts = [judge(_spec(metric="x"), {"a": _arm(d), "b": _arm([0.0] * 10)}) for d in diffs]
    adjust({"e": {"verdicts": verdicts}})
    for v in verdicts:
        assert 0.0 < v["p"] <= v["p_holm"] <= 1.0


def test_every_summary_metric_is_a_rate_a_censored_time_or_unbounded_by_name() -> None:
    """RATES names only known summaries; mechanism totals sum each recorded counter per run."""
    assert set(SUMMARIES) >= RATES
    runs = [[{"vetoes": 1, "refused": 0}, {"vetoes": 2}], [{"vetoes": 0}]]
    assert mechanism_totals(runs) == {"vetoes": [3.0, 0.0], "refused": [0.0, 0.0]}
    assert mechanism_totals([[{"round": 1}]]) == {}


def _fake_suite(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """The shipped turkey experiment with synthetic gym.json files for 10 seeds per arm."""
    spec = load_experiment(EXPERIMENTS_DIR / "turkey.yaml", check=False)
    for arm in spec.arms:
        for seed in range(10):
            folder = tmp_path / spec.name / arm.name / f"seed-{seed}"
            folder.mkdir(parents=True)
            high = arm.name != "default"
            rows = [{"round": 1, "violation": 0.9 if high else 0.01 * (seed % 2), "vetoes": 0}]
            (folder / "gym.json").write_text(json.dumps({"run_id": "r", "rounds": rows}))
    arms = {}
    for a in spec.arms:
        values = [0.9] * 10 if a.name != "default" else [0.01 * (s % 2) for s in range(10)]
        arms[a.name] = {
            "label": a.label,
            "values": dict.fromkeys(spec.metrics, values),
            "series": {"violation": [[v] for v in values]},
        }
    verdicts = [judge(v, arms) for v in spec.verdicts]
    return spec, {spec.name: {"arms": arms, "verdicts": verdicts}}


def test_suite_runs_record_experiment_and_package_digests_and_the_report_shows_them(
    tmp_path: Path,
) -> None:
    """gym.json gets the spec's and the package's sha256; suite.json and the report show them."""
    spec, results = _fake_suite(tmp_path)
    stamp_runs([spec], tmp_path, 10)
    gym = json.loads((tmp_path / "turkey" / "default" / "seed-3" / "gym.json").read_text())
    record = gym["provenance"]
    assert record["spec_sha256"] == experiment_digest(spec)["spec_sha256"]
    assert record["file_sha256"] == experiment_digest(spec, EXPERIMENTS_DIR)["file_sha256"]
    assert len(record["package_sha256"]) == 64 and record["package_files"] > 100
    assert gym["rounds"][0]["round"] == 1  # the series is untouched
    found = read_provenance([spec], tmp_path, 10)["turkey"]
    assert found["runs"] == 10 * len(spec.arms) and len(found["records"]) == 1
    suite = write_suite(tmp_path, [spec], results, 10)
    on_disk = json.loads((tmp_path / "suite.json").read_text())
    assert on_disk["family"]["predictions"] == len(spec.verdicts) == suite["family"]["predictions"]
    md, _ = write_experiment_report(tmp_path, [spec], results, seeds=10)
    text = md.read_text()
    assert "## Pre-registration: what ran" in text and record["spec_sha256"][:16] in text
    assert record["package_sha256"][:16] in text and "Holm" in text
    block = results_markdown([spec], results, 10, "header", suite)
    assert record["spec_sha256"][:12] in block and "p (Holm)" in block


def test_a_changed_prediction_changes_the_spec_digest(tmp_path: Path) -> None:
    """Editing a verdict's claim changes the spec digest; the file digest is only the shipped file's."""
    data = yaml.safe_load((EXPERIMENTS_DIR / "turkey.yaml").read_text())
    data["verdicts"][0]["claim"] = "changed after the table"
    path = tmp_path / "turkey.yaml"
    path.write_text(yaml.safe_dump(data))
    changed = load_experiment(path, check=False)
    shipped = load_experiment(EXPERIMENTS_DIR / "turkey.yaml", check=False)
    assert experiment_digest(changed)["spec_sha256"] != experiment_digest(shipped)["spec_sha256"]
    assert "file_sha256" not in experiment_digest(changed, EXPERIMENTS_DIR)


def test_package_digest_covers_sources_and_changes_with_them(tmp_path: Path) -> None:
    """The package digest hashes .py/.yaml/.toml outside tests and caches; an edit changes it."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("y = 1\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    first, count = package_digest(tmp_path)
    assert count == 1
    (tmp_path / "tests" / "t.py").write_text("y = 2\n")
    assert package_digest(tmp_path)[0] == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert package_digest(tmp_path)[0] != first


def test_the_cli_defaults_to_the_seeds_holm_needs_for_the_suites_predictions() -> None:
    """experiment run and report default to the fewest seeds that pass Holm over 'all' (11)."""
    import inspect

    from layerfed.simulation.cli_experiment import DEFAULT_SEEDS, report_command, run_command
    from layerfed.simulation.experiment_spec import list_experiments
    from layerfed.simulation.stats import min_seeds

    total = sum(len(s.verdicts) for s in list_experiments(check=False) if s.in_all)
    assert 25 < total <= 51
    assert DEFAULT_SEEDS == min_seeds(total) == min_seeds(51) == 11
    for command in (run_command, report_command):
        assert inspect.signature(command).parameters["seeds"].default == DEFAULT_SEEDS


def test_arm_cells_are_bounded_intervals_or_survival_summaries() -> None:
    """Rates get Wilson, margins a bootstrap within range, censored runs a restricted mean."""
    from layerfed.simulation.stats_report import arm_cell

    assert arm_cell("violation", [0.0] * 10) == "0 [0, 0.28]"
    cell = arm_cell("margin", [1.0, 2.0, 3.0, 4.0])
    low, high = (float(x) for x in cell[cell.index("[") + 1 : -1].split(", "))
    assert cell.startswith("2.5 [") and 1.0 <= low < 2.5 < high <= 4.0
    assert arm_cell("n50", [20.0, math.inf], [80.0, 80.0]) == (
        "restricted mean 50 to 80, not reached in 1/2"
    )
    assert arm_cell("margin", [3.0, 3.0]) == "3" and arm_cell("margin", []) == "n/a"


def test_report_draws_a_kaplan_meier_plot_for_a_censored_prediction(tmp_path: Path) -> None:
    """A verdict on N50 with censored runs gets a Kaplan-Meier PNG linked from its section."""
    spec = load_experiment(EXPERIMENTS_DIR / "n50.yaml", check=False)
    verdict_spec = next(v for v in spec.verdicts if v.metric == "n50")
    arms: dict[str, Any] = {}
    for arm in spec.arms:
        censored = arm.name == verdict_spec.arm
        values = [math.inf] * 10 if censored else [20.0] * 8 + [40.0, math.inf]
        arms[arm.name] = {
            "label": arm.label,
            "values": dict.fromkeys(spec.metrics, [0.1] * 10) | {"n50": values},
            "bounds": {"n50": [80.0] * 10},
            "series": {"violation": [[0.1]] * 10},
        }
    verdict = judge(verdict_spec, arms)
    assert verdict["survival"]["arms"][verdict_spec.baseline]["censored"] == 1
    md, _ = write_experiment_report(
        tmp_path, [spec], {spec.name: {"arms": arms, "verdicts": [verdict]}}, seeds=10
    )
    link = f"plots/{spec.name}-survival-0.png"
    assert link in md.read_text()
    assert (tmp_path / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_suite_run_stamps_every_gym_json_and_records_mechanism_counts(tmp_path: Path) -> None:
    """run_experiments writes provenance into each run's gym.json and mechanism totals per arm."""
    from layerfed.simulation.experiments import run_experiments
    from layerfed.simulation.provenance import package_record

    data = {
        "name": "stamp",
        "title": "Stamp",
        "essay": "test",
        "question": "Does every run record what it ran?",
        "scenario": {
            "rounds": 1,
            "instances": [
                {"id": "rater-0", "layers": ["creator"], "user": {"kind": "rater", "examples": 4}}
            ],
        },
        "arms": [{"name": "default"}, {"name": "other"}],  # the same run: copied, not rerun
        "metrics": ["violation"],
        "verdicts": [
            {"metric": "violation", "arm": "default", "baseline": "other", "expect": "lower"}
            | {"claim": "c"}
        ],
    }
    path = tmp_path / "stamp.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_experiment(path)
    results = run_experiments([spec], 1, tmp_path / "out")
    for arm in ("default", "other"):
        gym = json.loads((tmp_path / "out" / "stamp" / arm / "seed-0" / "gym.json").read_text())
        assert gym["provenance"]["spec_sha256"] == experiment_digest(spec)["spec_sha256"]
        assert gym["provenance"]["package_sha256"] == package_record()["package_sha256"]
        assert gym["rounds"]
        assert set(results["stamp"]["arms"][arm]["mechanisms"]) == set(MECHANISMS)
    assert results["stamp"]["verdicts"][0]["status"] == "not testable"  # identical arms
