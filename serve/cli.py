"""`layerfed instance serve` (the feedback page, on uvicorn) and `instance status` (synced slots)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfed.serve.server import check_bind

__all__ = ["instance_app", "serve_command", "status_command"]

instance_app = typer.Typer(
    help="Run one model instance for people (docs/page.md).", no_args_is_help=True
)


@instance_app.command("serve")
def serve_command(
    config: Annotated[
        Path, typer.Option("--config", help="The instance config (TOML): policy, model, journal.")
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="LAYERFED_PAGE_TOKEN",
            help="Token people must give (open /?token=...); at least 16 characters.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="The federation's seed (its slots' frozen A matrices).")
    ] = 0,
    max_body: Annotated[
        int, typer.Option(help="Largest request body accepted, in bytes.", min=1024)
    ] = 64 * 1024,
) -> None:
    """Serve the feedback page: conversation, every feedback kind, layers and journal."""
    check_bind(host, token)  # before loading a model
    from layerfed.clients.config import InstanceConfig
    from layerfed.clients.synced import SYNCED_DIR
    from layerfed.serve.server import check_demo_keys

    cfg = InstanceConfig.load(config)
    demo = check_demo_keys(cfg, host)  # refuses them beyond loopback, before loading a model
    from layerfed.clients.instance import Instance
    from layerfed.serve.app import create_app
    from layerfed.serve.page import FeedbackPage
    from layerfed.serve.server import serve_forever

    instance = Instance.from_config(cfg, seed=seed)
    page = FeedbackPage(instance, synced=cfg.state / SYNCED_DIR if cfg.state else None)
    app = create_app(page, token=token, max_body=max_body)
    for line in demo:
        typer.secho(line, fg="red", bold=True, err=True)
    typer.echo(f"feedback page for instance {instance.instance_id} on http://{host}:{port}/")
    serve_forever(app, host, port, token)


@instance_app.command("status")
def status_command(
    config: Annotated[
        Path, typer.Option("--config", help="The instance config (TOML): where its state is.")
    ],
) -> None:
    """Print each synced shared slot's version, digest and age (newest saved version)."""
    from layerfed.clients.config import InstanceConfig
    from layerfed.clients.synced import SYNCED_DIR, SyncedSlots

    cfg = InstanceConfig.load(config)
    if cfg.state is None:
        typer.echo(f"{config}: no [storage] state folder: nothing synced is saved")
        raise typer.Exit(1)
    root = cfg.state / SYNCED_DIR
    rows = SyncedSlots(root, None, cfg.sync_keep).status()
    if not rows:
        typer.echo(f"{root}: no synced slot versions yet (every shared slot composes at v0)")
        return
    typer.echo(f"{'slot':<28} {'version':>7} {'round':>6} {'age':>9} {'kept':>4}  digest")
    for row in rows:
        typer.echo(
            f"{row.slot:<28} {row.version:>7} {row.round:>6} {_age(row.age()):>9} "
            f"{row.kept:>4}  {row.digest}"
        )


def _age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
