"""`layerfed instance serve`: the feedback page for one instance, on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfed.serve.server import check_bind

__all__ = ["instance_app", "serve_command"]

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
    from layerfed.clients.instance import Instance
    from layerfed.serve.app import create_app
    from layerfed.serve.page import FeedbackPage
    from layerfed.serve.server import serve_forever

    instance = Instance.from_config(config, seed=seed)
    page = FeedbackPage(instance)
    serve_forever(create_app(page, token=token, max_body=max_body), host, port, token)
