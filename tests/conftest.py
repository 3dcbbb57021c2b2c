"""Suite-wide test settings: Hypothesis profiles and the tests `make check` leaves to `make test`.

``make fast`` / ``make check`` set ``LAYERFED_FAST=1``: Hypothesis then runs at most
:data:`FAST_EXAMPLES` examples per property that does not fix its own count (the
full suite, ``make test``, keeps Hypothesis's default of 100), and the tests in
:data:`SLOW_IN_FAST` are marked ``slow`` so the quick loop skips them. Every test
still runs, unchanged, in ``make test``. No deadline in either profile: a loaded
machine must not turn a slow example into a failure.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

FAST_EXAMPLES = 20
SLOW_IN_FAST = {
    # Each a full federated round per Hypothesis example, or a long fuzz run (> 10 s each
    # on a quiet 2-core machine); their cheaper siblings stay in the fast suite.
    "tests/test_dropouts.py::test_each_task_is_accounted_for_once",
    "tests/test_policy_fuzz.py::test_mutated_default_documents_never_escape",
    "tests/test_aggregate.py::test_benchmark_paths_agree_on_a_small_case",
    "tests/test_anchored_state.py::test_untouched_run_resumes",
}
"""Node ids (``path::name``) that ``make check`` skips and ``make test`` runs."""

settings.register_profile("full", deadline=None)
settings.register_profile(
    "fast",
    deadline=None,
    max_examples=FAST_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow],
)
FAST = os.environ.get("LAYERFED_FAST") == "1"
settings.load_profile("fast" if FAST else "full")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the fast loop, mark the known-slow tests ``slow`` (deselected by ``-m 'not slow'``)."""
    if not FAST:
        return
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_IN_FAST:
            item.add_marker(pytest.mark.slow)
