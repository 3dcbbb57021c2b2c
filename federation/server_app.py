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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_state import (
    STATE_FILE,
    ServerState,
    checkpoint_run_id,
    read_pinned_policy,
)
from layerfed.federation.strategy import LayeredStrategy
from layerfed.governance.audit import AuditLog, verify_audit
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.canonical import policy_hash
from layerfed.governance.keys import generate_keypair, key_id, load_private_key, load_public_key
from layerfed.governance.schema import Policy, Principal
from layerfed.governance.signing import (
    DEMO_ROOT_KEY,
    PolicyTrustError,
    is_demo_root,
    read_policy,
    verify_policy_file,
    verify_trust_anchor,
)
from layerfed.layers.base import load_base
from layerfed.layers.slots import check_scopes
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import Roster

__all__ = [
    "check_deployment",
    "make_server_app",
    "refuse_finished_run",
    "run_server",
    "server_app",
    "verified_policy",
]

log = logging.getLogger("layerfed")
OnRound = Callable[[dict[str, Any]], None]
GYM_SERVER_KEY = "server-key"
"""The gym's per-run checkpoint key, ``<out>/server-key.pem`` (a disk attacker can read it)."""


def _root_keys(settings: RunSettings) -> list[Ed25519PublicKey]:
    return [load_public_key(Path(settings.root_key))] if settings.root_key else []


def check_deployment(settings: RunSettings) -> None:
    """Outside simulation refuse, before round 1, whatever anyone could compute or forge.

    A deployment verifies the policy (``layerfed-verify`` true) against an explicit
    root key that is not the demo root, or against the policy its checkpoint pins
    (resume), and signs checkpoints with its own ``layerfed-server-key``.
    """
    if settings.simulation:
        return
    if not settings.verify:
        raise RunConfigError(
            "run config layerfed-verify: expected true outside simulation, got false"
        )
    pinned = settings.resume and bool(checkpoint_run_id(settings.out_dir))
    if not settings.root_key and not pinned:
        raise RunConfigError(
            "run config layerfed-root-key: expected the creator's root public key (or a "
            "checkpoint pinning a verified policy, with layerfed-resume), got none"
        )
    if is_demo_root(_root_keys(settings)):
        raise RunConfigError(
            f"run config layerfed-root-key: expected your own root key, got the demo root "
            f"{DEMO_ROOT_KEY.name} whose private half is public (simulation only)"
        )
    if not settings.server_key:
        raise RunConfigError(
            "run config layerfed-server-key: expected the server's Ed25519 private key "
            "(`layerfed keys new`) to sign checkpoints, got none"
        )


def verified_policy(settings: RunSettings, pinned: Policy | None = None) -> Policy:
    """The policy file, verified (raises RunConfigError, PolicyError or TrustError).

    Trust starts at ``pinned`` (the policy a checkpoint pins: only it or a signed
    successor passes) or else at the root key. A ``trusted`` previous policy must
    itself verify from that start before it vouches for the policy file.
    """
    if not settings.policy:
        raise RunConfigError("run config layerfed-policy: expected a policy file, got none")
    path = Path(settings.policy)
    if not settings.verify:
        policy = read_policy(path)
        if pinned is not None and policy_hash(policy) != policy_hash(pinned):
            raise PolicyTrustError(
                "pinned",
                f"expected the pinned policy {policy_hash(pinned)} (unverified runs cannot "
                f"change policy on resume), got {policy_hash(policy)}",
                str(path),
            )
        return policy
    anchor = pinned
    roots = _root_keys(settings) if pinned is None else []
    if settings.trusted:
        anchor = verify_trust_anchor(Path(settings.trusted), trusted=pinned, root_keys=roots)
        roots = []
    if anchor is None and not roots:
        raise RunConfigError(
            "run config layerfed-root-key: expected a root public key or a pinned policy "
            "to verify layerfed-policy with, got none"
        )
    return verify_policy_file(path, trusted=anchor, root_keys=roots or None)


def refuse_finished_run(settings: RunSettings) -> None:
    """Refuse an output folder that already holds a run, unless resuming it."""
    if not settings.resume and (settings.out_dir / "state" / STATE_FILE).exists():
        raise RunConfigError(
            f"{settings.out_dir}: expected an empty output folder, got an earlier run "
            "(resume it, or choose another output folder)"
        )


def _server_key(settings: RunSettings) -> tuple[Ed25519PrivateKey, str]:
    """The key that signs checkpoints, and where it came from (audited)."""
    if settings.server_key:
        return load_private_key(Path(settings.server_key)), "configured"
    if not settings.simulation:
        raise RunConfigError("run config layerfed-server-key: expected a key file, got none")
    path = settings.out_dir / f"{GYM_SERVER_KEY}.pem"
    if path.exists():
        return load_private_key(path), "gym: per-run key in the out dir"
    generate_keypair(GYM_SERVER_KEY, settings.out_dir)
    return load_private_key(path), "gym: generated per-run key in the out dir"


def _open_audit(settings: RunSettings) -> AuditLog:
    path = settings.out_dir / "audit.jsonl"
    if path.exists():
        report = verify_audit(path)
        if report.torn_tail:
            AuditLog.repair(path)
    return AuditLog(path)


def _build_stack(policy: Policy, settings: RunSettings) -> tuple[LayerStack, Any]:
    """The server's stack on the base model; raises :class:`ScopeError` naming the first layer
    whose scope matches no weight of the model (before round 1, see :func:`check_scopes`)."""
    torch.set_num_threads(1)  # the server shares the machine with its clients
    model, tokenizer = load_base(policy.base_model, root=policy.source_dir)
    check_scopes(policy, model)
    return LayerStack(policy, model, tokenizer, root_seed=settings.seed), tokenizer


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
    gym adds from it: its simulated layer keys, audited) is what every part of the run uses,
    and its canonical hash goes into the audit, every checkpoint and every task. A
    resumed run trusts only the policy its signed checkpoint pins (or a signed
    successor) and refuses a checkpoint, audit log or slot store that is not the one
    it wrote. ``roster`` routes simulated instances to virtual nodes; deployments discover nodes.
    """
    settings = settings.resolved()
    check_deployment(settings)
    refuse_finished_run(settings)
    pinned = read_pinned_policy(settings.out_dir) if settings.resume else None
    verified = verified_policy(settings, pinned)
    extra = list(principals(verified)) if principals is not None else []
    policy = verified
    if extra:
        policy = policy.model_copy(update={"principals": [*policy.principals, *extra]})
    # Scopes must resolve on the model before anything is written or any round starts.
    built = _build_stack(policy, settings) if settings.rounds > 0 else None
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    key, key_source = _server_key(settings)
    state = ServerState(settings.out_dir, policy, settings.run_id)
    resumed = state.load() if settings.resume else False
    if resumed:
        state.verify_anchors(key.public_key(), settings.out_dir / "audit.jsonl")
    with _open_audit(settings) as audit:
        state.bind(audit, key, verified)
        audit.append(
            AuditKind.POLICY_LOAD,
            name=verified.name,
            version=verified.version,
            policy_hash=state.policy_hash,
            pinned_hash=policy_hash(pinned) if pinned is not None else None,
            file=settings.policy,
            verified=settings.verify,
            demo_root=is_demo_root(_root_keys(settings)),
            simulated_principals=[p.name for p in extra],
            run_id=settings.run_id,
            server_key=key_id(key.public_key()),
            server_key_source=key_source,
        )
        if resumed:
            audit.append(AuditKind.RESUME, round=state.round)
        state.seal()
        remaining = settings.rounds - state.round
        if remaining <= 0:
            log.info(
                "nothing to do: %s of %s rounds already complete", state.round, settings.rounds
            )
            return state
        stack, tokenizer = built if built is not None else _build_stack(policy, settings)
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
            policy_hash=state.policy_hash,
        )
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=settings.timeout
        )
        audit.append(AuditKind.RUN_END, round=state.round, digest=state.digest())
    return state


def make_server_app(
    settings: RunSettings | None = None, on_round: OnRound | None = None
) -> ServerApp:
    """A ServerApp bound to ``settings``, or reading them from the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if settings is None:
            chosen = RunSettings.from_config(context.run_config)
            if chosen.simulation:
                raise RunConfigError(
                    "run config layerfed-simulation: expected false for a deployed ServerApp "
                    "(simulated keys and the demo root exist only in `layerfed simulate`), got true"
                )
        else:
            chosen = settings
        run_server(grid, context, chosen, on_round)

    return app


server_app = make_server_app()
"""The ServerApp `flwr run` loads (``[tool.flwr.app.components]`` in pyproject.toml)."""
