"""A quiet console for the gym's commands: third-party warnings go to a log file.

:func:`quiet_third_party` routes Python warnings (setuptools, Ray, transformers,
PEFT) and the chatty loggers of Flower and Ray into ``OUT/gym.log`` instead of the
terminal, in this process and in the Ray workers it starts (through the
environment), so the terminal shows only the progress display and the summary.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

__all__ = ["LOG_FILE", "quiet_third_party"]

LOG_FILE = "gym.log"
_NOISY = ("flwr", "ray", "alembic", "transformers", "peft", "urllib3", "filelock")


def quiet_third_party(out: Path) -> Path:
    """Send warnings and third-party logs to ``out/gym.log``; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOG_FILE
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(handler)
    logging.getLogger("py.warnings").propagate = False
    import flwr.common.logger  # noqa: F401  (installs Flower's console handler first)

    for name in _NOISY:
        noisy = logging.getLogger(name)
        for old in list(noisy.handlers):
            if not isinstance(old, logging.FileHandler):
                noisy.removeHandler(old)
        noisy.setLevel(logging.INFO)
        noisy.addHandler(handler)
        noisy.propagate = False
    warnings.simplefilter("default")
    # Ray workers are new processes: they read these before importing anything.
    os.environ["PYTHONWARNINGS"] = "ignore"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return path
