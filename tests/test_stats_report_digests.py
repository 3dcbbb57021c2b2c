"""The table's provenance line names every package digest and every commit its runs came from."""

from __future__ import annotations

from layerfed.simulation.stats_report import digest_lines

VERSIONS = {"python": "3.11.7", "torch": "2.13.0+cpu"}


def _record(spec: str, package: str, commit: str, dirty: bool = False) -> dict[str, object]:
    return {
        "spec_sha256": spec,
        "package_sha256": package,
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": VERSIONS,
        "cpu": "AMD EPYC",
    }


def test_runs_from_two_checkouts_name_both_commits() -> None:
    """A table summarised from runs of two commits lists both (and both package digests)."""
    found = {
        "turkey": {"records": [_record("a" * 64, "1" * 64, "c" * 40)]},
        "extinction": {"records": [_record("b" * 64, "2" * 64, "d" * 40, dirty=True)]},
    }
    (line,) = digest_lines(found)
    assert "commits cccccccccccc, dddddddddddd with modified files" in line
    assert "111111111111, 222222222222" in line
    assert "`turkey` aaaaaaaaaaaa" in line and "`extinction` bbbbbbbbbbbb" in line


def test_runs_from_one_checkout_name_one_commit() -> None:
    """Runs of one commit give one commit, once."""
    found = {
        "turkey": {"records": [_record("a" * 64, "1" * 64, "c" * 40)]},
        "veto": {"records": [_record("e" * 64, "1" * 64, "c" * 40)]},
    }
    (line,) = digest_lines(found)
    assert "(commit cccccccccccc)" in line
    assert line.count("cccccccccccc") == 1
    assert "CPU AMD EPYC" in line and "torch 2.13.0+cpu" in line
