"""The package's public faces: version, Instance, sorted __all__ per subpackage, light imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import layerfed

SUBPACKAGES = [
    "layerfed.governance",
    "layerfed.layers",
    "layerfed.wire",
    "layerfed.clients",
    "layerfed.federation",
    "layerfed.simulation",
]


def test_version_and_instance_at_the_top() -> None:
    """`layerfed.__version__` is the installed version and `layerfed.Instance` is the SDK class."""
    from importlib.metadata import version

    from layerfed.clients.instance import Instance

    assert layerfed.__version__ == version("layerfed")
    assert layerfed.Instance is Instance
    with pytest.raises(AttributeError):
        _ = layerfed.NoSuchName  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_exports_a_sorted_all_of_real_names(name: str) -> None:
    """Every subpackage names what users call in a sorted `__all__`, and each name exists."""
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    assert exported, name
    for item in exported:
        assert hasattr(module, item), f"{name}.{item}"


def test_the_faces_users_are_told_about_exist() -> None:
    """The names the docs promise are importable from their subpackage."""
    from layerfed.clients import Instance, client_app
    from layerfed.federation import LayeredStrategy, server_app
    from layerfed.governance import load_policy, verify_policy_file

    assert callable(load_policy) and callable(verify_policy_file)
    assert Instance is layerfed.Instance
    assert server_app is not None and client_app is not None and LayeredStrategy is not None


def test_governance_imports_without_torch() -> None:
    """Importing `layerfed` and `layerfed.governance` loads neither torch nor the gym."""
    code = (
        "import sys, layerfed, layerfed.governance; "
        "print('torch' in sys.modules, any(m.startswith('layerfed.simulation') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_cli_lists_experiments_and_checks_policies_without_torch() -> None:
    """`layerfed experiment list` and `layerfed policy check` (no --model) never import
    torch, transformers or PEFT: subpackages load their names on first use."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from layerfed.cli import app\n"
        "runner = CliRunner()\n"
        "a = runner.invoke(app, ['experiment', 'list'])\n"
        "b = runner.invoke(app, ['policy', 'check', 'examples/policies/default.yaml'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print(a.exit_code, b.exit_code, 'turkey' in a.output, heavy)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.split() == ["0", "0", "True", "[]"], out.stdout + out.stderr
