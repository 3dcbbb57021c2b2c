"""Violation rates of a policy's red-line suites on a bare model (round 0, no slots).

The same verdicts and the same exact fraction (violations / prompts) as the
server's probes (:class:`~layerfed.federation.probes.ProbeRunner`): one batch for
every suite. ``policy check --model`` reads a model by name with
:func:`model_red_line_rates`; the server measures its own loaded base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerfed.governance.schema import BaseModelRef, Policy
from layerfed.layers.base import load_base
from layerfed.layers.probes import load_suite, suite_margins, verdicts

__all__ = ["model_red_line_rates", "red_line_rates"]

_BUILTIN = "builtin:"


@torch.no_grad()
def red_line_rates(
    policy: Policy, model: torch.nn.Module, tokenizer: Any, *, root: Path | None = None
) -> dict[str, float]:
    """Suite -> violation rate of ``model`` as it stands, for each red-line suite of ``policy``."""
    names = list(dict.fromkeys(p.suite for p in policy.red_lines.probes))
    if not names:
        return {}
    data = [load_suite(policy, n, root=root) for n in names]
    margins = suite_margins(model, tokenizer, data)
    return {
        s.name: int(verdicts(s, m).sum()) / len(s.prompts)
        for s, m in zip(data, margins, strict=True)
    }


def model_red_line_rates(policy: Policy, model: str) -> dict[str, float]:
    """:func:`red_line_rates` on ``'builtin:NAME'`` or a local folder (relative: the policy's folder)."""
    builtin = model.startswith(_BUILTIN) or model == "tiny"  # as read_param_names reads it
    ref = (
        BaseModelRef(builtin=model.removeprefix(_BUILTIN)) if builtin else BaseModelRef(path=model)
    )
    loaded, tokenizer = load_base(ref, root=policy.source_dir)
    return red_line_rates(policy, loaded, tokenizer)
