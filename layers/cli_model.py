"""`layerfed model ...`: inspect a base model's parameters to write scopes and red lines."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from layerfed.governance.loader import check_policy_file
from layerfed.governance.schema import Policy
from layerfed.layers.params import ParamRow, param_rows, read_model_params

__all__ = ["model_app"]

model_app = typer.Typer(help="Inspect a base model's parameters for scopes and red lines.")
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _line(row: ParamRow, with_policy: bool) -> str:
    shape = "x".join(str(d) for d in row.shape) or "scalar"
    parts = [row.name, shape, "lora" if row.lora else "-"]
    if row.tied:
        parts.append("tied: " + ", ".join(row.tied))
    if with_policy:
        parts.append("scopes: " + (", ".join(row.scopes) or "-"))
        parts.append("red lines: " + (", ".join(row.red_lines) or "-"))
        if row.conflict:
            parts.append("CONFLICT: in a scope and under a red line")
    return "  ".join(parts)


def _policy(path: Path) -> tuple[Policy, int]:
    """The policy and its error count; its diagnostics printed. Exit 1 unless schema-valid."""
    result = check_policy_file(path)
    for d in result.diagnostics:
        err.print(str(d), style="red" if d.severity == "error" else "yellow", markup=False)
    if result.policy is None:
        raise typer.Exit(1)
    return result.policy, sum(d.severity == "error" for d in result.diagnostics)


@model_app.command("params")
def params(
    model: Annotated[str, typer.Argument(help="'builtin:NAME' or a local Hugging Face folder.")],
    match: Annotated[
        str | None, typer.Option(help="Only names matching this glob ('*' one segment, '**' any).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Also show which layer scopes and red lines match each.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List a model's parameters: name, shape, LoRA target or not, ties.

    With --policy, also the layers whose scope includes each and the red lines on it.
    Red lines and scope excludes resolve over ties: a red line on one tied name
    protects every name sharing its storage. Exit 1 on a conflict (a LoRA weight in
    a scope and under a red line) or a policy error (printed, the rows still shown).
    """
    loaded, errors = _policy(policy) if policy is not None else (None, 0)
    info = read_model_params(model)
    rows = param_rows(info, policy=loaded, match=match)
    for row in rows:
        if as_json:
            out.print(json.dumps(asdict(row) | {"conflict": row.conflict}), markup=False)
        else:
            out.print(_line(row, loaded is not None), markup=False)
    conflicts = sum(r.conflict for r in rows)
    if not as_json:
        for group in info.ties:
            out.print("tied (one storage): " + " = ".join(group), markup=False)
        out.print(f"{len(rows)} of {len(info.shapes)} parameter(s); {conflicts} conflict(s)")
    if conflicts or errors:
        raise typer.Exit(1)
