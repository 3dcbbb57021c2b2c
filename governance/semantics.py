"""Cross-field rules of a policy, each with its own located, explained issue."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from layerfed.governance.issues import Issue
from layerfed.governance.patterns import glob_covers, globs_overlap, in_scope, matches
from layerfed.governance.privacy_checks import privacy_rule
from layerfed.governance.probe_files import builtin_suite_names, check_probe_file, suite_file
from layerfed.governance.schema import (
    LayerPolicy,
    NormCondition,
    Policy,
    ProbeRegressionCondition,
    QuorumCondition,
    text_words,
)
from layerfed.governance.schema_roles import role_rule
from layerfed.governance.sources import Path_

__all__ = ["RULES", "Issue", "semantic_issues"]


@dataclass(frozen=True)
class _Ctx:
    policy: Policy
    now: datetime
    model_params: list[str] | None


Rule = Callable[[_Ctx], Iterator[Issue]]


def semantic_issues(
    policy: Policy, *, now: datetime | None = None, model_params: list[str] | None = None
) -> list[Issue]:
    """Every semantic issue of ``policy``; ``now`` defaults to the current UTC time."""
    ctx = _Ctx(policy, now or datetime.now(UTC), model_params)
    return [issue for rule in RULES for issue in rule(ctx)]


def _unique_layers(ctx: _Ctx) -> Iterator[Issue]:
    names: dict[str, int] = {}
    ranks: dict[int, int] = {}
    for i, layer in enumerate(ctx.policy.layers):
        if layer.name in names:
            msg = f"expected a unique layer name, got '{layer.name}' again (first at layers[{names[layer.name]}])"
            yield Issue(("layers", i, "name"), msg)
        names.setdefault(layer.name, i)
        if layer.rank in ranks:
            first = ctx.policy.layers[ranks[layer.rank]].name
            msg = f"expected a unique rank, got {layer.rank}, already held by '{first}'"
            yield Issue(("layers", i, "rank"), msg)
        ranks.setdefault(layer.rank, i)


def _memories(ctx: _Ctx) -> Iterator[Issue]:
    for i, layer in enumerate(ctx.policy.layers):
        seen: set[str] = set()
        for m, memory in enumerate(layer.memories):
            path: Path_ = ("layers", i, "memories", m)
            if memory.name in seen:
                yield Issue(
                    (*path, "name"), f"expected a unique memory name, got '{memory.name}' again"
                )
            seen.add(memory.name)
            seconds = memory.half_life_seconds
            if seconds is not None and seconds <= 0:
                yield Issue(
                    (*path, "half_life"), f"expected a duration > 0, got '{memory.half_life}'"
                )
            rounds = memory.half_life_rounds
            if rounds is not None and rounds < 0.5:
                yield Issue((*path, "half_life"), f"expected at least 0.5 rounds, got {rounds}")
            rate = layer.local.lr * memory.lr_multiplier
            if rate > 1:
                msg = f"expected local.lr x lr_multiplier <= 1, got {layer.local.lr} x {memory.lr_multiplier}"
                yield Issue((*path, "lr_multiplier"), msg)


def _aggregators(ctx: _Ctx) -> Iterator[Issue]:
    for i, layer in enumerate(ctx.policy.layers):
        agg, path = layer.aggregator, ("layers", i, "aggregator")
        if agg.trim_fraction is not None and agg.kind != "trimmed_mean":
            yield Issue(
                (*path, "trim_fraction"), f"expected no trim_fraction for {agg.kind}, got one"
            )
        if agg.byzantine is not None and agg.kind != "krum":
            yield Issue((*path, "byzantine"), f"expected no byzantine for {agg.kind}, got one")
        if agg.kind == "krum":
            need = 2 * (agg.byzantine or 0) + 3
            if layer.min_clients < need:
                msg = f"expected min_clients >= {need} for krum with byzantine={agg.byzantine or 0}, got {layer.min_clients}"
                yield Issue(("layers", i, "min_clients"), msg)


def _layer_ref(ctx: _Ctx, name: str) -> LayerPolicy | None:
    return next((layer for layer in ctx.policy.layers if layer.name == name), None)


def _known(names: list[str]) -> str:
    return (
        "one of " + ", ".join(f"'{n}'" for n in names) if names else "a defined name (none exist)"
    )


def _vetoes(ctx: _Ctx) -> Iterator[Issue]:
    layer_names = [layer.name for layer in ctx.policy.layers]
    suites = [s.name for s in ctx.policy.probe_suites]
    for i, veto in enumerate(ctx.policy.vetoes):
        path: Path_ = ("vetoes", i)
        holder = _layer_ref(ctx, veto.holder)
        if holder is None:
            yield Issue((*path, "holder"), f"expected {_known(layer_names)}, got '{veto.holder}'")
        for k, target_name in enumerate(veto.applies_to):
            target = _layer_ref(ctx, target_name)
            if target is None:
                msg = f"expected {_known(layer_names)}, got '{target_name}'"
                yield Issue((*path, "applies_to", k), msg)
            elif holder is not None and holder.rank <= target.rank:
                msg = (
                    f"expected a layer ranked below holder '{holder.name}' (rank {holder.rank}), "
                    f"got '{target.name}' (rank {target.rank})"
                )
                yield Issue((*path, "applies_to", k), msg)
        cond = veto.condition
        if isinstance(cond, ProbeRegressionCondition) and cond.suite not in suites:
            yield Issue(
                (*path, "condition", "suite"), f"expected {_known(suites)}, got '{cond.suite}'"
            )
        if isinstance(cond, QuorumCondition) and holder is not None:
            have = sum(1 for p in ctx.policy.principals if p.layer == holder.name)
            if have < cond.min_signatures:
                msg = f"expected at most {have} (principals of '{holder.name}'), got {cond.min_signatures}"
                yield Issue((*path, "condition", "min_signatures"), msg)
        if veto.action == "clip" and not isinstance(cond, NormCondition):
            msg = f"expected reject or hold for a {cond.kind} condition (clip needs a norm), got 'clip'"
            yield Issue((*path, "action"), msg)


def _red_line_scopes(ctx: _Ctx) -> Iterator[Issue]:
    red = ctx.policy.red_lines.parameters
    for i, layer in enumerate(ctx.policy.layers):
        scope = layer.scope
        for m, pattern in enumerate(scope.include):
            path: Path_ = ("layers", i, "scope", "include", m)
            for k, line in enumerate(red):
                if ctx.model_params is not None:
                    hit = next(
                        (
                            p
                            for p in ctx.model_params
                            if matches(p, pattern) and in_scope(p, [line], scope.exclude)
                        ),
                        None,
                    )
                    overlap = hit is not None
                else:
                    covered = any(glob_covers(exc, line) for exc in scope.exclude)
                    overlap = globs_overlap(pattern, line) and not covered
                if overlap:
                    msg = (
                        f"expected a scope that leaves red line '{line}' (red_lines.parameters[{k}]) "
                        f"out, got '{pattern}' overlapping it (add it to scope.exclude or narrow the pattern)"
                    )
                    yield Issue(path, msg)


def _probe_refs(ctx: _Ctx) -> Iterator[Issue]:
    suites = [s.name for s in ctx.policy.probe_suites]
    seen: set[str] = set()
    for i, suite in enumerate(ctx.policy.probe_suites):
        if suite.name in seen:
            yield Issue(
                ("probe_suites", i, "name"),
                f"expected a unique suite name, got '{suite.name}' again",
            )
        seen.add(suite.name)
    for k, probe in enumerate(ctx.policy.red_lines.probes):
        if probe.suite not in suites:
            msg = f"expected {_known(suites)}, got '{probe.suite}'"
            yield Issue(("red_lines", "probes", k, "suite"), msg)
    for k, name in enumerate(ctx.policy.superego.suites):
        if name not in suites:
            yield Issue(("superego", "suites", k), f"expected {_known(suites)}, got '{name}'")


def _principals(ctx: _Ctx) -> Iterator[Issue]:
    layer_names = [layer.name for layer in ctx.policy.layers]
    seen: dict[str, int] = {}
    keys: dict[str, str] = {}
    for i, principal in enumerate(ctx.policy.principals):
        path: Path_ = ("principals", i)
        if principal.name in seen:
            yield Issue(
                (*path, "name"), f"expected a unique principal name, got '{principal.name}' again"
            )
        seen.setdefault(principal.name, i)
        if principal.layer not in layer_names:
            yield Issue(
                (*path, "layer"), f"expected {_known(layer_names)}, got '{principal.layer}'"
            )
        if principal.public_key in keys:
            msg = f"expected a key of its own, got the key of '{keys[principal.public_key]}'"
            yield Issue((*path, "public_key"), msg)
        keys.setdefault(principal.public_key, principal.name)


def _signers(ctx: _Ctx) -> Iterator[Issue]:
    signers = ctx.policy.policy_signers
    if signers is None:
        return
    top = ctx.policy.layers_by_rank()[0].name
    by_name = {p.name: p for p in ctx.policy.principals}
    for k, name in enumerate(signers.principals):
        principal = by_name.get(name)
        path: Path_ = ("policy_signers", "principals", k)
        if principal is None:
            yield Issue(path, f"expected {_known(sorted(by_name))}, got '{name}'")
        elif principal.layer != top:
            msg = f"expected a principal of the top layer '{top}', got '{name}' of '{principal.layer}'"
            yield Issue(path, msg)
    if signers.threshold > len(set(signers.principals)):
        msg = f"expected at most {len(set(signers.principals))} (distinct signers), got {signers.threshold}"
        yield Issue(("policy_signers", "threshold"), msg)


def _expiry(ctx: _Ctx) -> Iterator[Issue]:
    if ctx.policy.expires <= ctx.now:
        msg = f"expected a time after now ({ctx.now.isoformat()}), got {ctx.policy.expires.isoformat()}"
        yield Issue(("expires",), msg)


def _model_match(ctx: _Ctx) -> Iterator[Issue]:
    params = ctx.model_params
    if params is None:
        path = ctx.policy.base_model.path
        folder = Path(path).expanduser() if path is not None else None
        if folder is not None and not folder.is_absolute() and ctx.policy.source_dir is not None:
            folder = ctx.policy.source_dir / folder
        if folder is not None and not folder.exists():
            msg = f"expected an existing local model folder, got '{path}' (looked for {folder})"
            yield Issue(("base_model", "path"), msg, "warning")
        return
    for i, layer in enumerate(ctx.policy.layers):
        scope = layer.scope
        if not any(in_scope(p, scope.include, scope.exclude) for p in params):
            msg = (
                f"layer '{layer.name}': expected a scope matching some model parameter, got "
                f"include {list(scope.include)} minus exclude {list(scope.exclude)} matching none "
                "(the server refuses to start)"
            )
            yield Issue(("layers", i, "scope"), msg)
        for m, pattern in enumerate(layer.scope.include):
            if not any(matches(p, pattern) for p in params):
                msg = f"expected a pattern matching some model parameter, got '{pattern}' matching none"
                yield Issue(("layers", i, "scope", "include", m), msg, "warning")
    for k, pattern in enumerate(ctx.policy.red_lines.parameters):
        if not any(matches(p, pattern) for p in params):
            msg = f"expected a pattern matching some model parameter, got '{pattern}' matching none"
            yield Issue(("red_lines", "parameters", k), msg, "warning")


def _probe_sources(ctx: _Ctx) -> Iterator[Issue]:
    names: list[str] | None = None
    for i, suite in enumerate(ctx.policy.probe_suites):
        path: Path_ = ("probe_suites", i)
        if suite.builtin is not None:
            names = builtin_suite_names() if names is None else names
            if suite.builtin not in names:
                known = ", ".join(f"'builtin:{n}'" for n in names) or "none installed"
                msg = f"expected a built-in suite ({known}) or a JSONL file path, got '{suite.source}'"
                yield Issue((*path, "source"), msg)
            continue
        for field in ("refusal", "compliance"):
            if getattr(suite, field) is None:
                msg = f"expected field '{field}' (the {field} continuation; required for a JSONL suite), got nothing"
                yield Issue((*path, field), msg)
        file = suite_file(suite, ctx.policy.source_dir)
        if not file.is_file():
            msg = f"expected an existing JSONL file, got '{suite.source}' (looked for {file})"
            yield Issue((*path, "source"), msg)
            continue
        for error in check_probe_file(file)[1]:
            yield Issue((*path, "source"), str(error))
    for i, suite in enumerate(ctx.policy.probe_suites):
        if suite.refusal is not None and suite.refusal == suite.compliance:
            msg = f"expected a compliance continuation unlike the refusal, got '{suite.compliance}' for both"
            yield Issue(("probe_suites", i, "compliance"), msg)


def _guard_and_judge(ctx: _Ctx) -> Iterator[Issue]:
    red = ctx.policy.red_lines
    if red.output_guard and not red.guard_words:
        msg = "expected red_lines.guard_words to list the words the output guard blocks, got none"
        yield Issue(("red_lines", "output_guard"), msg)
    banned = {w.lower() for w in red.guard_words}
    hit = next((w for w in text_words(red.refusal_text) if w in banned), None)
    if red.output_guard and hit is not None:
        msg = f"expected a refusal without guard words, got '{red.refusal_text}' holding '{hit}'"
        yield Issue(("red_lines", "refusal_text"), msg)
    ego = ctx.policy.superego
    if ego.enabled and ego.teacher == "rule_judge" and not ego.judge_words:
        msg = "expected superego.judge_words (prompts holding one must be refused) for a rule_judge, got none"
        yield Issue(("superego", "teacher"), msg)


def _protection(ctx: _Ctx) -> Iterator[Issue]:
    for k, probe in enumerate(ctx.policy.red_lines.probes):
        if probe.protect == "projection" and probe.basis != "exact":
            msg = (
                "expected 'both' (or an exact basis) with a truncated projection basis, got "
                "protect 'projection': the projection only bounds the change on this suite, so "
                "the gate scores it anyway, as with 'both'"
            )
            yield Issue(("red_lines", "probes", k, "protect"), msg, "warning")


def _roles(ctx: _Ctx) -> Iterator[Issue]:
    return role_rule(ctx.policy)


RULES: tuple[Rule, ...] = (
    _unique_layers,
    _memories,
    _aggregators,
    _vetoes,
    _red_line_scopes,
    _probe_refs,
    _principals,
    _signers,
    _expiry,
    _model_match,
    _probe_sources,
    _guard_and_judge,
    _protection,
    privacy_rule,
    _roles,
)
"""Every semantic rule, in the order their issues are reported."""
