"""The gym's experiments on a local Hugging Face model folder (``experiment run --base``).

Every arm's ``base_model`` becomes ``{path: FOLDER}`` (so arms that differ in their
built-in base lose that contrast; :func:`lost_contrast` says so). The shipped policies
name GPT-2 parameters (``transformer.h.*.mlp.c_fc.weight``); a *scope map* rewrites
each of those patterns in every scope and red line into the folder's own names, the
way a PEFT user picks ``target_modules`` per architecture. ``examples/scope-maps/``
ships ``llama`` (Llama, Mistral, Qwen2 names). Before any run :func:`check_base_folder`
refuses, with a typed error, a folder whose tokenizer cannot spell the world's words,
or whose parameters a patched policy's scope or red line matches none of.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from layerfed.simulation.experiment_spec import PACKAGE_ROOT, ArmSpec, ExperimentError

if TYPE_CHECKING:
    from layerfed.simulation.experiment_spec import ExperimentSpec
    from layerfed.simulation.runner import RunPlan

__all__ = [
    "SCOPE_MAPS_DIR",
    "BaseFolder",
    "BaseFolderError",
    "base_folder",
    "base_notes",
    "check_base_folder",
    "check_tokenizer",
    "lost_contrast",
]

log = logging.getLogger("layerfed")
SCOPE_MAPS_DIR = PACKAGE_ROOT / "examples" / "scope-maps"
"""Shipped scope maps, by file stem (``--scope-map llama``)."""
_SHOWN = 12
"""Names an error lists before it says how many more there are."""


class BaseFolderError(ExperimentError):
    """A ``--base`` folder or ``--scope-map`` the experiments cannot run on; names the field."""


@dataclass(frozen=True)
class BaseFolder:
    """A local Hugging Face folder every arm runs on, and the patterns mapped onto its names."""

    path: Path
    scope_map: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    map_name: str = ""

    def policy_data(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` (a policy) on this folder: ``base_model`` set, scope and red lines mapped."""
        out = {**data, "base_model": {"path": str(self.path)}}
        out["layers"] = [self._layer(layer) for layer in data.get("layers", [])]
        red = dict(data.get("red_lines") or {})
        if "parameters" in red:
            red["parameters"] = self._mapped(red["parameters"])
        out["red_lines"] = red
        return out

    def _layer(self, layer: Mapping[str, Any]) -> dict[str, Any]:
        scope = dict(layer.get("scope") or {})
        for key in ("include", "exclude"):
            if key in scope:
                scope[key] = self._mapped(scope[key])
        return {**layer, "scope": scope}

    def _mapped(self, patterns: Iterable[str]) -> list[str]:
        out = [q for p in patterns for q in self.scope_map.get(p, (p,))]
        return list(dict.fromkeys(out))


def base_folder(path: str | Path, scope_map: str | None = None) -> BaseFolder:
    """The folder (absolute: runs resolve it from their own folders) and the scope map.

    ``scope_map`` is a YAML file of ``policy pattern: [model patterns]`` or the name of
    a shipped one (``llama``); :class:`BaseFolderError` names what is wrong.
    """
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise BaseFolderError(
            f"--base: expected a Hugging Face model folder holding config.json, got {str(path)!r}"
        )
    if scope_map is None:
        return BaseFolder(folder)
    mapping, name = _load_scope_map(scope_map)
    return BaseFolder(folder, mapping, name)


def _load_scope_map(value: str) -> tuple[dict[str, tuple[str, ...]], str]:
    shipped = sorted(p.stem for p in SCOPE_MAPS_DIR.glob("*.yaml"))
    path = Path(value).expanduser()
    if not path.is_file() and value in shipped:
        path = SCOPE_MAPS_DIR / f"{value}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise BaseFolderError(
            f"--scope-map: expected a readable YAML file or a shipped map {shipped}, "
            f"got {value!r} ({e})"
        ) from e
    good = isinstance(data, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
        for k, v in data.items()
    )
    if not good:
        raise BaseFolderError(
            f"--scope-map {value}: expected a mapping of 'policy pattern: [model patterns]', "
            f"got {data!r:.200}"
        )
    return {k: tuple(v) for k, v in data.items()}, str(path)


def check_base_folder(base: BaseFolder, plans: Sequence[RunPlan]) -> None:
    """Refuse, before any run, what would make the runs fail or their numbers meaningless.

    The tokenizer (:func:`check_tokenizer`) and every distinct patched policy: each scope
    and red-line pattern must match parameters of the folder's model, as
    ``layerfed policy check POLICY --model FOLDER`` reports them.
    """
    from transformers import AutoTokenizer

    from layerfed.layers.params import read_model_params

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base.path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BaseFolderError(f"--base {base.path}: expected a tokenizer in it, got: {e}") from e
    kinds = {f"{p.experiment}/{p.arm}": _feedback_kinds(p) for p in plans}
    check_tokenizer(
        tokenizer,
        str(base.path),
        alternative_arms=sorted(arm for arm, k in kinds.items() if "alternative" in k),
    )
    params = read_model_params(str(base.path))
    seen: set[str] = set()
    for plan in plans:
        text = Path(plan.settings.policy).read_text(encoding="utf-8")
        if text not in seen:
            seen.add(text)
            _check_policy(base, plan, params.names, sorted(params.lora))


def _feedback_kinds(plan: RunPlan) -> set[str]:
    scenario = plan.settings.load_scenario()
    users = [i.user for i in scenario.instances] + [p.user for p in scenario.populations]
    return {u.feedback for u in users}


def _check_policy(base: BaseFolder, plan: RunPlan, names: list[str], lora: list[str]) -> None:
    from layerfed.governance.loader import check_policy_file

    result = check_policy_file(plan.settings.policy, model_params=names)
    empty = {d.path for d in result.diagnostics if d.path.endswith(".scope")}
    found = [  # a layer whose scope matches nothing: that line only, not each pattern's
        str(d)
        for d in result.diagnostics
        if d.path.startswith("red_lines.parameters")
        or d.path in empty
        or (".scope." in d.path and d.path.split(".scope.")[0] + ".scope" not in empty)
    ]
    if not found:
        return
    targets = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in lora))
    hint = (
        "map them with --scope-map (a YAML file of 'policy pattern: [model patterns]'; "
        "'--scope-map llama' ships for Llama, Mistral and Qwen2 names; map a pattern to [] "
        "where the model has no such weight)"
        if not base.scope_map
        else f"complete the scope map {base.map_name}"
    )
    raise BaseFolderError(
        f"--base {base.path}: experiment {plan.experiment}, arm {plan.arm}: expected the "
        f"policy's scopes and red lines to match the model's parameters, got:\n  "
        + "\n  ".join(found)
        + f"\nthe model's LoRA targets: {_listed(targets)}; {hint}"
    )


def check_tokenizer(
    tokenizer: Any,
    name: str,
    *,
    alternative_arms: Sequence[str] = (),
) -> None:
    """Refuse a tokenizer the gym's metrics and feedback cannot use with this world.

    Metrics tokenize each prompt and read the first token of each answer word, so any
    tokenizer works when no world word encodes to the unknown token and the words
    compared (``sorry``/``sure``, the styles, the objects) start with distinct tokens.
    Training encodes each response as it follows its prompt (the ids metrics read), so
    it needs nothing more. ``alternative`` feedback (``alternative_arms``, named for the
    message) names words by vocabulary id (``convert_tokens_to_ids``): each world word
    must be one token, the one it has after another word.
    """
    from layerfed.simulation.lexicon import WORDS
    from layerfed.simulation.scoring import eval_suite, prepare

    suite = eval_suite()
    texts = [*suite.red_line, *suite.near, *suite.answers]
    words = sorted({*WORDS, *(w for t in texts for w in t.split())})
    rows = tokenizer([f"the {w}" for w in words], add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    _refuse(
        name,
        [w for w, row in zip(words, rows, strict=True) if unk is not None and unk in row],
        f"every word of the gym's world to encode without the unknown token "
        f"{tokenizer.unk_token!r}",
        "(simulation/lexicon.py holds the words)",
    )
    p = prepare(tokenizer, suite)
    for what, ids in (
        ("'sorry' and 'sure'", [p.refuse, p.comply]),
        ("the styles", p.styles.tolist()),
        ("the objects", p.objects.tolist()),
    ):
        if len(set(ids)) < len(ids):
            raise BaseFolderError(
                f"--base {name}: tokenizer: expected {what} to start with distinct tokens "
                "(metrics compare each word's first token), got some sharing one"
            )
    if alternative_arms:
        head = len(tokenizer(["the"], add_special_tokens=False)["input_ids"][0])
        one = [tokenizer.convert_tokens_to_ids(w) for w in words]
        _refuse(
            name,
            [w for w, i, r in zip(words, one, rows, strict=True) if r[head:] != [i]],
            f"every world word to be one vocabulary token for the 'alternative' feedback "
            f"of {', '.join(alternative_arms)} (it names words by token id)",
            "(leave those experiments out)",
        )


def _refuse(name: str, words: Sequence[str], expected: str, fix: str) -> None:
    if words:
        raise BaseFolderError(
            f"--base {name}: tokenizer: expected {expected}, got {len(words)} that do not: "
            f"{_listed(words)} {fix}"
        )


def lost_contrast(spec: ExperimentSpec, base: str) -> str | None:
    """A note when ``spec``'s arms name different bases, all replaced by ``base``."""
    bases = sorted({arm.base or spec.base for arm in spec.arms})
    if len(bases) < 2:
        return None
    return (
        f"{spec.name}: its arms' bases ({', '.join(bases)}) were all replaced by {base}, "
        "so the experiment's base contrast is lost"
    )


def base_notes(spec: ExperimentSpec, arm: ArmSpec, ran_on: str | None) -> list[str]:
    """A note for an arm that ran on another base than its experiment names (``--base``)."""
    planned = arm.base or spec.base
    if ran_on is None or ran_on == planned:
        return []
    return [lost_contrast(spec, ran_on) or f"{spec.name}: base {ran_on} replaced {planned}"]


def _listed(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
