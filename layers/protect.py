"""Red lines by construction: slot A matrices that vanish on the red-line probes' activations.

A slot trains only B; its A is frozen, drawn from the slot's seed. For a target
module with input activations ``X`` (rows: every token position of the red-line
probe sequences, computed with the frozen base) let ``P = U Uᵀ`` project onto the
span of ``X``'s top right singular vectors ``U``. A slot whose A is
``A₀ (I - P)`` changes that module's output on those inputs by
``scaling · B A₀ (I - P) x``: zero for every ``x`` in ``span(U)`` and every B.
When every targeted module's A is projected this way, induction over the blocks
keeps every activation on the probe sequences, and so the probe logits, equal to
the base's for any composition of slots: the guarantee holds for every update
ever trained, paid once per slot.

The basis rule trades exactness for capacity:

- ``exact``: the activations' whole numerical span (largest singular value times
  ``max(N, d) · ε₆₄``). On the listed sequences the change is zero up to float32
  rounding.
- ``energy`` / ``max_rank``: the fewest top directions holding that share of
  ``‖X‖²_F``, at most ``max_rank``. For each base input row ``x`` of the module,
  ``‖ΔW x‖ ≤ scaling · ‖B‖₂ ‖A₀‖₂ · sigma_{k+1}`` (a row of ``X(I-P)`` is no longer than
  its spectral norm ``sigma_{k+1}``, :attr:`ModuleBasis.residual`), and over all rows
  ``‖ΔW Xᵀ‖_F ≤ scaling · ‖B‖₂ ‖A₀‖₂ · sqrt(sum_{i>k} sigma_i²)``. This bounds each module's
  change at the base's inputs; downstream modules then see changed inputs, so the
  change of the logits is measured, not bounded.

Every SVD here runs on one BLAS thread, one at a time (:func:`_svd`). numpy's OpenBLAS
otherwise hands each of the SVD's many small BLAS calls to its own worker threads, which
wait for each other by spinning: on 2 cores shared with torch's OpenMP teams (one per
gym lane thread) and other processes, each hand-off waits for a descheduled thread, and
a build that takes about 1 s on one thread took over 10 min inside a gym lane (17 s
at load 11 in a fresh process). One thread also gives the same bits on any core count.

Bases are computed in float64 from the frozen base's float32 activations (a
bfloat16/float16 base is widened for the call, on its own device) and the suites' token rows,
cached in memory and on disk (``$LAYERFED_CACHE/protect/``) under their *recipe
digest*: the base's parameter bytes, the suites' token rows and the rule. That
digest is what slot specs, manifests and the signed checkpoint (through the
adapter files' digests) record.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from layerfed.atomic import write_atomic
from layerfed.governance.schema import Policy, ProjectionBasis, RedLineProbe
from layerfed.layers.base import base_parameters, linear_modules
from layerfed.layers.device import float32_compute, model_device
from layerfed.layers.errors import LayerError
from layerfed.layers.probes import ProbeSuiteData, _splits, load_suite

__all__ = [
    "ModuleBasis",
    "Protection",
    "ProtectionError",
    "base_digest",
    "collect_activations",
    "module_basis",
    "probe_rows",
    "projected_probes",
    "protection_for",
]

log = logging.getLogger("layerfed")

CACHE_ENV = "LAYERFED_CACHE"
_VERSION = "layerfed/protect/v1"
_MEMO: dict[str, Protection] = {}
_SVD_LOCK = threading.Lock()
"""Serialises :func:`_svd`: the BLAS thread limit is process-wide, so overlapping limits
from two threads would restore each other's settings out of order."""


class ProtectionError(LayerError):
    """A projection basis cannot be built or does not match; names what, expected and got."""


@dataclass(frozen=True, eq=False)
class ModuleBasis:
    """One module's protected directions: orthonormal columns ``vectors`` ``(in, k)``,
    the activations' singular values (descending) and the largest one left out."""

    vectors: np.ndarray
    sigma: np.ndarray
    residual: float

    @property
    def rank(self) -> int:
        """Directions kept."""
        return int(self.vectors.shape[1])


@dataclass(frozen=True, eq=False)
class Protection:
    """The projection bases of a policy's projected red-line suites on one base model."""

    digest: str
    suites: tuple[str, ...]
    bases: Mapping[str, ModuleBasis]

    def project(self, module: str, a0: np.ndarray) -> np.ndarray:
        """``A₀ (I - U Uᵀ)`` in float64, returned as float32 (the slot's frozen A)."""
        basis = self.bases.get(module)
        if basis is None:
            raise ProtectionError(
                f"protection {self.digest}: expected a basis for module {module!r}, got none "
                f"(modules: {sorted(self.bases)[:8]}...)"
            )
        a = np.asarray(a0, np.float64)
        u = basis.vectors
        out: np.ndarray = (a - (a @ u) @ u.T).astype(np.float32)
        return out


def projected_probes(policy: Policy) -> list[RedLineProbe]:
    """The red-line probes whose policy asks for projection (``projection`` or ``both``)."""
    return [p for p in policy.red_lines.probes if p.projects]


def protection_for(
    policy: Policy,
    base_model: torch.nn.Module,
    tokenizer: Any,
    *,
    cache_dir: Path | None = None,
) -> Protection | None:
    """The bases for ``policy``'s projected suites on the frozen ``base_model``; ``None``
    when no red-line suite asks for projection (then nothing changes anywhere)."""
    probes = projected_probes(policy)
    if not probes:
        return None
    if tokenizer is None:
        raise ProtectionError(
            "red_lines.probes protect: expected a tokenizer to encode the projected suites, "
            "got none"
        )
    suites = [load_suite(policy, p.suite) for p in probes]
    rows = [probe_rows(tokenizer, s) for s in suites]
    digest = _recipe_digest(base_model, probes, rows)
    if digest in _MEMO:
        return _MEMO[digest]
    folder = _cache_dir(cache_dir)
    found = _read_cache(folder / f"{digest.removeprefix('sha256:')}.npz", digest)
    if found is None:
        found = _build(digest, base_model, probes, rows)
        _write_cache(folder / f"{digest.removeprefix('sha256:')}.npz", found)
    _MEMO[digest] = found
    log.info(
        "red-line projection %s: %s modules, ranks %s",
        digest[:19],
        len(found.bases),
        sorted({b.rank for b in found.bases.values()}),
    )
    return found


def probe_rows(tokenizer: Any, suite: ProbeSuiteData) -> list[tuple[int, ...]]:
    """The distinct token rows a suite's scores read: prompt + continuation minus its last
    token, for both continuations of every prompt (the scored logits depend on nothing else)."""
    pairs = [(p.prompt, text) for p in suite.prompts for text in (suite.refusal, suite.compliance)]
    rows = {tuple(context + rest[:-1]) for context, rest in _splits(tokenizer, pairs)}
    return sorted(rows, key=lambda r: (len(r), r))


@torch.no_grad()
def collect_activations(
    base_model: torch.nn.Module, rows: Sequence[Sequence[int]], modules: Sequence[str]
) -> dict[str, np.ndarray]:
    """Module -> its input activations (float64, one row per token position) on ``rows``,
    run through ``base_model`` unpadded, rows of equal length in one batch.

    The base runs where it is placed (its device) and in float32: a bfloat16/float16
    base is widened for the call (exact, restored bit for bit; :func:`float32_compute`),
    so every dtype holding the same values gives the same activations, and so the same
    bases and slot A matrices, as a float32 base on that device. A base with no weights
    (the ``meta`` device) is a :class:`ProtectionError`.
    """
    device = model_device(base_model)
    if device.type == "meta":
        raise ProtectionError(
            "red_lines.probes protect: expected a base with weights to collect activations, "
            "got one on the meta device"
        )
    found = linear_modules(base_model)
    out: dict[str, list[np.ndarray]] = {m: [] for m in modules}
    handles = []
    for name in modules:

        def hook(_mod: torch.nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach()
            out[name].append(x.reshape(-1, x.shape[-1]).double().cpu().numpy())

        handles.append(found[name].register_forward_pre_hook(hook))
    by_length: dict[int, list[Sequence[int]]] = {}
    for r in rows:
        by_length.setdefault(len(r), []).append(r)
    try:
        with float32_compute(base_model):  # nothing happens on a float32 base
            for _length, group in sorted(by_length.items()):
                ids = torch.tensor([list(r) for r in group], dtype=torch.long, device=device)
                base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return {m: np.concatenate(xs) for m, xs in out.items()}


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.linalg.svd(x, full_matrices=False)`` on one BLAS thread, one call at a time.

    The BLAS pool is limited to one thread for the call only (restored after) and only
    one thread of this process runs such a call at once (see the module docstring).
    """
    with _SVD_LOCK, threadpool_limits(limits=1, user_api="blas"):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
    return u, s, vt


def module_basis(x: np.ndarray, basis: str | ProjectionBasis) -> ModuleBasis:
    """The directions of ``x``'s rows to protect under ``basis`` (SVD in float64)."""
    _, sigma, vt = _svd(np.asarray(x, np.float64))
    tol = float(sigma[0]) * max(x.shape) * np.finfo(np.float64).eps if sigma.size else 0.0
    k = int(np.sum(sigma > tol))
    if isinstance(basis, ProjectionBasis):
        if basis.energy is not None and basis.energy < 1.0:
            energy = np.cumsum(sigma**2) / float(np.sum(sigma**2))
            k = min(k, int(np.searchsorted(energy, basis.energy - 1e-12)) + 1)
        if basis.max_rank is not None:
            k = min(k, basis.max_rank)
    residual = float(sigma[k]) if k < sigma.size else 0.0
    return ModuleBasis(np.ascontiguousarray(vt[:k].T), sigma, residual)


def _union(bases: Sequence[ModuleBasis]) -> ModuleBasis:
    """One basis spanning several suites' (residual: the largest any suite left out)."""
    if len(bases) == 1:
        return bases[0]
    stacked = np.concatenate([b.vectors for b in bases], axis=1)
    u, s, _ = _svd(stacked)
    keep = s > max(stacked.shape) * np.finfo(np.float64).eps * (float(s[0]) if s.size else 0.0)
    sigma = np.concatenate([b.sigma for b in bases])
    return ModuleBasis(
        np.ascontiguousarray(u[:, keep]), np.sort(sigma)[::-1], max(b.residual for b in bases)
    )


def _build(
    digest: str,
    base_model: torch.nn.Module,
    probes: Sequence[RedLineProbe],
    rows: Sequence[Sequence[tuple[int, ...]]],
) -> Protection:
    modules = sorted(linear_modules(base_model))
    per_suite = [collect_activations(base_model, r, modules) for r in rows]
    bases = {
        m: _union(
            [module_basis(acts[m], p.basis) for p, acts in zip(probes, per_suite, strict=True)]
        )
        for m in modules
    }
    return Protection(digest, tuple(p.suite for p in probes), bases)


def base_digest(model: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` over every base parameter's name, dtype, shape and bytes.

    Narrow floats (bfloat16, float16) are hashed as their exact float32 widening, so a
    base loaded in bfloat16 and the same values loaded in float32 share one digest (and
    so one projection recipe); a float32 base hashes as it always did.
    """
    h = hashlib.sha256(b"layerfed/base/v1\n")
    for name, tensor in sorted(base_parameters(model).items()):
        data = tensor.detach()
        if data.is_floating_point() and data.dtype != torch.float32:
            data = data.float()
        data = data.cpu().contiguous()
        h.update(f"{name}\n{data.dtype}\n{tuple(data.shape)}\n".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return "sha256:" + h.hexdigest()


def _recipe_digest(
    base_model: torch.nn.Module,
    probes: Sequence[RedLineProbe],
    rows: Sequence[Sequence[tuple[int, ...]]],
) -> str:
    recipe = {
        "version": _VERSION,
        "base": base_digest(base_model),
        "suites": [
            {"suite": p.suite, "basis": p.model_dump(mode="json").get("basis", "exact"), "rows": r}
            for p, r in zip(probes, rows, strict=True)
        ],
    }
    data = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _cache_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "layerfed"
    return Path(root).expanduser() / "protect"


def _write_cache(path: Path, protection: Protection) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, (_name, b) in enumerate(sorted(protection.bases.items())):
        arrays[f"v{i}"], arrays[f"s{i}"] = b.vectors, b.sigma
    meta = {
        "digest": protection.digest,
        "suites": list(protection.suites),
        "modules": [[n, b.residual] for n, b in sorted(protection.bases.items())],
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, *(), **arrays)  # type: ignore[arg-type]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())
    except OSError as e:  # a cache only: computing again is correct
        log.warning("red-line projection cache %s not written: %s", path, e)


def _read_cache(path: Path, digest: str) -> Protection | None:
    """The cached bases, or None when absent, unreadable or not this recipe's."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            if meta["digest"] != digest:
                return None
            bases = {
                str(name): ModuleBasis(data[f"v{i}"], data[f"s{i}"], float(res))
                for i, (name, res) in enumerate(meta["modules"])
            }
    except (OSError, ValueError, KeyError, TypeError) as e:
        if path.exists():
            log.warning("red-line projection cache %s ignored: %s", path, e)
        return None
    for name, b in bases.items():
        gram = b.vectors.T @ b.vectors
        if b.vectors.ndim != 2 or not np.allclose(gram, np.eye(b.rank), atol=1e-8):
            log.warning("red-line projection cache %s ignored: %s not orthonormal", path, name)
            return None
    return Protection(digest, tuple(meta["suites"]), bases)
