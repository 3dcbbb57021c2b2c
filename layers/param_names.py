"""A model's parameter names, shapes and ties read without torch: what policy checks need.

``policy check`` and ``policy diff`` match scope and red-line patterns against
parameter names; they never need the weights. Reading them this way takes well
under a second where building the model, even on the meta device, first imports
torch and transformers (6-20 s):

- a local Hugging Face folder: the safetensors headers (``model.safetensors``, or
  every shard ``model.safetensors.index.json`` names) give each stored tensor's
  name and shape (the JSON header only; no weight is read). A checkpoint stores a
  tied pair once; ``config.json``'s ``tie_word_embeddings`` restores the dropped
  output embedding (``lm_head.weight``) and the tie. A folder without safetensors
  falls back to :func:`~layerfed.layers.params.read_model_params` (meta device).
- a built-in (``builtin:NAME``): its names are read once through its loader and
  kept in ``$LAYERFED_CACHE/params/`` (default ``~/.cache/layerfed``) under a key of
  the entry point, the providing package's version and the torch and transformers
  versions; every later read is a JSON file.

LoRA targets (``ModelParams.lora``) need module types: this reader leaves them empty;
``layerfed model params`` reads the model for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

from layerfed.governance.model_params import ModelParams
from layerfed.layers.errors import BaseModelError

__all__ = ["CACHE_ENV", "builtin_param_names", "folder_param_names", "read_param_names"]

log = logging.getLogger("layerfed")
CACHE_ENV = "LAYERFED_CACHE"
_BUILTIN = "builtin:"
_OUTPUT = "lm_head.weight"
_INPUT_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_HEADER_MAX = 100_000_000


def read_param_names(model: str, *, root: Path | None = None) -> ModelParams:
    """Names, shapes and ties of ``'builtin:NAME'`` or a local folder (relative to ``root``)."""
    if model.startswith(_BUILTIN) or model == "tiny":
        return builtin_param_names(model.removeprefix(_BUILTIN))
    folder = Path(model).expanduser()
    if not folder.is_absolute() and root is not None:
        folder = root / folder
    if not (folder / "config.json").is_file():
        raise BaseModelError(
            "model: expected 'builtin:NAME' or a Hugging Face folder with config.json, "
            f"got {model!r} (looked for {folder / 'config.json'})"
        )
    found = folder_param_names(folder, label=model)
    if found is not None:
        return found
    log.info("%s holds no safetensors; building it on the meta device", folder)
    from layerfed.layers.params import read_model_params

    return read_model_params(str(folder))


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's JSON header (no tensor data read)."""
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise BaseModelError(f"{file}: expected a safetensors file, got {len(prefix)} byte(s)")
        (size,) = struct.unpack("<Q", prefix)
        if size > _HEADER_MAX:
            raise BaseModelError(f"{file}: expected a safetensors header, got {size} bytes")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise BaseModelError(f"{file}: expected a JSON safetensors header, got: {e}") from e
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _shards(folder: Path) -> list[Path] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def folder_param_names(folder: Path, *, label: str | None = None) -> ModelParams | None:
    """A folder's :class:`ModelParams` from its safetensors headers; None without safetensors."""
    shards = _shards(folder)
    if shards is None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(_header(shard))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ties: tuple[tuple[str, ...], ...] = ()
    if config.get("tie_word_embeddings", True):
        embedding = next(
            (n for n in sorted(shapes) if n.endswith(_INPUT_SUFFIXES) and len(shapes[n]) == 2),
            None,
        )
        if (
            embedding is not None
            and shapes.setdefault(_OUTPUT, shapes[embedding]) == (shapes[embedding])
        ):
            ties = (tuple(sorted((embedding, _OUTPUT))),)
    return ModelParams(model=label or str(folder), shapes=shapes, ties=ties)


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "layerfed").expanduser()


def _builtin_key(name: str) -> str:
    found = [ep for ep in entry_points(group="layerfed.base_models") if ep.name == name]
    if not found:
        from layerfed.layers.builtins import builtin_loader

        builtin_loader(name)  # raises, naming the registered choices
    ep = found[0]
    parts = [name, ep.value, ep.dist.version if ep.dist is not None else "?"]
    for dist in ("torch", "transformers"):
        try:
            parts.append(version(dist))
        except PackageNotFoundError:
            parts.append("-")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def builtin_param_names(name: str) -> ModelParams:
    """A built-in's names, shapes and ties: from the cache, else read once and cached."""
    file = _cache_dir() / "params" / f"{name}-{_builtin_key(name)}.json"
    label = f"{_BUILTIN}{name}"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return ModelParams(
            model=label,
            shapes={k: tuple(v) for k, v in data["shapes"].items()},
            ties=tuple(tuple(g) for g in data["ties"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from layerfed.layers.params import read_model_params

    log.info("reading built-in %s once for its parameter names (cached in %s)", name, file)
    params = read_model_params(label)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"shapes": params.shapes, "ties": params.ties}, f)
        os.replace(tmp, file)
    except OSError as e:
        log.warning("could not cache the parameter names of %s in %s: %s", label, file, e)
    return ModelParams(model=label, shapes=params.shapes, ties=params.ties)
