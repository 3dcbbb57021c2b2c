"""layerfed: federated, layered alignment feedback on Flower and PEFT.

``layerfed.Instance`` is the client SDK's entry point; the subpackages are
:mod:`layerfed.governance` (policy, trust, audit; no torch), :mod:`layerfed.layers`
(the layer stack on PEFT), :mod:`layerfed.clients` (SDK and ClientApp),
:mod:`layerfed.federation` (ServerApp and strategy) and :mod:`layerfed.simulation`
(the gym). Importing this package imports none of them until a name is used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerfed.clients.instance import Instance

__all__ = ["Instance", "__version__"]

try:
    __version__ = version("layerfed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"


def __getattr__(name: str) -> Any:
    """``layerfed.Instance`` on first use (keeps ``import layerfed.governance`` torch-free)."""
    if name == "Instance":
        from layerfed.clients.instance import Instance

        return Instance
    raise AttributeError(f"module 'layerfed' has no attribute {name!r}")
