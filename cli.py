"""The `layerfed` command line: one Typer app with a sub-app per user task.

:func:`main` builds only the command group the command line names, so
`layerfed policy check` imports the policy commands and not the gym, the
server or Flower: argument and file errors come before any heavy import. Each
group's commands import what they need when they run. :data:`app` (tests,
``python -c``) is the whole tree, built on first use.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from layerfed.errors import LayerfedError

__all__ = ["app", "build_app", "main"]

app: typer.Typer
"""The whole command tree (built on first access)."""


def _policy(app: typer.Typer) -> None:
    from layerfed.cli_policy_test import policy_test_command
    from layerfed.governance.cli_policy import policy_app
    from layerfed.governance.cli_trust import policy_sign, policy_verify

    have = {c.name for c in policy_app.registered_commands}
    for name, command in (
        ("sign", policy_sign),
        ("verify", policy_verify),
        ("test", policy_test_command),
    ):
        if name not in have:
            policy_app.command(name)(command)
    app.add_typer(policy_app, name="policy")


def _trust(app: typer.Typer) -> None:
    from layerfed.cli_replay import replay_command
    from layerfed.governance.cli_trust import audit_app, keys_app

    if "replay" not in {c.name for c in audit_app.registered_commands}:
        audit_app.command("replay")(replay_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")


def _simulate(app: typer.Typer) -> None:
    from layerfed.simulation.cli_simulate import simulate_command

    @functools.wraps(simulate_command)
    def simulate(**options: Any) -> None:
        _policy_preflight(options["policy"])
        simulate_command(**options)

    app.command("simulate")(simulate)


def _policy_preflight(path: Path) -> None:
    """Report a policy file's errors before the gym's heavy imports (the run loads it again)."""
    from layerfed.governance.loader import check_policy_file

    result = check_policy_file(path)
    if result.ok:
        return
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for d in result.diagnostics:
        err.print(str(d), style="red" if d.severity == "error" else "yellow", markup=False)
    raise typer.Exit(1)


def _approve(app: typer.Typer) -> None:
    from layerfed.governance.cli_approve import approve_command

    app.command("approve")(approve_command)


def _experiment(app: typer.Typer) -> None:
    from layerfed.simulation.cli_experiment import experiment_app

    app.add_typer(experiment_app, name="experiment")


def _model(app: typer.Typer) -> None:
    from layerfed.layers.cli_model import model_app

    app.add_typer(model_app, name="model")


def _instance(app: typer.Typer) -> None:
    from layerfed.serve.cli import instance_app

    app.add_typer(instance_app, name="instance")


def _deploy(app: typer.Typer) -> None:
    from layerfed.deploy.cli import deploy_app

    app.add_typer(deploy_app, name="deploy")


_GROUPS: dict[str, Callable[[typer.Typer], None]] = {
    "policy": _policy,
    "keys": _trust,
    "audit": _trust,
    "simulate": _simulate,
    "approve": _approve,
    "experiment": _experiment,
    "model": _model,
    "instance": _instance,
    "deploy": _deploy,
}
"""Top-level command -> the function adding its group (in help order)."""


def build_app(command: str | None = None) -> typer.Typer:
    """The CLI with only ``command``'s group, or every group when None or unknown."""
    adders = [_GROUPS[command]] if command in _GROUPS else list(dict.fromkeys(_GROUPS.values()))
    obj: Any = None
    if _policy in adders:
        # Commands below layers (policy check, diff) read models and scenarios through these.
        from layerfed.cli_readers import cli_readers

        obj = cli_readers()
    app = typer.Typer(
        name="layerfed",
        help="Federated, layered alignment feedback on Flower and PEFT.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"obj": obj},
    )
    app.callback()(_root)  # a group even when it holds one command (`simulate`)
    for add in adders:
        add(app)
    return app


def _root() -> None:
    """Federated, layered alignment feedback on Flower and PEFT."""


def __getattr__(name: str) -> Any:
    if name == "app":
        whole = build_app()
        globals()["app"] = whole
        return whole
    raise AttributeError(f"module 'layerfed.cli' has no attribute {name!r}")


def main() -> None:
    """Console entry point: typed errors become one clear line and exit code 1."""
    level = os.environ.get("LAYERFED_LOG", "WARNING").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING), format="%(levelname)s %(message)s"
    )
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    try:
        build_app(command)()
    except LayerfedError as e:
        from rich.console import Console

        Console(stderr=True).print(f"error: {e}", style="red", markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
