"""`layerfed approve`: a quorum-veto holder signs its approval of one held candidate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from layerfed.errors import LayerfedError
from layerfed.governance.approvals import sign_approval, write_approval
from layerfed.governance.keys import load_private_key

__all__ = ["approve_command"]

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def approve_command(
    run_out: Annotated[
        Path,
        typer.Option("--out", help="The run's output folder (approvals go to OUT/approvals/)."),
    ],
    run_id: Annotated[str, typer.Option("--run-id", help="The run id (audit: policy_load).")],
    round_: Annotated[int, typer.Option("--round", help="The round the candidate was held in.")],
    slot: Annotated[str, typer.Option("--slot", help="The held slot, e.g. community/global.")],
    candidate: Annotated[
        str, typer.Option("--candidate", help="The candidate digest (audit: approval_requested).")
    ],
    principal: Annotated[str, typer.Option("--principal", help="Your principal's name.")],
    key: Annotated[Path, typer.Option("--key", help="Your principal's private key (PEM).")],
    passphrase_env: Annotated[
        str | None, typer.Option("--passphrase-env", help="Variable holding the key's passphrase.")
    ] = None,
) -> None:
    """Approve one held candidate: (run, round, slot, candidate digest), signed by your key."""
    try:
        passphrase = None
        if passphrase_env is not None:
            value = os.environ.get(passphrase_env)
            if not value:
                raise typer.BadParameter(f"expected a set variable {passphrase_env!r}, got none")
            passphrase = value.encode("utf-8")
        approval = sign_approval(
            run_id=run_id,
            round=round_,
            slot=slot,
            candidate=candidate,
            principal=principal,
            private_key=load_private_key(key, passphrase),
        )
        path = write_approval(approval, run_out / "approvals")
    except (LayerfedError, ValueError, OSError) as e:
        err.print(f"error: {e}".splitlines()[0], style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from e
    out.print(f"approved {slot} round {round_} candidate {candidate[:12]}… as {principal}: {path}")
