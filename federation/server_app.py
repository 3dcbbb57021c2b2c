"""The Flower ServerApp: verify the policy, restore or start the state, run the strategy.

The same ``run_server`` serves simulation (settings captured by the app) and
deployment (settings from Flower's run config).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_state import STATE_FILE, ServerState
from layerfed.federation.strategy import LayeredStrategy
from layerfed.governance.audit import AuditLog, verify_audit
from layerfed.governance.keys import load_public_key
from layerfed.governance.schema import Policy, Principal
from layerfed.governance.signing import read_policy, verify_policy_file
from layerfed.layers.base import load_base
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import Roster

__all__ = [
    "make_server_app",
    "refuse_finished_run",
    "run_server",
    "server_app",
    "verified_policy",
]

log = logging.getLogger("layerfed")
OnRound = Callable[[dict[str, Any]], None]


def verified_policy(settings: RunSettings) -> Policy:
    """The policy file, verified against the trusted policy or root key (raises PolicyError/TrustError)."""
    if not settings.policy:
        raise RunConfigError("run config layerfed-policy: expected a policy file, got none")
    path = Path(settings.policy)
    if not settings.verify:
        return read_policy(path)
    trusted = read_policy(Path(settings.trusted)) if settings.trusted else None
    roots = (
        [load_public_key(Path(settings.root_key))]
        if settings.root_key and trusted is None
        else None
    )
    return verify_policy_file(path, trusted=trusted, root_keys=roots)


def refuse_finished_run(settings: RunSettings) -> None:
    """Refuse an output folder that already holds a run, unless resuming it."""
    if not settings.resume and (settings.out_dir / "state" / STATE_FILE).exists():
        raise RunConfigError(
            f"{settings.out_dir}: expected an empty output folder, got an earlier run "
            "(resume it, or choose another output folder)"
        )


def _open_audit(settings: RunSettings) -> AuditLog:
    path = settings.out_dir / "audit.jsonl"
    if path.exists():
        report = verify_audit(path)
        if report.torn_tail:
            AuditLog.repair(path)
    return AuditLog(path)


def run_server(
    grid: Grid,
    context: Context,
    settings: RunSettings,
    on_round: OnRound | None = None,
    *,
    roster: Roster | None = None,
    principals: Callable[[Policy], Sequence[Principal]] | None = None,
) -> ServerState:
    """Run (or resume) the federation to ``settings.rounds`` and return the final state.

    The policy is verified once; that object (plus ``principals``, which only the
    gym adds from it: its simulated layer keys, audited) is what every part of the run uses.
    ``roster`` routes simulated instances to virtual nodes; deployments discover nodes.
    """
    settings = settings.resolved()
    policy = verified_policy(settings)
    extra = list(principals(policy)) if principals is not None else []
    if extra:
        policy = policy.model_copy(update={"principals": [*policy.principals, *extra]})
    refuse_finished_run(settings)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    state = ServerState(settings.out_dir, policy, settings.run_id)
    resumed = state.load() if settings.resume else False
    with _open_audit(settings) as audit:
        audit.append(
            "policy_load",
            name=policy.name,
            version=policy.version,
            file=settings.policy,
            verified=settings.verify,
            simulated_principals=[p.name for p in extra],
        )
        if resumed:
            audit.append("resume", round=state.round)
        remaining = settings.rounds - state.round
        if remaining <= 0:
            log.info(
                "nothing to do: %s of %s rounds already complete", state.round, settings.rounds
            )
            return state
        torch.set_num_threads(1)  # the server shares the machine with its clients
        model, tokenizer = load_base(policy.base_model, root=policy.source_dir)
        stack = LayerStack(policy, model, tokenizer, root_seed=settings.seed)
        state.store.record_redlines(stack.redline_digest)
        strategy = LayeredStrategy(
            policy=policy,
            roster=roster,
            virtual_nodes=settings.simulation and roster is not None,
            sample_per_layer=settings.sampling(),
            state=state,
            stack=stack,
            tokenizer=tokenizer,
            audit=audit,
            run_id=settings.run_id,
            seed=settings.seed,
            round_offset=state.round,
            on_round=on_round,
        )
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=settings.timeout
        )
        audit.append("run_end", round=state.round, digest=state.digest())
    return state


def make_server_app(
    settings: RunSettings | None = None, on_round: OnRound | None = None
) -> ServerApp:
    """A ServerApp bound to ``settings``, or reading them from the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        chosen = settings if settings is not None else RunSettings.from_config(context.run_config)
        run_server(grid, context, chosen, on_round)

    return app


server_app = make_server_app()
"""The ServerApp `flwr run` loads (``[tool.flwr.app.components]`` in pyproject.toml)."""
