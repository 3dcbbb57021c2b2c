"""The gym's progress display: runs done, elapsed, ETA from the work so far; TTY vs plain lines."""

from __future__ import annotations

import io
import threading

import pytest

from layerfed.simulation.console import RunProgress, clock_text


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_text_reads_minutes_and_hours() -> None:
    """Seconds print as M:SS below an hour and H:MM:SS from an hour on."""
    assert clock_text(0) == "0:00"
    assert clock_text(59.6) == "1:00"
    assert clock_text(754) == "12:34"
    assert clock_text(3723) == "1:02:03"


def test_eta_is_unknown_until_a_run_finishes_then_scales_elapsed_by_work_left() -> None:
    """No ETA before the first run; then elapsed * (total - done) / done, in run weights."""
    clock, stream = FakeClock(), io.StringIO()
    progress = RunProgress(4, total_weight=20.0, stream=stream, clock=clock, tty=False)
    assert progress.eta() is None
    clock.now += 30
    progress.advance("a", weight=5.0)  # a quarter of the work in 30 s
    assert progress.eta() == pytest.approx(90.0)
    clock.now += 30
    progress.advance("b", weight=10.0)  # three quarters in 60 s
    assert progress.eta() == pytest.approx(20.0)
    progress.advance("c", weight=5.0)
    assert progress.eta() == 0.0


def test_plain_output_is_one_line_per_run_with_counts_elapsed_and_eta() -> None:
    """Off a terminal each finished run writes one plain line: done/total, bar, elapsed, ETA."""
    clock, stream = FakeClock(), io.StringIO()
    progress = RunProgress(2, stream=stream, clock=clock, tty=False)
    progress.start("starting")
    clock.now += 61
    progress.advance("turkey / default / seed 0: 61.0 s ok")
    clock.now += 59
    progress.advance("turkey / ungoverned / seed 0: 59.0 s failed: boom", failed=True)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "runs 0/2 [....................]   0% elapsed 0:00 ETA ?  starting",
        "runs 1/2 [##########..........]  50% elapsed 1:01 ETA 1:01  "
        "turkey / default / seed 0: 61.0 s ok",
        "runs 2/2 [####################] 100% elapsed 2:00 ETA 0:00 (1 failed)  "
        "turkey / ungoverned / seed 0: 59.0 s failed: boom",
    ]
    assert "\r" not in stream.getvalue()


def test_terminal_output_rewrites_one_line_and_ends_it_on_close() -> None:
    """On a terminal the line is rewritten in place (carriage return, clear) and closed once."""
    clock, stream = FakeClock(), io.StringIO()
    progress = RunProgress(3, stream=stream, clock=clock, tty=True)
    progress.start()
    clock.now += 10
    progress.advance("x")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 2
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\rruns 1/3 [#######.............]  33% elapsed 0:10 ETA 0:20  x\x1b[K" in text


def test_runs_finished_from_several_threads_are_all_counted() -> None:
    """Lanes finish runs in their own threads: every advance counts, lines stay whole."""
    stream = io.StringIO()
    progress = RunProgress(400, stream=stream, tty=False)

    def lane() -> None:
        for _ in range(100):
            progress.advance("run", weight=2.0)

    threads = [threading.Thread(target=lane) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.done == 400 and progress.done_weight == 800.0
    lines = stream.getvalue().splitlines()
    assert len(lines) == 400 and all(line.startswith("runs ") for line in lines)
    assert lines[-1].startswith("runs 400/400 [####################] 100%")
