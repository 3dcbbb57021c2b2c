"""What-if replay: a finished run's kept candidates, judged again under another policy.

Each kept candidate (:mod:`~layerfed.federation.candidates`, verified against the
digest its ``candidate_kept`` audit record holds) goes, in the order the run judged
them, through the pipeline's own stages on a scratch copy of the server's state:
:func:`~layerfed.federation.stages.step.take_step` (the new policy's ``server_lr``),
:func:`~layerfed.federation.stages.judge.judge` (its vetoes, probe regressions and
red-line gate, on the new policy's base model and the run's compositions) and, when
it would commit, :func:`~layerfed.federation.stages.commit.commit`. So a refusal
changes what later candidates are judged against, as it would have in the run.

What replay holds fixed: the kept means (the replies the run aggregated, and so its
intake, per-reply norm caps, aggregator, minimum clients and privacy) and the
approvals the run gathered. A change to those is named in the report's notes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfed.federation.candidates import KeptCandidate, read_candidate
from layerfed.federation.committed import CommittedArrays
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.redline_gate import affected_compositions, gated_probes
from layerfed.federation.replay_record import (
    Outcome,
    RecordedRun,
    ReplayError,
    outcome_of,
    read_recorded,
)
from layerfed.federation.round_context import Profile, RoundContext
from layerfed.federation.server_state import ServerState, read_pinned_policy
from layerfed.federation.stages.commit import CommitInput, commit
from layerfed.federation.stages.judge import JudgeInput, judge
from layerfed.federation.stages.step import StepInput, take_step
from layerfed.governance.audit import AuditLog
from layerfed.governance.schema import Policy
from layerfed.layers.base import load_base
from layerfed.layers.device import DEFAULT_DEVICE, DEFAULT_DTYPE
from layerfed.layers.errors import ArrayError
from layerfed.layers.slots import SlotId, check_scopes
from layerfed.layers.stack import LayerStack

__all__ = ["RedLineRate", "ReplayReport", "ReplayRow", "StackFactory", "model_stack", "replay_run"]

StackFactory = Callable[[Policy, int], tuple[LayerStack, Any]]
"""``(policy, seed) -> (stack, tokenizer)``: the new policy's stack on its base model
(``functools.partial(model_stack, device=..., dtype=...)`` places it)."""
_NOT_REPLAYED = ("aggregator", "norm_cap", "min_clients", "privacy")


@dataclass(frozen=True)
class ReplayRow:
    """One kept candidate: what the run decided and what the new policy decides."""

    round: int
    slot: str
    recorded: Outcome
    replayed: Outcome

    @property
    def differs(self) -> bool:
        """Whether the decision or the version it made differs."""
        return (self.recorded.decision, self.recorded.version) != (
            self.replayed.decision,
            self.replayed.version,
        )

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "round": self.round,
            "slot": self.slot,
            "differs": self.differs,
            "recorded": self.recorded.as_json(),
            "replayed": self.replayed.as_json(),
        }


@dataclass(frozen=True)
class RedLineRate:
    """A red-line suite's violation rate on one composition at the end, recorded vs replayed."""

    composition: tuple[str, ...]
    suite: str
    recorded: float
    replayed: float
    max_rate: float


@dataclass
class ReplayReport:
    """Replay of one run under one policy."""

    run_dir: str
    run_id: str
    policy: str
    rows: list[ReplayRow] = field(default_factory=list)
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Slot -> (recorded, replayed) version after the last kept round."""
    red_lines: list[RedLineRate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[ReplayRow]:
        """Rows whose decision or version differs."""
        return [r for r in self.rows if r.differs]

    def as_json(self) -> dict[str, Any]:
        """The whole report, JSON-ready."""
        return {
            "run_dir": self.run_dir,
            "run_id": self.run_id,
            "policy": self.policy,
            "changed": len(self.changed),
            "rows": [r.as_json() for r in self.rows],
            "versions": {s: {"recorded": a, "replayed": b} for s, (a, b) in self.versions.items()},
            "red_lines": [vars(r) | {"composition": list(r.composition)} for r in self.red_lines],
            "notes": self.notes,
        }


def replay_run(run_dir: Path, policy: Policy, build: StackFactory) -> ReplayReport:
    """Judge ``run_dir``'s kept candidates again under ``policy`` (nothing in the run changes)."""
    recorded = read_recorded(run_dir)
    kept = sorted(recorded.kept, key=lambda k: (k.round, k.order))
    candidates = [read_candidate(run_dir / k.file, k.sha256) for k in kept]
    for k, c in zip(kept, candidates, strict=True):
        if (c.round, str(c.slot)) != (k.round, k.slot):
            raise ReplayError(
                f"{run_dir / k.file}: expected {k.slot} of round {k.round}, got {c.slot} of round {c.round}"
            )
    stack, tokenizer = build(policy, candidates[0].seed)
    pinned = read_pinned_policy(run_dir)
    report = ReplayReport(str(run_dir), recorded.run_id, f"{policy.name} v{policy.version}")
    report.notes.extend(_notes(pinned, policy, candidates[0].round))
    clock = [candidates[0].time]
    with tempfile.TemporaryDirectory(prefix="layerfed-replay-") as tmp:
        state = ServerState(Path(tmp), policy, recorded.run_id, clock=lambda: clock[0])
        probes = ProbeRunner(policy, stack, tokenizer)
        versions = _seed(state, stack, recorded, candidates[0].round, run_dir)
        with AuditLog(Path(tmp) / "audit.jsonl") as audit:
            ctx = None
            for c in candidates:
                clock[0] = c.time
                ctx = RoundContext(
                    policy,
                    recorded.run_id,
                    c.round,
                    state,
                    stack,
                    tokenizer,
                    audit,
                    {},
                    {},
                    probes,
                    profiles=c.profiles,
                )
                replayed = _judge_one(ctx, c, versions)
                report.rows.append(
                    ReplayRow(
                        c.round, str(c.slot), recorded.outcome(c.round, str(c.slot)), replayed
                    )
                )
            last = max(c.round for c in candidates)
            for slot in sorted({str(c.slot) for c in candidates}):
                report.versions[slot] = (
                    recorded.version_before(slot, last + 1),
                    versions.get(slot, 0),
                )
            if ctx is not None:
                run_state = ServerState(
                    run_dir, pinned or policy, recorded.run_id, clock=lambda: clock[0]
                )
                run_state.load()
                report.red_lines.extend(_red_lines(ctx, run_state, candidates, last))
    return report


def model_stack(
    policy: Policy, seed: int, *, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE
) -> tuple[LayerStack, Any]:
    """The server's stack for ``policy``: its base model, scopes checked, A frozen from ``seed``.

    ``device`` and ``dtype`` place the base as the server's run config does
    (:mod:`layerfed.layers.device`; slots stay float32); a ``bfloat16``/``float16`` base's
    probe margins are re-scored in float32 near thresholds as the live gate does.
    """
    model, tokenizer = load_base(
        policy.base_model, root=policy.source_dir, device=device, dtype=dtype
    )
    check_scopes(policy, model)
    return LayerStack(policy, model, tokenizer, root_seed=seed), tokenizer


def _judge_one(ctx: RoundContext, c: KeptCandidate, versions: dict[str, int]) -> Outcome:
    """The real step, judge and commit stages on one kept mean; the outcome their events say."""
    slot = c.slot
    if slot.layer not in {layer.name for layer in ctx.policy.layers}:
        return Outcome("skipped", (f"layer {slot.layer!r} is not in the policy",))
    committed = CommittedArrays(ctx.state, ctx.stack, ctx.round)
    current = committed(slot)
    step = take_step(StepInput(slot, c.mean, current, ctx.policy.layer(slot.layer).server_lr))
    try:
        verdict = judge(
            ctx,
            JudgeInput(
                slot, step.step, current, step.candidate, c.approvals, committed, step.error
            ),
        )
    except ArrayError as e:
        return Outcome("error", (str(e),))
    events = [(e.kind.value, e.as_fields()) for e in verdict.events]
    if verdict.commit and verdict.candidate is not None:
        commit(ctx, CommitInput(slot, verdict.candidate, verdict.step, ()))
        versions[str(slot)] = versions.get(str(slot), 0) + 1
        events.append(("commit", {"version": versions[str(slot)]}))
    return outcome_of(events)


def _seed(
    state: ServerState, stack: LayerStack, recorded: RecordedRun, first: int, run_dir: Path
) -> dict[str, int]:
    """Start the scratch state where the run stood before the first kept round (older rounds pruned)."""
    versions: dict[str, int] = {}
    run_state = ServerState(run_dir, state.policy, recorded.run_id)
    for slot_name, commits in sorted(recorded.commits.items()):
        before = [(r, v) for r, v in commits if r < first]
        if not before:
            continue
        round_, version = before[-1]
        slot = SlotId.parse(slot_name)
        arrays = run_state.store.load(slot, version)
        state.commit(slot, arrays, stack.spec(slot), round_)
        versions[slot_name] = version
    return versions


def _red_lines(
    ctx: RoundContext, run_state: ServerState, candidates: Sequence[KeptCandidate], round_: int
) -> list[RedLineRate]:
    """Each gating red-line suite on each composition the kept slots reach, run vs replay."""
    probes = gated_probes(ctx.policy)
    if not probes:
        return []
    profiles: set[Profile] = set().union(*(c.profiles for c in candidates))
    compositions: dict[tuple[SlotId, ...], list[SlotId]] = {}
    for slot in sorted(
        {c.slot for c in candidates if c.slot.layer in {la.name for la in ctx.policy.layers}},
        key=str,
    ):
        for names in affected_compositions(ctx, slot, profiles):
            compositions.setdefault(tuple(names), names)
    suites = [p.suite for p in probes]
    groups = list(compositions.values())

    def arrays(state: ServerState, names: list[SlotId]) -> dict[SlotId, Any]:
        return {s: state.current(s, ctx.stack.spec(s), round_) for s in names}

    replayed = ctx.probes.measure_many(suites, [arrays(ctx.state, g) for g in groups])
    recorded = ctx.probes.measure_many(suites, [arrays(run_state, g) for g in groups])
    return [
        RedLineRate(
            tuple(str(s) for s in g), p.suite, rec[p.suite], rep[p.suite], p.max_violation_rate
        )
        for g, rec, rep in zip(groups, recorded, replayed, strict=True)
        for p in probes
    ]


def _notes(pinned: Policy | None, policy: Policy, first: int) -> list[str]:
    """What replay does not replay, where the new policy changes it; pruned rounds."""
    notes = []
    if first > 1:
        notes.append(
            f"rounds before {first} were not kept: replay starts from the run's state after round {first - 1}"
        )
    if pinned is None:
        return notes
    old = {layer.name: layer for layer in pinned.layers}
    for layer in policy.layers:
        before = old.get(layer.name)
        if before is None:
            continue
        for name in _NOT_REPLAYED:
            if getattr(before, name) != getattr(layer, name):
                notes.append(
                    f"layer {layer.name}: {name} changed; not replayed (a reply-level rule: "
                    "replay judges the means the run aggregated)"
                )
    return notes
