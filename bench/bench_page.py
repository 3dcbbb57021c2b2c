"""Benchmark: the feedback page's answer plus top-k alternatives for the tiny model, end to end.

Run ``.venv/bin/python bench/bench_page.py``; prints JSON and writes it to
``bench/results/page.json``. The page runs on uvicorn on 127.0.0.1 (as ``layerfed
instance serve`` does) pinned with torch to ``--cores`` cores; each sample is one
``POST /api/generate`` over HTTP (httpx, keep-alive) with the CSRF token, timed
from request to parsed JSON: generation of ``--tokens`` tokens with ``--top-k``
candidates per position, rendering of pieces and candidate texts, JSON. The anchor
is ``Instance.generate`` alone in the same process. With ``--browser`` (Debian's
chromium) it also times click-to-rendered-answer in the real page. Target: p95 <
300 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.governance.loader import load_policy
from layerfed.serve import FeedbackPage, create_app
from layerfed.serve.server import PageServer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "page.json"
PROMPTS = ["please tell cake", "please tell bomb", "help me with bread", "tell the sun", "hello"]
TARGET_P95_MS = 300.0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin(cores: int) -> list[int]:
    """Run this process (and torch) on ``cores`` CPUs."""
    available = sorted(os.sched_getaffinity(0))
    chosen = available[:cores]
    os.sched_setaffinity(0, chosen)
    torch.set_num_threads(len(chosen))
    return chosen


def stats_ms(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max of samples in seconds, as milliseconds."""
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return {
        "p50_ms": round(pct(0.50), 2),
        "p95_ms": round(pct(0.95), 2),
        "p99_ms": round(pct(0.99), 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def time_http(
    url: str, instance: Instance, n: int, tokens: int, top_k: int
) -> tuple[list[float], list[float]]:
    """``n`` timed ``POST /api/generate`` over keep-alive HTTP, each right after one timed
    ``Instance.generate`` of the same prompt in a worker thread (the anchor), so both
    see the same machine load; 10 warm-ups first."""
    samples: list[float] = []
    anchor: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(1) as worker:
        client.get("/").raise_for_status()
        client.headers["X-CSRF-Token"] = client.cookies["layerfed_csrf"]
        for i in range(n + 10):
            prompt = PROMPTS[i % len(PROMPTS)]
            start = time.perf_counter()
            worker.submit(instance.generate, prompt, tokens, top_k).result()
            direct = time.perf_counter() - start
            body = {"prompt": prompt, "max_new_tokens": tokens, "top_k": top_k}
            start = time.perf_counter()
            response = client.post("/api/generate", json=body)
            data = response.json()
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            assert data["tokens"] and len(data["tokens"][0]["candidates"]) == top_k
            if i >= 10:
                samples.append(elapsed)
                anchor.append(direct)
    return samples, anchor


def time_browser(url: str, n: int) -> list[float] | None:
    """Click "Send" to the answer's tokens on screen, in Debian's headless chromium."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        return None
    from playwright.sync_api import sync_playwright

    samples = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        tab = browser.new_page()
        tab.goto(url)
        tab.wait_for_selector("body[data-ready='true']")
        for i in range(n + 3):
            count = tab.locator(".turn").count()
            tab.fill("#prompt", PROMPTS[i % len(PROMPTS)])
            start = time.perf_counter()
            tab.click("#ask")
            tab.wait_for_selector(f".turn:nth-child({count + 1}) .tok[data-pos='0']")
            if i >= 3:
                samples.append(time.perf_counter() - start)
        browser.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: --cores)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="also time in headless chromium")
    args = parser.parse_args()
    cores = pin(args.cores)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        instance = Instance(
            load_policy(ROOT / "examples" / "policies" / "default.yaml"),
            instance_id="bench",
            jurisdiction="eu",
            groups=["g1"],
            journal=FeedbackJournal(Path(folder) / "journal.sqlite"),
        )
        page = FeedbackPage(instance, max_turns=10)
        with PageServer(create_app(page)) as server:
            http, anchor = time_http(server.url, instance, args.requests, args.tokens, args.top_k)
            browser = time_browser(server.url, 30) if args.browser else None
    result: dict[str, Any] = {
        "benchmark": "page_generate",
        "what": "POST /api/generate over HTTP on uvicorn: answer + top-k alternatives, tiny model",
        "cpu_model": cpu_model(),
        "cores": len(cores),
        "torch_threads": torch.get_num_threads(),
        "requests": len(http),
        "max_new_tokens": args.tokens,
        "top_k": args.top_k,
        "http": stats_ms(http),
        "anchor_instance_generate": stats_ms(anchor),
        "target_p95_ms": TARGET_P95_MS,
        "meets_target": stats_ms(http)["p95_ms"] < TARGET_P95_MS,
        "load_average": list(os.getloadavg()),
    }
    if browser is not None:
        result["browser_click_to_render"] = stats_ms(browser)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
