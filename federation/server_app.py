"""The Flower ServerApp: verify the policy, restore or start the state, run the strategy.

The same ``run_server`` serves every host: a deployed ServerApp reads its settings from
Flower's run config and gets :data:`~layerfed.federation.host.DEPLOYED_HOST`; a research
host passes its own :class:`~layerfed.federation.host.Host` (trust rules, principals,
placement, server key, noise seed) from above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from layerfed.federation.candidates import CandidateKeeper
from layerfed.federation.host import DEPLOYED_HOST, Host
from layerfed.federation.report import round_line, write_federation_report
from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_state import (
    STATE_FILE,
    ServerState,
    read_pinned_policy,
)
from layerfed.federation.strategy import LayeredStrategy
from layerfed.governance.audit import AuditLog, verify_audit
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.canonical import policy_hash
from layerfed.governance.keys import key_id, load_public_key
from layerfed.governance.redline_status import (
    SuiteStatus,
    red_line_status,
    refuse_unacknowledged,
    status_line,
)
from layerfed.governance.schema import Policy
from layerfed.governance.signing import is_demo_root
from layerfed.governance.trust import (
    DEPLOYMENT,
    TrustRequest,
    TrustRules,
    TrustSetting,
    TrustSetupError,
    verify_trust,
)
from layerfed.layers.base import load_base
from layerfed.layers.protect_check import verify_stored_slots
from layerfed.layers.redline_rates import red_line_rates
from layerfed.layers.slots import check_scopes
from layerfed.layers.stack import LayerStack

__all__ = [
    "RUN_CONFIG_KEYS",
    "base_label",
    "check_red_lines",
    "make_server_app",
    "refuse_finished_run",
    "run_server",
    "server_app",
    "trust_request",
    "verified_policy",
]

log = logging.getLogger("layerfed")
OnRound = Callable[[dict[str, Any]], None]
RUN_CONFIG_KEYS = {
    TrustSetting.ROOT_KEY: "layerfed-root-key",
    TrustSetting.TRUSTED: "layerfed-trusted",
    TrustSetting.VERIFY: "layerfed-verify",
}
"""How the run config spells each setting a trust refusal names."""


def trust_request(
    settings: RunSettings, pinned: Policy | None = None, rules: TrustRules = DEPLOYMENT
) -> TrustRequest:
    """The one trust decision's inputs, from a run config (and a checkpoint's pin)."""
    if not settings.policy:
        raise RunConfigError("run config layerfed-policy: expected a policy file, got none")
    return TrustRequest(
        policy=Path(settings.policy),
        root_keys=(Path(settings.root_key),) if settings.root_key else (),
        trusted=Path(settings.trusted) if settings.trusted else None,
        pinned=pinned,
        verify=settings.verify,
        rules=rules,
    )


def verified_policy(
    settings: RunSettings, pinned: Policy | None = None, rules: TrustRules = DEPLOYMENT
) -> Policy:
    """The policy file, verified by :func:`~layerfed.governance.trust.verify_trust`.

    Raises RunConfigError naming the run config key to set (no root key, the demo root,
    ``layerfed-verify`` false where ``rules`` forbid them), else PolicyError or TrustError.
    """
    request = trust_request(settings, pinned, rules)
    try:
        return verify_trust(request)
    except TrustSetupError as e:
        raise RunConfigError(
            f"run config {RUN_CONFIG_KEYS[e.setting]}: expected {e.expected}, got {e.got}"
        ) from e


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


Built = tuple[LayerStack, Any, list[SuiteStatus]]
"""The server's stack, its tokenizer and the red lines on the bare base (round 0)."""


def _build_stack(policy: Policy, settings: RunSettings) -> Built:
    """The server's stack on the base model, and each red-line suite's rate on the bare base.

    Raises :class:`ScopeError` naming the first layer whose scope matches no weight of
    the model (before round 1, see :func:`check_scopes`).
    """
    torch.set_num_threads(1)  # the server shares the machine with its clients
    model, tokenizer = load_base(
        policy.base_model, root=policy.source_dir, device=settings.device, dtype=settings.dtype
    )
    check_scopes(policy, model)
    statuses = red_line_status(policy, red_line_rates(policy, model, tokenizer))
    stack = LayerStack(policy, model, tokenizer, root_seed=settings.seed)
    return stack, tokenizer, statuses


def base_label(policy: Policy) -> str:
    """The policy's base model as the start-up lines name it."""
    ref = policy.base_model
    return f"builtin:{ref.builtin}" if ref.builtin is not None else str(ref.path)


def check_red_lines(policy: Policy, statuses: list[SuiteStatus], *, refuse: bool) -> None:
    """Log each red-line suite's rate on the base against its threshold; refuse a breach.

    A suite over its threshold that the policy does not acknowledge raises
    :class:`~layerfed.governance.redline_status.RedLineBreachError` when ``refuse``
    (a deployment), else is logged as a warning (a research host).
    """
    for status in statuses:
        line = f"base {base_label(policy)}: {status_line(status)}"
        if status.breached:
            log.warning("%s", line)
        else:
            log.info("%s", line)
    if refuse:
        refuse_unacknowledged(statuses, f"policy {policy.name!r}, base {base_label(policy)}")


def _reporting(out: Path, on_round: OnRound | None, *, report: bool) -> OnRound:
    """``on_round`` after the round's summary line (and, when ``report``, the report)."""

    def after_round(metrics: dict[str, Any]) -> None:
        log.info("%s", round_line(metrics))
        if report:
            try:
                write_federation_report(out)
            except (OSError, ValueError) as e:  # a report never stops a run
                log.warning("report: could not write %s: %s", out / "report.md", e)
        if on_round is not None:
            on_round(metrics)

    return after_round


def run_server(
    grid: Grid,
    context: Context,
    settings: RunSettings,
    on_round: OnRound | None = None,
    *,
    host: Host = DEPLOYED_HOST,
) -> ServerState:
    """Run (or resume) the federation to ``settings.rounds`` and return the final state.

    The policy is verified once, by the one trust decision under ``host.trust``; that
    object (plus ``host.principals``, audited by name) is what every part of the run
    uses, and its canonical hash goes into the audit, every checkpoint and every task. A
    resumed run trusts only the policy its signed checkpoint pins (or a signed
    successor) and refuses a checkpoint, audit log or slot store that is not the one
    it wrote. ``host.placement`` routes known instances to a node pool; without it the
    server discovers deployed nodes.
    """
    settings = settings.resolved()
    refuse_finished_run(settings)
    pinned = read_pinned_policy(settings.out_dir) if settings.resume else None
    verified = verified_policy(settings, pinned, host.trust)
    key, key_source = host.server_key(settings)
    extra = list(host.principals(verified)) if host.principals is not None else []
    policy = verified
    if extra:
        policy = policy.model_copy(update={"principals": [*policy.principals, *extra]})
    # Scopes must resolve on the model, and red lines hold on the bare base (or the policy
    # acknowledges their breach), before anything is written or any round starts.
    built = _build_stack(policy, settings) if settings.rounds > 0 else None
    if built is not None:
        check_red_lines(policy, built[2], refuse=host.refuse_red_line_breach)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    state = ServerState(
        settings.out_dir, policy, settings.run_id, instance_slots=host.instance_slots
    )
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
            demo_root=is_demo_root(
                [load_public_key(Path(settings.root_key))] if settings.root_key else []
            ),
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
        stack, tokenizer, statuses = built if built is not None else _build_stack(policy, settings)
        audit.append(
            AuditKind.RED_LINES_AT_START,
            round=state.round,
            base=base_label(policy),
            suites=[s.as_dict() for s in statuses],
        )
        state.store.record_redlines(stack.redline_digest)
        verify_stored_slots(state.store, state.committed, stack.spec)  # A = seed + basis
        strategy = LayeredStrategy(
            policy=policy,
            placement=host.placement,
            noise_seed=host.noise_seed,
            sample_per_layer=settings.sampling(),
            state=state,
            stack=stack,
            tokenizer=tokenizer,
            audit=audit,
            run_id=settings.run_id,
            seed=settings.seed,
            round_offset=state.round,
            on_round=_reporting(settings.out_dir, on_round, report=host.report_each_round),
            policy_hash=state.policy_hash,
            keep=_keeper(settings),
            server_key=key,
        )
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=settings.timeout
        )
        audit.append(AuditKind.RUN_END, round=state.round, digest=state.digest())
    return state


def _keeper(settings: RunSettings) -> CandidateKeeper | None:
    """The candidate keeper ``keep_candidates`` asks for (None: 0, keep none)."""
    if settings.keep_candidates < 0:
        raise RunConfigError(
            "run config layerfed-keep-candidates: expected rounds to keep (0: none), "
            f"got {settings.keep_candidates}"
        )
    if settings.keep_candidates == 0:
        return None
    return CandidateKeeper(settings.out_dir, settings.keep_candidates, settings.seed)


def _log_to_flower() -> None:
    """Send the ``layerfed`` logger's INFO lines through Flower's console handler (what
    ``flwr log`` shows), unless the process already gave that logger a handler."""
    from flwr.common.logger import console_handler

    ours = logging.getLogger("layerfed")
    if not ours.handlers:
        ours.addHandler(console_handler)
        ours.setLevel(logging.INFO)


def make_server_app(
    settings: RunSettings | None = None, on_round: OnRound | None = None
) -> ServerApp:
    """A ServerApp bound to ``settings``, or reading them from the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        chosen = RunSettings.from_config(context.run_config) if settings is None else settings
        _log_to_flower()
        run_server(grid, context, chosen, on_round)

    return app


server_app = make_server_app()
"""The ServerApp `flwr run` loads (``[tool.flwr.app.components]`` in pyproject.toml)."""
