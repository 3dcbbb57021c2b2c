"""Every file the package reads from its ``examples/`` folder at run time ships in the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

from layerfed.simulation.base_folder import SCOPE_MAPS_DIR
from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR
from layerfed.simulation.settings import (
    DEFAULT_POLICY,
    DEFAULT_ROOT_KEY,
    DEFAULT_SCENARIO,
    PACKAGE_ROOT,
)


def _shipped() -> set[Path]:
    """The files setuptools puts in the wheel from ``[tool.setuptools.package-data]``."""
    pyproject = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["layerfed"]
    return {p.resolve() for pattern in patterns for p in PACKAGE_ROOT.glob(pattern) if p.is_file()}


def test_defaults_experiments_and_scope_maps_are_package_data() -> None:
    """The default policy and its signature, the demo scenario, the demo root key, every
    experiment file and every scope map match a package-data pattern (a wheel install of
    `layerfed simulate` or `experiment run` needs them), and no private key ships."""
    shipped = _shipped()
    needed = [
        DEFAULT_POLICY,
        DEFAULT_POLICY.with_name(DEFAULT_POLICY.name + ".sig.json"),
        DEFAULT_SCENARIO,
        DEFAULT_ROOT_KEY,
        *EXPERIMENTS_DIR.glob("*.yaml"),
        *SCOPE_MAPS_DIR.glob("*.yaml"),
    ]
    assert len(needed) > 6
    missing = [str(p.relative_to(PACKAGE_ROOT)) for p in needed if p.resolve() not in shipped]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
    assert not [p for p in shipped if p.suffix == ".pem"], "a private key would ship"
