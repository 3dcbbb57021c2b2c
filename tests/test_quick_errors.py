"""`layerfed simulate` reports argument and config errors before any heavy import (issue #26 item 6).

The CLI runs in a fresh interpreter so ``sys.modules`` shows what the error path loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from layerfed.simulation.experiment_spec import PACKAGE_ROOT

DEFAULT_POLICY = PACKAGE_ROOT / "examples" / "policies" / "default.yaml"

_QUICK = """
import resource, sys
sys.argv = ["layerfed", *sys.argv[1:]]
from layerfed.cli import main
try:
    main()
except SystemExit as e:
    print("RC", e.code)
heavy = sorted(m for m in ("torch", "transformers", "peft", "flwr") if m in sys.modules)
print("HEAVY", ",".join(heavy) or "-")
usage = resource.getrusage(resource.RUSAGE_SELF)
print("CPU", usage.ru_utime + usage.ru_stime)
"""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--scenario", "{missing}"], "name: Field required"),
        (["--scenario", "{nope}"], "nope.yaml"),
        (["--device", "nonsense"], "layerfed-device"),
        (["--instance-dtype", "float8"], "layerfed-instance-dtype"),
        (["--policy", "{policy}"], "name --root-key or --trusted"),
    ],
    ids=[
        "scenario-missing-key",
        "scenario-bad-path",
        "bad-device",
        "bad-instance-dtype",
        "own-policy-without-root-key",
    ],
)
def test_simulate_config_errors_come_before_heavy_imports(
    tmp_path: Path, args: list[str], says: str
) -> None:
    """A scenario missing a required key, a missing scenario file, a bad device setting or
    an own policy with no key to verify it exits 1 naming it, with torch, transformers, PEFT
    and Flower never imported (<= 2 CPU s)."""
    missing = tmp_path / "missing.yaml"
    missing.write_text("seed: 0\ninstances:\n  - {id: a, layers: [creator]}\n", encoding="utf-8")
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.read_text(encoding="utf-8"), encoding="utf-8")
    where = {"missing": str(missing), "nope": str(tmp_path / "nope.yaml"), "policy": str(policy)}
    argv = ["simulate", *(a.format(**where) for a in args), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-c", _QUICK, *argv], capture_output=True, text=True, check=False
    )
    assert "RC 1" in done.stdout, done.stdout + done.stderr
    assert "HEAVY -" in done.stdout, done.stdout
    assert says in " ".join(done.stderr.split()), done.stderr
    words = done.stdout.split()
    assert float(words[words.index("CPU") + 1]) <= 2.0, done.stdout
    assert not (tmp_path / "out").exists()
