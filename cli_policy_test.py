"""`layerfed policy test POLICY TESTFILE...`: a policy's expected decisions, checked.

Arguments are checked first; the federation's decision code (torch, via the layer
stack) loads only when there are cases to decide (:mod:`layerfed.policy_tests`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["policy_test_command"]

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


class Format(StrEnum):
    """Output formats."""

    text = "text"
    junit = "junit"


def policy_test_command(
    policy: Annotated[Path, typer.Argument(help="The policy under test (.yaml/.toml).")],
    files: Annotated[list[Path], typer.Argument(help="Test files (.yaml/.yml/.toml).")],
    fmt: Annotated[
        Format, typer.Option("--format", help="text, or junit (XML on stdout) for CI.")
    ] = Format.text,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the test-file JSON Schema and exit.")
    ] = False,
) -> None:
    """Decide each case of the test files under POLICY; exit 1 on any failure.

    A failure prints FILE:LINE, the expected and the actual decision and the trace.
    """
    from layerfed.errors import LayerfedError
    from layerfed.governance.policy_test_cases import case_file_schema

    if schema:
        typer.echo(json.dumps(case_file_schema(), indent=2, sort_keys=True))
        return
    for path in [policy, *files]:
        if not path.is_file():
            err.print(f"{path}: error: expected a readable file, got no such file", markup=False)
            raise typer.Exit(1)
    from layerfed.governance.errors import PolicyError
    from layerfed.governance.loader import load_policy
    from layerfed.governance.policy_test_cases import load_case_file
    from layerfed.governance.policy_test_report import junit_xml, text_report

    try:
        loaded = load_policy(policy)
        cases = [c for f in files for c in load_case_file(f)]
        from layerfed.policy_tests import run_cases  # the federation's code: torch loads here

        results = run_cases(loaded, cases)
    except PolicyError as e:
        for d in e.diagnostics:
            err.print(str(d), markup=False)
        raise typer.Exit(1) from e
    except LayerfedError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(1) from e
    if fmt is Format.junit:
        typer.echo(junit_xml(results))
    else:
        out.print(text_report(results), markup=False)
    if not all(r.ok for r in results):
        raise typer.Exit(1)
