"""Collect every benchmark's JSON into bench/results/all.json and summary.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _round_cpu(rnd: dict[str, Any]) -> str:
    """ "; CPU ..." for a P2 result that has CPU seconds per round (older files do not)."""
    if "ratio_cpu" not in rnd:
        return ""
    return (
        f"; CPU {rnd['governed_cpu_median_s']:.2f} s vs {rnd['plain_cpu_median_s']:.2f} s"
        f" per round, ratio {rnd['ratio_cpu']:.2f}"
    )


def _cpu(doc: dict[str, Any]) -> str:
    """The CPU model and load a benchmark recorded (``machine`` or ``environment``)."""
    env = doc.get("machine") or doc.get("environment") or {}
    load = env.get("load_avg")
    return f"{env.get('cpu', '?')}, {env.get('cpus', '?')} cpus" + (
        f", load {load[0]:.1f}" if load else ""
    )


def main() -> None:
    """Write all.json and summary.md from the individual results."""
    names = ("aggregation", "sign_verify", "round", "client_step", "scale", "redline_gate")
    docs = {name: _load(name) for name in names}
    (RESULTS / "all.json").write_text(json.dumps(docs, indent=2))
    lines = [
        "# Benchmark summary",
        "",
        "| benchmark | anchor | ours | anchor | ratio | goal | machine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    agg = docs["aggregation"]
    agg_env = agg.get("environment", {})
    for case in agg.get("cases", []):
        cpu_ratio = case["layered_cpu_median_s"] / case["flower_cpu_median_s"]
        lines.append(
            f"| P1 decode + validate + aggregate {case['replies']} x {case['floats_per_reply']:,} float32 ({case['arrays_per_reply']} arrays/reply) | Flower aggregate_arrayrecords | {case['layered_median_s']:.3f} s (CPU {case['layered_cpu_median_s']:.3f} s) | {case['flower_median_s']:.3f} s (CPU {case['flower_cpu_median_s']:.3f} s) | {case['ratio']:.2f} (CPU {cpu_ratio:.2f}) | <= {agg.get('goal_ratio_at_most', 0.8)} | {agg_env.get('cpu', '?')}, {agg_env.get('cpus', '?')} cpus, load {agg_env.get('load_average', [float('nan')])[0]:.1f} |"
        )
    rnd = docs["round"]
    if rnd:
        lines.append(
            f"| P2 governed round, {rnd['clients_per_round']} clients | Flower FedAvg round | {rnd['governed_median_s']:.3f} s | {rnd['plain_median_s']:.3f} s | {rnd['ratio']:.2f} (per repeat {', '.join(f'{x:.2f}' for x in rnd.get('ratio_per_repeat', []))}{_round_cpu(rnd)}) | {rnd['goal']} | {_cpu(rnd)} |"
        )
    step = docs["client_step"]
    for case in step.get("cases", []):
        med = case["median_step"]
        lines.append(
            f"| P5 client step, {len(case['composed_slots'])} slots composed, training {case['trained_slot']} (CPU time) | bare single-adapter PEFT step | {med['composed_merged']['cpu_s'] * 1e3:.1f} ms | {med['bare_peft']['cpu_s'] * 1e3:.1f} ms | {case['ratio_cpu']:.2f} (live adapters: {case['ratio_live_cpu']:.2f}; per call incl. merge: {case['ratio_call_cpu']:.2f}) | {step['goal']} | {_cpu(step)} |"
        )
    sv = docs["sign_verify"]
    if sv:
        lines.append(
            f"| verify {sv['replies_per_round']} signed updates of {sv['update_floats']:,} float32 | Flower FedAvg of the same replies | {sv['server_verify_round_s']:.3f} s | {sv['aggregate_round_s']:.3f} s | {sv['server_verify_share_of_aggregation']:.2f} | (reported) | {_cpu(sv)} |"
        )
        lines.append(
            f"| sign + verify throughput | | {sv['sign_verify_updates_per_s']:.0f} updates/s | | | | |"
        )
    gate = docs["redline_gate"]
    env = gate.get("machine", {}) if gate else {}
    load = env.get("load_avg")
    where = f"{env.get('cpu', '?')}, {env.get('cpus', '?')} cpus{f', load {load[0]:.1f}' if load else ''}"
    for arm in gate.get("arms", []) if gate else []:
        if arm["compositions"] != 100:
            continue
        work = arm["median_gate_cpu_s"] + arm["median_projection_cpu_s"]
        rest = arm["median_round_cpu_s"] - arm["median_report_cpu_s"] - work
        lines.append(
            f"| P6 red-line checks ({arm['arm']}: gate + projection), 100 compositions, {gate['clients_per_round']} clients (steady rounds, CPU) | rest of the server round (its red-line report apart: {arm['median_report_cpu_s']:.2f} s) | {work:.2f} s | {rest:.2f} s | {arm['median_redline_share_cpu_without_report']:.1%} of the round | {gate['goal']} | {where} |"
        )
    scale = docs["scale"]
    base = next((r for r in scale.get("runs", []) if r["instances"] == 100), None)
    for r in scale.get("runs", []) if base else []:
        if r is not base:
            lines.append(
                f"| P3 median round, {r['instances']:,} instances ({r['sampled_per_round']:.0f} sampled), peak RSS {r['peak_rss_gib']:.2f} GiB | the same with 100 instances | {r['round_s_median']:.2f} s | {base['round_s_median']:.2f} s | {r['ratio_to_100']:.2f} (CPU {r['cpu_ratio_to_100'] or float('nan'):.2f}) | {scale['goal']['ratio_to_100']}, RSS {scale['goal']['peak_rss_gib']} GiB | {_cpu(scale)} |"
            )
    if scale:
        lines += [
            "",
            "## Scale",
            "",
            (RESULTS / "scale.md").read_text() if (RESULTS / "scale.md").exists() else "",
        ]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
