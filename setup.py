"""Build hook: the optional C kernel of ``layerfed.layers.fused`` (pyproject.toml holds the rest).

The kernel is an optional extension: where it cannot be compiled, the install goes on and
:mod:`layerfed.layers.fused` runs its torch path, which gives the same bits, slower. The
repo root is the package itself, so this file is kept out of the installed modules.
"""

from __future__ import annotations

import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

__all__ = ["KERNEL"]

KERNEL = Extension(
    "layerfed.layers._fused_kernel",
    sources=["layers/_fused_kernel.c"],
    # Every fused multiply-add is written out in the source; none may be added or dropped.
    extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"],
    optional=True,
)


class _BuildPy(build_py):
    """Leaves this file out of the package (the repo root is ``layerfed``)."""

    def find_package_modules(self, package: str, package_dir: str) -> list[Any]:
        modules: list[Any] = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "layerfed" and m[1] == "setup")]


if __name__ == "__main__":
    setup(ext_modules=[KERNEL], cmdclass={"build_py": _BuildPy})
