"""A quiet console for the gym's commands: third-party warnings go to a log file.

:func:`quiet_third_party` routes Python warnings (setuptools, Ray, transformers,
PEFT) and the chatty loggers of Flower and Ray into ``OUT/gym.log`` instead of the
terminal, in this process and in the Ray workers it starts (through the
environment), so the terminal shows only the progress display and the summary.

:class:`RunProgress` is that display: runs done of the total, elapsed time and an ETA
from the runs finished so far, on stderr; one line rewritten in place on a terminal,
one plain line per finished run otherwise (logs, CI, tests).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

__all__ = ["LOG_FILE", "RunProgress", "clock_text", "quiet_third_party"]

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


def clock_text(seconds: float) -> str:
    """``seconds`` as ``M:SS`` (or ``H:MM:SS`` from an hour on)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgress:
    """Runs done of ``total``, elapsed, and an ETA from the work finished so far.

    Each run has a weight (its rounds, say: the runs go short first, so a plain count
    would promise too early an end); the ETA is ``elapsed * (total - done) / done`` in
    those weights, unknown until a run has finished. Safe to call from several threads
    (the gym's lanes finish runs in their own threads).
    """

    BAR = 20

    def __init__(
        self,
        total: int,
        *,
        total_weight: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.total = total
        self.total_weight = float(total if total_weight is None else total_weight)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.done_weight = 0.0
        self.failed = 0
        self._lock = threading.Lock()

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before the first run has finished."""
        if self.done_weight <= 0:
            return None
        left = max(0.0, self.total_weight - self.done_weight)
        return (self.clock() - self.started) * left / self.done_weight

    def line(self, note: str = "") -> str:
        """``runs 3/20 [###...] 15% elapsed 0:42 ETA 3:58  note``."""
        share = self.done_weight / self.total_weight if self.total_weight > 0 else 1.0
        share = min(1.0, share)
        filled = round(self.BAR * share)
        eta = self.eta()
        text = (
            f"runs {self.done}/{self.total} [{'#' * filled}{'.' * (self.BAR - filled)}]"
            f" {100 * share:3.0f}% elapsed {clock_text(self.clock() - self.started)}"
            f" ETA {'?' if eta is None else clock_text(eta)}"
        )
        if self.failed:
            text += f" ({self.failed} failed)"
        return f"{text}  {note}" if note else text

    def start(self, note: str = "") -> None:
        """Show the line before any run has finished."""
        with self._lock:
            self._write(self.line(note))

    def advance(self, note: str = "", *, weight: float = 1.0, failed: bool = False) -> None:
        """One run finished (``weight`` of the total); show the line with ``note``."""
        with self._lock:
            self.done += 1
            self.done_weight += weight
            self.failed += int(failed)
            self._write(self.line(note))

    def close(self) -> None:
        """End the line on a terminal (plain output needs nothing)."""
        with self._lock:
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()
