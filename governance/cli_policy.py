"""`layerfed policy ...`: check, explain, diff and schema for policy writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from layerfed.errors import LayerfedError
from layerfed.governance.diff import diff_policies
from layerfed.governance.errors import Diagnostic, PolicyError
from layerfed.governance.explain import explain_policy
from layerfed.governance.loader import check_policy_file, load_policy
from layerfed.governance.model_params import ModelParams, ModelReader, tie_issues
from layerfed.governance.schema import Policy

__all__ = ["policy_app"]

policy_app = typer.Typer(help="Write, check, explain, diff and sign governance policies.")
out = Console()
err = Console(stderr=True)

FileArg = Annotated[Path, typer.Argument(help="A policy file (.yaml, .yml or .toml).")]


def _print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        style = "red" if diagnostic.severity == "error" else "yellow"
        err.print(str(diagnostic), style=style, markup=False, highlight=False, soft_wrap=True)


def _read_model(ctx: typer.Context, model: str) -> ModelParams:
    """The model's parameters, read by the :class:`ModelReader` the CLI puts in ctx.obj."""
    reader = ctx.find_object(ModelReader)
    if reader is None:
        err.print(f"{model}: error: expected a model reader (run `layerfed policy check`)")
        raise typer.Exit(1)
    try:
        return reader.read(model)
    except (LayerfedError, OSError, ValueError) as e:
        err.print(f"{model}: error: expected 'builtin:NAME' or a local model folder, got {e}")
        raise typer.Exit(1) from e


@policy_app.command("check")
def check(
    ctx: typer.Context,
    file: FileArg,
    model: Annotated[
        str | None,
        typer.Option(help="Also match scopes against this model: 'builtin:NAME' or a folder."),
    ] = None,
) -> None:
    """Check a policy: schema, semantic rules and, with --model, scope patterns and ties."""
    params = None if model is None else _read_model(ctx, model)
    for group in params.ties if params is not None else ():
        out.print(f"{model}: tied (one storage): {' = '.join(group)}", markup=False)
    result = check_policy_file(file, model_params=None if params is None else params.names)
    _print_diagnostics(result.diagnostics)
    ties = [] if params is None or result.policy is None else [*tie_issues(result.policy, params)]
    for path, message in ties:
        err.print(f"{file}: error: {path}: {message}", style="red", markup=False, soft_wrap=True)
    if not result.ok or ties:
        count = sum(d.severity == "error" for d in result.diagnostics) + len(ties)
        err.print(f"{file}: {count} error(s)", style="red bold", markup=False)
        raise typer.Exit(1)
    assert result.policy is not None
    out.print(
        f"{file}: ok (policy {result.policy.name} version {result.policy.version})", markup=False
    )


def _load_or_exit(file: Path) -> Policy:
    try:
        return load_policy(file)
    except PolicyError as e:
        _print_diagnostics(e.diagnostics)
        raise typer.Exit(1) from e


@policy_app.command("explain")
def explain(file: FileArg) -> None:
    """Explain a policy layer by layer: rates, scope, memories, vetoes, red lines."""
    out.print(explain_policy(_load_or_exit(file)))


@policy_app.command("diff")
def diff(
    old: Annotated[Path, typer.Argument(help="The policy before.")],
    new: Annotated[Path, typer.Argument(help="The policy after.")],
    fail_on_loosen: Annotated[
        bool, typer.Option(help="Exit 2 when any change loosens governance.")
    ] = False,
) -> None:
    """Show what changed, layer by layer, flagging loosened red lines and vetoes."""
    changes = diff_policies(_load_or_exit(old), _load_or_exit(new))
    if not changes:
        out.print("no changes in meaning")
        return
    section = ""
    for change in changes:
        if change.section != section:
            section = change.section
            out.print(f"[bold]{section}[/bold]")
        line = f"  {change.path}: {json.dumps(change.old)} -> {json.dumps(change.new)}"
        out.print(line, markup=False, highlight=False, soft_wrap=True)
        if change.loosened:
            out.print(f"    LOOSENED: {change.why}", style="red", markup=False, soft_wrap=True)
    loosened = [c for c in changes if c.loosened]
    out.print(f"{len(changes)} change(s), {len(loosened)} loosening governance")
    if loosened and fail_on_loosen:
        raise typer.Exit(2)


@policy_app.command("schema")
def schema() -> None:
    """Print the policy JSON Schema (for editor autocompletion)."""
    document = Policy.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "layerfed governance policy"
    typer.echo(json.dumps(document, indent=2, sort_keys=True))
