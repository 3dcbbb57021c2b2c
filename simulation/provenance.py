"""Pre-registration records: what a suite run ran, as digests in each run's ``gym.json``.

Every run of ``layerfed experiment run`` gets a ``provenance`` entry in its ``gym.json``
(:func:`stamp_runs`): the sha256 of its experiment's definition as data (the validated
spec, canonical JSON: question, arms, patches, metrics and predictions; and of the
shipped file when the spec is that file's), the sha256 of the package (every ``.py``,
``.yaml``, ``.yml`` and ``.toml`` under the installed package, tests, docs and benches
left out), the git commit and whether tracked files differ from it, and the versions of
Python and the numerical libraries and the CPU. :func:`read_provenance` collects them
for the report; a changed prediction or setting then shows as a changed digest.
:func:`write_suite` applies Holm over the suite's verdicts and writes ``OUT/suite.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "GYM_FILE",
    "PACKAGE_ROOT",
    "experiment_digest",
    "package_digest",
    "package_record",
    "read_provenance",
    "stamp_runs",
    "write_suite",
]

log = logging.getLogger("layerfed")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
GYM_FILE = "gym.json"  # layerfed.simulation.evaluate.GYM_FILE, without importing torch
_SUFFIXES = {".py", ".yaml", ".yml", ".toml"}
_SKIP = {"tests", "docs", "bench", "build", "runs", "__pycache__", "node_modules"}
_LIBRARIES = ("torch", "numpy", "scipy", "flwr", "peft", "transformers")


class _Arm(Protocol):
    @property
    def name(self) -> str: ...


class _Spec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def arms(self) -> Sequence[_Arm]: ...

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [
            d
            for d in dirs
            if d not in _SKIP and not d.startswith(".") and not d.endswith(".egg-info")
        ]
        files += [
            Path(folder) / n for n in names if Path(n).suffix in _SUFFIXES and not n.startswith(".")
        ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _cpu() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's machine and processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


def package_digest(root: Path = PACKAGE_ROOT) -> tuple[str, int]:
    """sha256 over (relative path, sha256 of content) of the package's source files, and their count."""
    lines = [
        f"{p.relative_to(root).as_posix()}\0{_sha256(p.read_bytes())}\n"
        for p in _source_files(root)
    ]
    return _sha256("".join(lines).encode()), len(lines)


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


@lru_cache(maxsize=4)
def package_record(root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """The package's digest, git commit and dirty flag (None outside a checkout), versions, CPU.

    Computed once per process: every run of one suite carries the same record.
    """
    digest, count = package_digest(root)
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "package_sha256": digest,
        "package_files": count,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "versions": versions,
        "cpu": _cpu(),
    }


def experiment_digest(spec: _Spec, folder: Path | None = None) -> dict[str, str]:
    """sha256 of ``spec`` as canonical JSON; also of ``folder/NAME.yaml`` when that file is it."""
    data = spec.model_dump(mode="json")
    out = {"spec_sha256": _sha256(json.dumps(data, sort_keys=True).encode())}
    if folder is not None:
        path = folder / f"{spec.name}.yaml"
        if path.is_file():
            from layerfed.simulation.experiment_spec import load_experiment

            if load_experiment(path, check=False).model_dump(mode="json") == data:
                out["file_sha256"] = _sha256(path.read_bytes())
    return out


def _runs(spec: _Spec, out: Path, seeds: int) -> Iterable[Path]:
    for arm in spec.arms:
        for seed in range(seeds):
            yield out / spec.name / arm.name / f"seed-{seed}" / GYM_FILE


def stamp_runs(specs: Sequence[_Spec], out: Path, seeds: int) -> None:
    """Add ``provenance`` (experiment and package digests) to every run's ``gym.json``."""
    from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR

    package = package_record()
    for spec in specs:
        record = {"experiment": spec.name, **experiment_digest(spec, EXPERIMENTS_DIR), **package}
        for path in _runs(spec, out, seeds):
            if not path.is_file():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            data["provenance"] = record
            path.write_text(json.dumps(data), encoding="utf-8")
    log.info("stamped runs with package sha256 %s", package["package_sha256"][:12])


def read_provenance(specs: Sequence[_Spec], out: Path, seeds: int) -> dict[str, dict[str, Any]]:
    """Per experiment: the distinct provenance records its runs' ``gym.json`` files carry.

    ``{"records": [...], "runs": stamped runs, "unstamped": runs without a record}``;
    runs made before stamping existed count as unstamped.
    """
    found: dict[str, dict[str, Any]] = {}
    for spec in specs:
        records: list[Mapping[str, Any]] = []
        stamped = unstamped = 0
        for path in _runs(spec, out, seeds):
            if not path.is_file():
                continue
            record = json.loads(path.read_text(encoding="utf-8")).get("provenance")
            if record is None:
                unstamped += 1
                continue
            stamped += 1
            if record not in records:
                records.append(record)
        found[spec.name] = {"records": records, "runs": stamped, "unstamped": unstamped}
    return found


def write_suite(
    out: Path, specs: Sequence[_Spec], results: Mapping[str, Any], seeds: int
) -> dict[str, Any]:
    """Holm over the suite's verdicts (in place), then ``OUT/suite.json`` and each summary.json.

    ``OUT/suite.json`` holds the family (size, alpha, test, the fewest seeds that could pass),
    the seeds, every experiment's provenance records and every verdict; each
    ``OUT/NAME/summary.json`` present is rewritten with the adjusted verdicts.
    """
    from layerfed.simulation.verdicts import adjust

    family = adjust(results)
    record = {
        "seeds": seeds,
        "family": family,
        "provenance": read_provenance(specs, out, seeds),
        "verdicts": {name: r.get("verdicts", []) for name, r in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    for name, result in results.items():
        path = out / name / "summary.json"
        if path.is_file():
            path.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return record
