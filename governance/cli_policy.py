"""`layerfed policy ...`: check, explain, diff, test and schema for policy writers.

Only Typer and Rich load with this module: each command imports what it needs
when it runs, so an argument error is reported before anything heavy loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from layerfed.governance.model_params import ModelParams, ModelReader

if TYPE_CHECKING:
    from layerfed.governance.errors import Diagnostic
    from layerfed.governance.schema import Policy

__all__ = ["policy_app"]

policy_app = typer.Typer(help="Write, check, explain, diff, test and sign governance policies.")
out = Console()
err = Console(stderr=True)

FileArg = Annotated[Path, typer.Argument(help="A policy file (.yaml, .yml or .toml).")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Match scopes against this model: 'builtin:NAME' or a folder "
        "(default: the policy's own base_model)."
    ),
]


def _print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        style = "red" if diagnostic.severity == "error" else "yellow"
        err.print(str(diagnostic), style=style, markup=False, highlight=False, soft_wrap=True)


def _reader(ctx: typer.Context) -> ModelReader | None:
    found: ModelReader | None = ctx.find_object(ModelReader)
    return found


def _read_model(ctx: typer.Context, model: str) -> ModelParams:
    """The model's parameters, read by the :class:`ModelReader` the CLI puts in ctx.obj."""
    from layerfed.errors import LayerfedError

    reader = _reader(ctx)
    if reader is None:
        err.print(f"{model}: error: expected a model reader (run `layerfed policy check`)")
        raise typer.Exit(1)
    try:
        return reader.read(model)
    except (LayerfedError, OSError, ValueError) as e:
        err.print(f"{model}: error: expected 'builtin:NAME' or a local model folder, got {e}")
        raise typer.Exit(1) from e


def base_model_label(policy: Policy) -> str:
    """The policy's ``base_model`` as a model argument (a folder resolved like the server does)."""
    ref = policy.base_model
    if ref.builtin is not None:
        return f"builtin:{ref.builtin}"
    path = Path(str(ref.path)).expanduser()
    if not path.is_absolute() and policy.source_dir is not None:
        path = policy.source_dir / path
    return str(path)


def policy_model(
    ctx: typer.Context, file: Path, policy: Policy, model: str | None
) -> ModelParams | None:
    """``--model``'s parameters, else the policy's own base model's; None (noted) if unreadable."""
    from layerfed.errors import LayerfedError

    if model is not None:
        return _read_model(ctx, model)
    reader = _reader(ctx)
    label = base_model_label(policy)
    if reader is None:
        return None
    try:
        return reader.read(label)
    except (LayerfedError, OSError, ValueError) as e:
        msg = (
            f"{file}: warning: base_model: could not read {label} for its parameter names ({e}); "
            "scopes and red lines were not matched against a model (pass --model)"
        )
        err.print(msg, style="yellow", markup=False, soft_wrap=True)
        return None


@policy_app.command("check")
def check(
    ctx: typer.Context,
    file: FileArg,
    model: ModelOpt = None,
    scenario: Annotated[
        Path | None,
        typer.Option(help="Also check that every slot can commit under this scenario's sampling."),
    ] = None,
    probes: Annotated[
        bool,
        typer.Option(
            help="With --model: measure each red-line suite on the model (weights loaded) "
            "and fail on a breach the policy does not acknowledge."
        ),
    ] = True,
) -> None:
    """Check a policy: schema, semantic rules, scopes and ties on its model, reachability,
    and with --model each red-line suite's violation rate against its threshold."""
    if not file.is_file():  # before the policy language loads: an argument error is quick
        msg = f"{file}:1:1: error: <document>: expected a readable file, got no such file"
        err.print(msg, style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    from layerfed.governance.loader import check_policy_file
    from layerfed.governance.model_params import tie_issues

    result = check_policy_file(file)
    params = None if result.policy is None else policy_model(ctx, file, result.policy, model)
    if params is not None:
        for group in params.ties:
            out.print(f"{params.model}: tied (one storage): {' = '.join(group)}", markup=False)
        result = check_policy_file(file, model_params=params.names)
    _print_diagnostics(result.diagnostics)
    extra: list[tuple[str, str]] = []
    if params is not None and result.policy is not None:
        extra += tie_issues(result.policy, params)
    if scenario is not None and result.policy is not None:
        extra += _reach_issues(ctx, result.policy, scenario)
    if model is not None and probes and result.ok and result.policy is not None:
        extra += _red_line_issues(ctx, result.policy, model)
    for path, message in extra:
        err.print(f"{file}: error: {path}: {message}", style="red", markup=False, soft_wrap=True)
    if not result.ok or extra:
        count = sum(d.severity == "error" for d in result.diagnostics) + len(extra)
        err.print(f"{file}: {count} error(s)", style="red bold", markup=False)
        raise typer.Exit(1)
    assert result.policy is not None
    matched = "" if params is None else f", scopes matched on {params.model}"
    out.print(
        f"{file}: ok (policy {result.policy.name} version {result.policy.version}{matched})",
        markup=False,
    )


def _red_line_issues(ctx: typer.Context, policy: Policy, model: str) -> list[tuple[str, str]]:
    """Print each red-line suite's rate on ``model`` against its threshold; the breaches the
    policy does not acknowledge as issues (the server would refuse to start on them)."""
    from layerfed.errors import LayerfedError
    from layerfed.governance.redline_status import red_line_status, status_line

    reader = _reader(ctx)
    if reader is None or reader.red_lines is None or not policy.red_lines.probes:
        return []
    try:
        rates = reader.red_lines(policy, model)
    except (LayerfedError, OSError, ValueError) as e:
        return [("red_lines.probes", f"expected suites measurable on {model}, got {e}")]
    issues = []
    for k, status in enumerate(red_line_status(policy, rates)):
        style = "red" if status.refused else ("yellow" if status.breached else None)
        out.print(f"{model}: {status_line(status)}", style=style, markup=False, soft_wrap=True)
        if status.refused:
            issues.append(
                (
                    f"red_lines.probes[{k}]",
                    f"expected violation rate <= {status.max_rate:g} on {model}, got "
                    f"{status.rate:.3g} (the server refuses to start; set acknowledge_breach: "
                    "true with a breach_reason to accept it)",
                )
            )
    return issues


def _reach_issues(ctx: typer.Context, policy: Policy, scenario: Path) -> list[tuple[str, str]]:
    from layerfed.errors import LayerfedError
    from layerfed.governance.loader import format_path
    from layerfed.governance.reachability import reachability_issues

    reader = _reader(ctx)
    if reader is None or reader.scenario is None:
        err.print(f"{scenario}: error: expected a scenario reader (run `layerfed policy check`)")
        raise typer.Exit(1)
    try:
        reach = reader.scenario(str(scenario), policy)
    except (LayerfedError, OSError, ValueError) as e:
        err.print(f"{scenario}: error: {e}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from e
    issues = reachability_issues(policy, reach, source=str(scenario))
    return [(format_path(i.path), i.message) for i in issues]


def load_or_exit(file: Path) -> Policy:
    """The policy in ``file``; its diagnostics printed and exit 1 when it does not load."""
    from layerfed.governance.errors import PolicyError
    from layerfed.governance.loader import load_policy

    try:
        return load_policy(file)
    except PolicyError as e:
        _print_diagnostics(e.diagnostics)
        raise typer.Exit(1) from e


@policy_app.command("explain")
def explain(file: FileArg) -> None:
    """Explain a policy layer by layer: rates, scope, memories, vetoes, red lines."""
    from layerfed.governance.explain import explain_policy

    out.print(explain_policy(load_or_exit(file)))


@policy_app.command("diff")
def diff(
    ctx: typer.Context,
    old: Annotated[Path, typer.Argument(help="The policy before.")],
    new: Annotated[Path, typer.Argument(help="The policy after.")],
    fail_on_loosen: Annotated[
        bool, typer.Option(help="Exit 2 when any change loosens governance.")
    ] = False,
    model: ModelOpt = None,
    patterns_only: Annotated[
        bool, typer.Option(help="Compare scope and red-line patterns as text, read no model.")
    ] = False,
) -> None:
    """Show what changed, layer by layer, flagging loosened red lines and vetoes.

    Scopes and red lines compare as the parameters they match on --model (default:
    the new policy's base_model), ties resolved; without a readable model, as patterns.
    """
    from layerfed.governance.diff import diff_policies

    before, after = load_or_exit(old), load_or_exit(new)
    params = None
    if not patterns_only:
        params = policy_model(ctx, new, after, model)
    if params is None:
        why = "--patterns-only" if patterns_only else "no readable model"
        out.print(
            f"compared scope and red-line patterns only ({why}): a pattern edit that matches "
            "the same parameters shows as a change, and ties are not seen",
            markup=False,
            soft_wrap=True,
        )
    else:
        out.print(
            f"compared the parameters each scope and red line matches on {params.model}"
            " (ties resolved); scope.parameters and red_lines.parameters.protected show"
            " removed -> added",
            markup=False,
            soft_wrap=True,
        )
    changes = diff_policies(before, after, params)
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
    from layerfed.governance.schema import Policy

    document = Policy.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "layerfed governance policy"
    typer.echo(json.dumps(document, indent=2, sort_keys=True))
