"""The side panel: the layers composing the instance, the journal and the output guard.

What each layer may do comes from the policy, in the words of ``layerfed policy
explain`` (:mod:`layerfed.governance.explain`); the full explanation is kept as
plain text for a fold-out.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

from rich.console import Console

from layerfed.clients.guard import OutputGuard
from layerfed.clients.journal import Batch, FeedbackJournal
from layerfed.clients.synced import SyncedSlot
from layerfed.governance.explain import describe_condition, describe_memory, explain_policy
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.slots import SlotId

__all__ = [
    "GuardView",
    "JournalView",
    "LayerView",
    "RoundView",
    "entry_status",
    "explain_text",
    "guard_view",
    "journal_view",
    "layer_views",
]


@dataclass(frozen=True)
class LayerView:
    """One slot composing the instance: its version, when it last changed, what it may do."""

    slot: str
    layer: str
    key: str
    rank: int
    version: int
    changed: str
    trained_here: bool
    allows: tuple[tuple[str, str], ...]
    digest: str = ""
    """The committed version's arrays digest as the server signed it ("" when not synced)."""
    committed_round: int | None = None
    """The server round that committed the version the instance composes (None: not synced)."""


@dataclass(frozen=True)
class RoundView:
    """One training batch taken from the journal: which round, which slot, how many events."""

    run_id: str
    round: int
    slot: str
    state: str
    events: int


@dataclass(frozen=True)
class JournalView:
    """Journal counts by status and the rounds that took events."""

    pending: int
    batched: int
    consumed: int
    rounds: tuple[RoundView, ...]

    @property
    def total(self) -> int:
        """Every journalled event."""
        return self.pending + self.batched + self.consumed


@dataclass(frozen=True)
class GuardView:
    """The output guard: on or off, what it blocks, how often it has."""

    enabled: bool
    required_by_policy: bool
    banned: tuple[str, ...]
    refusal: str
    blocks: int


def _allows(policy: Policy, layer: LayerPolicy) -> tuple[tuple[str, str], ...]:
    scope = ", ".join(layer.scope.include)
    if layer.scope.exclude:
        scope += f" except {', '.join(layer.scope.exclude)}"
    vetoes = [
        f"{v.holder}: {v.action} when {describe_condition(v)}"
        for v in policy.vetoes
        if layer.name in v.applies_to
    ]
    local = layer.local
    rows = [
        ("scope", scope),
        ("server rate", f"{layer.server_lr:g}"),
        ("local training", f"lr {local.lr:g}, {local.steps} steps, batch {local.batch_size}"),
        ("memories", "; ".join(describe_memory(m) for m in layer.memories)),
        ("norm cap", "none" if layer.norm_cap is None else f"{layer.norm_cap:g}"),
        ("updates leave instance", "yes" if layer.updates_leave_instance else "no"),
        ("vetoed by", "; ".join(vetoes) or "nobody"),
    ]
    return tuple(rows)


def layer_views(
    policy: Policy,
    slots: tuple[SlotId, ...] | list[SlotId],
    versions: dict[str, int],
    changed_at: dict[str, float],
    own_layer: str | None,
    synced: dict[str, SyncedSlot] | None = None,
) -> list[LayerView]:
    """One view per slot, highest-ranked layer first; ``synced``: the node's saved versions."""
    by_name = {layer.name: layer for layer in policy.layers}
    views = []
    for slot in slots:
        layer = by_name[slot.layer]
        name = str(slot)
        at = changed_at.get(name)
        changed = "at start" if at is None else time.strftime("%H:%M:%S", time.localtime(at))
        version = versions.get(name, 0)
        saved = (synced or {}).get(name)
        composed = saved if saved is not None and saved.version == version else None
        views.append(
            LayerView(
                slot=name,
                layer=slot.layer,
                key=slot.key,
                rank=layer.rank,
                version=version,
                changed=changed,
                trained_here=slot.layer == own_layer,
                allows=_allows(policy, layer),
                digest=composed.digest if composed is not None else "",
                committed_round=composed.round if composed is not None else None,
            )
        )
    return sorted(views, key=lambda v: -v.rank)


_WAITING = {
    "open": "in training (round {round})",
    "signed": "sent in round {round}, awaiting acknowledgement",
    "released": "released after round {round}; waits for the next round",
}


def entry_status(status: str, round_: int | None, batch_state: str | None) -> str:
    """A journal entry's status in a person's words.

    ``batched`` events were taken by a round; once its update is signed and sent they
    wait for the server's acknowledgement, which arrives with the next run's first
    message: they say so, rather than looking stuck until then.
    """
    if status == "pending":
        return "pending: trains in the next round"
    if status == "consumed":
        return "consumed" + (f" (round {round_})" if round_ is not None else "")
    if status == "batched":
        template = _WAITING.get(batch_state or "", "in a training batch (round {round})")
        return template.format(round=round_ if round_ is not None else "?")
    return status


def _round(batch: Batch) -> RoundView:
    return RoundView(batch.run_id, batch.round, batch.slot, batch.state, len(batch.seqs))


def journal_view(journal: FeedbackJournal) -> JournalView:
    """Counts by status and every batch (newest first)."""
    counts = journal.counts()
    rounds = tuple(_round(b) for b in reversed(journal.batches()))
    return JournalView(counts["pending"], counts["batched"], counts["consumed"], rounds)


def guard_view(guard: OutputGuard | None, policy: Policy, blocks: int) -> GuardView:
    """The guard's state; ``blocks`` counts outputs it changed since the instance started."""
    if guard is None:
        return GuardView(False, policy.red_lines.output_guard, (), "", blocks)
    return GuardView(
        True, policy.red_lines.output_guard, tuple(sorted(guard.banned)), guard.refusal, blocks
    )


def explain_text(policy: Policy, width: int = 100) -> str:
    """``layerfed policy explain`` as plain text."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(explain_policy(policy))
    return console.export_text()
