"""A readable account of a policy for people who do not read Python or YAML."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from layerfed.governance.privacy_explain import privacy_lines
from layerfed.governance.schema import (
    LayerPolicy,
    Memory,
    NormCondition,
    Policy,
    ProbeRegressionCondition,
    QuorumCondition,
    RedLineProbe,
    Veto,
)
from layerfed.governance.schema_roles import OWN_ROLE, layer_roles

__all__ = [
    "describe_condition",
    "describe_memory",
    "describe_privacy",
    "describe_roles",
    "explain_policy",
]


def describe_memory(memory: Memory) -> str:
    """``stm: rate x1.0, half-life 3 rounds (keeps 79% per round)``."""
    head = f"{memory.name}: rate x{memory.lr_multiplier:g}"
    if memory.half_life is None:
        return f"{head}, never decays"
    rounds = memory.half_life_rounds
    if rounds is not None:
        keep = 2 ** (-1 / rounds)
        return f"{head}, half-life {rounds:g} rounds (keeps {keep:.1%} per round)"
    return f"{head}, half-life {memory.half_life} of wall time"


def describe_condition(veto: Veto) -> str:
    """The veto's condition in words."""
    cond = veto.condition
    if isinstance(cond, NormCondition):
        return f"update norm > {cond.max_norm:g}"
    if isinstance(cond, ProbeRegressionCondition):
        return f"probe '{cond.suite}' worsens by > {cond.max_regression:g}"
    if isinstance(cond, QuorumCondition):
        return f"fewer than {cond.min_signatures} {veto.holder} principals approve"
    return "update touches parameters outside the layer's scope"


def describe_privacy(layer: LayerPolicy) -> str:
    """The layer's privacy mode, its parameters and its budget, in words (see docs/privacy.md)."""
    return "\n".join(privacy_lines(layer))


def describe_roles(layer: LayerPolicy) -> str:
    """Whose feedback trains the layer, e.g. ``everyone (a person's own feedback), by default``."""
    names = [
        f"{role} (a person's own feedback)" if role == OWN_ROLE else role
        for role in layer_roles(layer)
    ]
    return ", ".join(names) + ("" if layer.roles is not None else ", by default")


def _layer_table(policy: Policy, layer: LayerPolicy) -> Table:
    table = Table(
        title=f"layer {layer.name} (rank {layer.rank})", show_header=False, title_justify="left"
    )
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row(
        "slots", f"one per {layer.slot_key}" if layer.slot_key != "global" else "one, shared"
    )
    table.add_row("trained by roles", describe_roles(layer))
    table.add_row("server rate", f"{layer.server_lr:g}")
    local = layer.local
    table.add_row(
        "local training", f"lr {local.lr:g}, {local.steps} steps, batch {local.batch_size}"
    )
    scope = "\n".join(layer.scope.include)
    if layer.scope.exclude:
        scope += "\nexcept " + ", ".join(layer.scope.exclude)
    table.add_row("scope", scope)
    table.add_row("LoRA", f"rank {layer.scope.lora_rank}, alpha {layer.scope.lora_alpha:g}")
    table.add_row("memories", "\n".join(describe_memory(m) for m in layer.memories))
    agg = layer.aggregator
    params = {"trim_fraction": agg.trim_fraction, "byzantine": agg.byzantine}
    extra = ", ".join(f"{k} {v:g}" for k, v in params.items() if v is not None)
    table.add_row("aggregator", agg.kind + (f" ({extra})" if extra else ""))
    table.add_row("norm cap", "none" if layer.norm_cap is None else f"{layer.norm_cap:g}")
    table.add_row("min clients per slot", str(layer.min_clients))
    leaves = "yes" if layer.updates_leave_instance else "no (stays on the instance)"
    table.add_row("updates leave instance", leaves)
    table.add_row("privacy", describe_privacy(layer))
    vetoes = [v for v in policy.vetoes if layer.name in v.applies_to]
    lines = [f"{v.holder}: {v.action} when {describe_condition(v)} ({v.name})" for v in vetoes]
    table.add_row("vetoed by", "\n".join(lines) or "nobody")
    speakers = [
        p.name + ("" if p.slots == ["*"] else f" for {', '.join(p.slots)}")
        for p in policy.principals
        if p.layer == layer.name
    ]
    table.add_row("principals", "\n".join(speakers) or "none named")
    return table


def _red_lines(policy: Policy) -> Table:
    table = Table(
        title="red lines (no training may lift them)", show_header=False, title_justify="left"
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    red = policy.red_lines
    table.add_row("protected parameters", "\n".join(red.parameters) or "none")
    probes = [
        f"{p.suite}: violation rate <= {p.max_violation_rate:g}{_protection(p)}"
        + (f"; BREACH ACKNOWLEDGED at the start: {p.breach_reason}" if p.acknowledge_breach else "")
        for p in red.probes
    ]
    table.add_row("probe thresholds", "\n".join(probes) or "none")
    table.add_row("output guard", "on" if red.output_guard else "off")
    return table


def _protection(probe: RedLineProbe) -> str:
    """How a red-line suite is protected, in words (empty for the default gate)."""
    if probe.protect == "gate":
        return ""
    how = "gate + projection" if probe.protect == "both" else "projection only (no gate)"
    if probe.protect == "projection" and probe.basis != "exact":
        how = "projection (the gate still scores it: a truncated basis)"
    if probe.basis == "exact":
        basis = "exact basis: every update leaves these probe sequences' outputs as the base's"
    else:
        parts = [f"energy {probe.basis.energy:g}"] if probe.basis.energy is not None else []
        parts += [f"max_rank {probe.basis.max_rank}"] if probe.basis.max_rank is not None else []
        basis = f"top-k basis ({', '.join(parts)}): change bounded, not zero"
    return f"; {how}, {basis}"


def _trust(policy: Policy) -> Table:
    table = Table(title="trust and superego", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    signers = policy.policy_signers
    table.add_row(
        "next policy signed by",
        "not set" if signers is None else f"{signers.threshold} of {', '.join(signers.principals)}",
    )
    sup = policy.superego
    text = "off"
    if sup.enabled:
        suites = ", ".join(sup.suites) or "no suites"
        text = f"{sup.teacher}, consulted with p={sup.probability:g} per step, weight {sup.weight:g}, on {suites}"
    table.add_row("superego", text)
    table.add_row(
        "probe suites", "\n".join(f"{s.name}: {s.source}" for s in policy.probe_suites) or "none"
    )
    return table


def explain_policy(policy: Policy) -> RenderableType:
    """Everything a policy says, as rich tables: one per layer, then red lines and trust."""
    base = policy.base_model.path or f"built-in {policy.base_model.builtin}"
    header = Text.assemble(
        (f"policy {policy.name}", "bold"),
        f"  version {policy.version}, expires {policy.expires:%Y-%m-%d %H:%M} UTC, base model {base}",
    )
    tables: list[RenderableType] = [header]
    tables += [_layer_table(policy, layer) for layer in policy.layers_by_rank()]
    tables += [_red_lines(policy), _trust(policy)]
    return Group(*tables)
