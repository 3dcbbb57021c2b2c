"""The `layerfed` command line: one Typer app with a sub-app per user task."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console

from layerfed.cli_policy_test import policy_test_command
from layerfed.cli_readers import cli_readers
from layerfed.errors import LayerfedError
from layerfed.governance.cli_approve import approve_command
from layerfed.governance.cli_policy import policy_app
from layerfed.governance.cli_trust import audit_app, keys_app, policy_sign, policy_verify
from layerfed.layers.cli_model import model_app
from layerfed.serve.cli import instance_app
from layerfed.simulation.cli_experiment import experiment_app
from layerfed.simulation.cli_simulate import simulate_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="layerfed",
    help="Federated, layered alignment feedback on Flower and PEFT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Commands below layers (policy check, diff) read models and scenarios through these.
    context_settings={"obj": cli_readers()},
)
policy_app.command("sign")(policy_sign)
policy_app.command("verify")(policy_verify)
policy_app.command("test")(policy_test_command)
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.command("simulate")(simulate_command)
app.command("approve")(approve_command)
app.add_typer(experiment_app, name="experiment")
app.add_typer(model_app, name="model")
app.add_typer(instance_app, name="instance")


def main() -> None:
    """Console entry point: typed errors become one clear line and exit code 1."""
    level = os.environ.get("LAYERFED_LOG", "WARNING").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING), format="%(levelname)s %(message)s"
    )
    try:
        app()
    except LayerfedError as e:
        Console(stderr=True).print(f"error: {e}", style="red", markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
