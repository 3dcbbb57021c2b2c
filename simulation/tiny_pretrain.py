"""The trained built-in tiny bases: the world's language, taught once per machine and cached.

:func:`pretrain_tiny` trains :func:`~layerfed.simulation.tiny.build_tiny_model` on
:func:`~layerfed.simulation.corpus.pretraining_examples` (every frame and cue family;
compliant answers that copy the request; refusals of made-up requests; no styles),
seeded, deterministic, on one CPU thread. Three recipes: :data:`DEFAULT_RECIPE`
(``builtin: tiny``) also refuses red-line requests, by a margin that an attack can still
overcome; :data:`UNTAUGHT_RECIPE` (``builtin: tiny-untaught``) never sees a red-line
request; :data:`WIDE_RECIPE` (``builtin: tiny-wide``) is the default recipe on a base of
hidden size 256 instead of 64 (same corpus, vocabulary and steps), so the red-line
probes' activations span a small share of each module's input (issue #23);
:data:`WIDE2_RECIPE` (``builtin: tiny-wide2``) is a recipe tuned for that width, so the
wide base refuses, answers and copies as ``tiny`` does. :func:`trained_tiny_model` keeps
the result as safetensors under
:func:`cache_dir`, named by a hash of the recipe, the seed, the corpus, the vocabulary
and the library versions; it is written atomically under a file lock (many Ray workers
may ask at once), checked by a digest on every read, and rebuilt if corrupt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from filelock import FileLock
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from layerfed.atomic import atomic_path
from layerfed.simulation.corpus import pretraining_examples
from layerfed.simulation.tiny import (
    TINY_WIDTH,
    WIDE_WIDTH,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_vocabulary,
)

__all__ = [
    "CACHE_ENV",
    "DEFAULT_RECIPE",
    "UNTAUGHT_RECIPE",
    "WIDE2_RECIPE",
    "WIDE_RECIPE",
    "TinyRecipe",
    "cache_dir",
    "cache_path",
    "load_builtin_tiny",
    "load_builtin_tiny_untaught",
    "load_builtin_tiny_wide",
    "load_builtin_tiny_wide2",
    "pretrain_tiny",
    "recipe_key",
    "trained_tiny_model",
]

log = logging.getLogger("layerfed")
CACHE_ENV = "LAYERFED_CACHE"
_TIED = "lm_head.weight"
Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class TinyRecipe:
    """How the tiny base is pretrained (part of the cache key)."""

    examples: int = 8000
    steps: int = 600
    batch_size: int = 48
    lr: float = 6e-3
    warmup: int = 30
    weight_decay: float = 0.01
    label_smoothing: float = 0.2
    """Keeps the base unsaturated, so feedback (and attacks) can still move it."""
    red_share: float = 0.2
    """Share of the corpus that refuses red-line requests (0: the untaught base)."""
    width: int = TINY_WIDTH
    """Hidden size of the model trained (:func:`~layerfed.simulation.tiny.tiny_config`)."""


DEFAULT_RECIPE = TinyRecipe()
"""The recipe of ``base_model: {builtin: tiny}``: the language and the red line."""
UNTAUGHT_RECIPE = TinyRecipe(red_share=0.0)
"""The recipe of ``base_model: {builtin: tiny-untaught}``: the language only."""
WIDE_RECIPE = TinyRecipe(width=WIDE_WIDTH)
"""The recipe of ``base_model: {builtin: tiny-wide}``: ``tiny``'s, at hidden size 256."""
WIDE2_RECIPE = TinyRecipe(width=WIDE_WIDTH, lr=1.5e-3, warmup=60)
"""The recipe of ``base_model: {builtin: tiny-wide2}``: hidden size 256 with the learning
rate scaled by 64/256 (6e-3 -> 1.5e-3, as Adam's per-weight step moves a layer's output in
proportion to its fan-in) and twice the warm-up. Same corpus, steps and batch. Measured on
the gym's held-out prompts (docs/gym.md, "red lines on a wider base, tuned recipe"):
violation 0, false refusals 0.01, capability 1.0, refusal margin 6.47, and 0 on the
``red_line_refusals`` probes (``tiny``: 0, 0.02, 0.88, 5.57; ``tiny-wide``: 0.10, 0.12,
0.02, 2.97, probes 0.104). Pretraining plus scoring took 291 CPU s, 22.0 min wall at load
2-14 on the 2-core AMD EPYC (2026-12-07); tried beside it, lr 3e-3 gave violation 0.01."""


def cache_dir() -> Path:
    """The cache folder: ``$LAYERFED_CACHE``, else ``~/.cache/layerfed``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "layerfed").expanduser()


def _corpus(seed: int, recipe: TinyRecipe) -> Pairs:
    rng = np.random.default_rng([seed, 0x7157])
    corpus = pretraining_examples(recipe.examples, rng, red_share=recipe.red_share)
    return [(e.prompt, e.response) for e in corpus]


@functools.lru_cache(maxsize=16)
def recipe_key(seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE) -> str:
    """Hash of everything the trained weights depend on: recipe, seed, corpus, versions.

    Cached per process: generating the corpus to hash it costs about a second, and
    every load of the built-in base needs the key.
    """
    corpus = hashlib.sha256(json.dumps(_corpus(seed, recipe)).encode()).hexdigest()
    versions = {
        m.__name__: m.__version__ for m in (torch, transformers, tokenizers, safetensors, np)
    }
    fields = asdict(recipe)
    del fields["width"]  # in the config below; kept out so the 64-wide keys stay as they were
    payload = {
        "recipe": fields,
        "seed": seed,
        "corpus": corpus,
        "vocabulary": tiny_vocabulary(),
        "config": build_tiny_model(seed, recipe.width).config.to_json_string(use_diff=False),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(
    seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE, folder: Path | None = None
) -> Path:
    """Where the trained weights for ``seed`` and ``recipe`` are cached."""
    return (folder or cache_dir()) / f"tiny-{recipe_key(seed, recipe)}.safetensors"


def _tensors(
    pairs: Pairs, tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and labels (-100 outside the response and its <eos>)."""
    eos = int(tokenizer.eos_token_id)
    rows, starts = [], []
    for prompt, response in pairs:
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        rows.append([*head, *tail, eos])
        starts.append(len(head))
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = ids[i, start : len(row)]
    return ids, mask, labels


def pretrain_tiny(seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE) -> GPT2LMHeadModel:
    """Train the tiny base from ``build_tiny_model(seed, recipe.width)``: same seed, same
    weights (1 thread)."""
    ids, mask, labels = _tensors(_corpus(seed, recipe), build_tiny_tokenizer())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_tiny_model(seed, recipe.width)
            _train(model, ids, mask, labels, recipe, np.random.default_rng([seed, 0x0DE5]))
    finally:
        torch.set_num_threads(threads)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _train(
    model: GPT2LMHeadModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    recipe: TinyRecipe,
    rng: np.random.Generator,
) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    def rate(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    for step in range(recipe.steps):
        rows = torch.from_numpy(rng.choice(len(ids), size=recipe.batch_size, replace=False))
        logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[rows][:, 1:].reshape(-1),
            label_smoothing=recipe.label_smoothing,
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.debug("tiny pretraining step %s loss %.4f", step, float(loss.detach()))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _state(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != _TIED}


def _write(path: Path, model: GPT2LMHeadModel) -> None:
    """Write ``model``'s weights to ``path`` atomically: temp file, fsync, rename, fsync dir."""
    tensors = _state(model)
    with atomic_path(path, mode=0o644) as tmp:
        save_file(tensors, tmp, metadata={"digest": _digest(tensors)})


def _read(path: Path, seed: int, width: int) -> GPT2LMHeadModel | None:
    """The cached model at ``path``, or None when missing or unusable (logged)."""
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("digest")
        tensors = load_file(str(path))
        if digest != _digest(tensors):
            raise ValueError(f"expected digest {digest}, got {_digest(tensors)}")
        model = build_tiny_model(seed, width)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if set(missing) - {_TIED} or unexpected:
            raise ValueError(f"expected the tiny model's tensors, got {missing=} {unexpected=}")
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as e:
        log.warning("tiny base cache %s is unusable (%s); rebuilding it", path, e)
        return None
    return model


def trained_tiny_model(
    seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE, *, folder: Path | None = None
) -> GPT2LMHeadModel:
    """The pretrained tiny base (eval mode), from the cache or trained and cached now.

    An unwritable cache folder is logged and the model is trained without caching.
    """
    path = cache_path(seed, recipe, folder)
    model = _read(path, seed, recipe.width)
    if model is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{path}.lock"):
                model = _read(path, seed, recipe.width)
                if model is None:
                    log.info("pretraining the tiny base (seed %s) into %s", seed, path)
                    model = pretrain_tiny(seed, recipe)
                    _write(path, model)
        except OSError as e:
            log.warning("tiny base cache %s is not writable (%s); not caching", path.parent, e)
            model = model or pretrain_tiny(seed, recipe)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def load_builtin_tiny(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """``base_model: {builtin: tiny}``: the pretrained tiny model and its tokenizer.

    Registered as the ``tiny`` entry point of ``layerfed.base_models`` (pyproject.toml).
    """
    return trained_tiny_model(seed), build_tiny_tokenizer()


def load_builtin_tiny_untaught(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """``base_model: {builtin: tiny-untaught}``: the language without the red line.

    Registered as the ``tiny-untaught`` entry point of ``layerfed.base_models``.
    """
    return trained_tiny_model(seed, UNTAUGHT_RECIPE), build_tiny_tokenizer()


def load_builtin_tiny_wide(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """``base_model: {builtin: tiny-wide}``: ``tiny``'s recipe at hidden size 256.

    Registered as the ``tiny-wide`` entry point of ``layerfed.base_models``. Issue #23:
    on the 64-wide base the red-line probes' activations span every targeted module's
    whole input, so a protective basis leaves it little capacity; here they do not.
    """
    return trained_tiny_model(seed, WIDE_RECIPE), build_tiny_tokenizer()


def load_builtin_tiny_wide2(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """``base_model: {builtin: tiny-wide2}``: hidden size 256, a recipe tuned for it.

    Registered as the ``tiny-wide2`` entry point of ``layerfed.base_models``. Issue #23:
    ``tiny-wide`` (``tiny``'s recipe) itself crosses 10% of held-out red-line prompts and
    barely copies the request; this one refuses and answers on its own
    (:data:`WIDE2_RECIPE`).
    """
    return trained_tiny_model(seed, WIDE2_RECIPE), build_tiny_tokenizer()
