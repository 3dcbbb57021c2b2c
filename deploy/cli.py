"""``layerfed deploy init`` and ``layerfed deploy up``: a local deployment in two commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer

from layerfed.deploy.node import DeployError

__all__ = ["deploy_app", "parse_overrides"]

deploy_app = typer.Typer(
    help="A local deployment on 127.0.0.1: keys, TLS, signed policy, SuperLink and SuperNodes.",
    no_args_is_help=True,
)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` run-config overrides, read by Flower's own parser (TOML values)."""
    from flwr.common.config import parse_config_args

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise DeployError("--set", "KEY=VALUE (e.g. layerfed-rounds=3)", pair)
        try:
            parsed = parse_config_args([pair])
        except (click.ClickException, ValueError) as e:
            raise DeployError(
                "--set", "KEY=VALUE with a bool, number or quoted string", pair
            ) from e
        if key not in parsed:
            raise DeployError("--set", "KEY=VALUE with a bool, number or quoted string", pair)
        out[key] = parsed[key]
    return out


@deploy_app.command("init")
def init_command(
    folder: Annotated[Path, typer.Argument(help="A new or empty folder for the deployment.")],
    model: Annotated[
        str,
        typer.Option(help="builtin:NAME or a local Hugging Face folder (Llama/Qwen2/GPT-2 style)."),
    ],
    instances: Annotated[int, typer.Option(help="How many instances (one SuperNode each).")] = 2,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers every instance feeds, comma-separated (default: alternate shared layer + individual)."
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="layerfed-rounds in the run config.")] = 2,
    seed: Annotated[int, typer.Option(help="layerfed-seed in the run config.")] = 0,
) -> None:
    """Write keys, TLS files, a signed policy, instance configs, a run config and run.sh."""
    from layerfed.deploy.init import InitOptions, init_deployment

    chosen = tuple(x.strip() for x in layers.split(",") if x.strip()) if layers else None
    options = InitOptions(model, instances, chosen, rounds, seed)
    layout = init_deployment(folder, options)
    typer.echo(f"wrote a deployment of {len(layout.seats)} instance(s) to {layout.folder}")
    for seat in layout.seats:
        typer.echo(f"  {seat.id}: {', '.join(seat.layers)}  ({seat.config})")
    typer.echo(f"start it with: {layout.folder / 'run.sh'}  (or: layerfed deploy up {folder})")


@deploy_app.command("up")
def up_command(
    folder: Annotated[Path, typer.Argument(help="A folder `layerfed deploy init` wrote.")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Run-config override KEY=VALUE (repeatable), e.g. layerfed-rounds=3."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 1800.0,
) -> None:
    """Start SuperLink + SuperNodes (TLS, node auth), run, and stop every process by PID."""
    from layerfed.deploy.up import deploy_up

    deploy_up(folder, parse_overrides(set_ or []), timeout=timeout, say=typer.echo)
