"""Markdown report of a study: the table of every point, the Pareto front, target checks, plots."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from bfc.study.plots import NO_PLOTS, available, distill_pairs, label, ok, pareto_front


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def _f(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def summary(records) -> dict:
    """Reference, int8-dynamic bytes, best bfc point within 1 point of the reference at <= 0.5x int8."""
    recs = ok(records)
    ref = next((r for r in recs if r["kind"] == "reference"), None)
    i8 = next((r for r in recs if r["kind"] == "int8-dynamic"), None)
    out = {"reference": ref, "int8": i8, "target_point": None, "best_within_1": None, "best_at_half_int8": None}
    bfcs = [r for r in recs if r["kind"] == "bfc"]
    if ref is not None:
        within = [r for r in bfcs if r["metric"] >= ref["metric"] - 1.0]
        if within:
            out["best_within_1"] = min(within, key=lambda r: r["linear_bytes"])
        if i8 is not None:
            half = [r for r in bfcs if r["linear_bytes"] <= 0.5 * i8["linear_bytes"]]
            if half:
                out["best_at_half_int8"] = max(half, key=lambda r: r["metric"])
            hits = [r for r in within if r["linear_bytes"] <= 0.5 * i8["linear_bytes"]]
            if hits:
                out["target_point"] = min(hits, key=lambda r: r["linear_bytes"])
    return out


def markdown(records, *, title="bfc study", metric_name="metric", plots=(), command=None, out_dir=None) -> str:
    recs = ok(records)
    failed = [r for r in records if r.get("status") != "ok"]
    s = summary(records)
    ref, i8 = s["reference"], s["int8"]
    lines = [f"# {title}", ""]
    if recs:
        lines.append(f"Model `{recs[0].get('model')}`, evaluator `{recs[0].get('evaluator')}` "
                     f"(metric: {metric_name}, higher is better).")
    lines.append(f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
                 f"onnxruntime 1 intra-op thread for latency; written {time.strftime('%Y-%m-%d %H:%M')}.")
    if command:
        lines += ["", "Reproduce:", "", "```", command, "```"]
    lines += ["", "Linear-weight bytes: every tensor a method stores for the MatMul weights "
              "(values, scales, zero points, indices, shape constants); x fp32 and x int8 are ratios "
              "to the fp32 weights and to onnxruntime's int8 dynamic quantization.", ""]
    if ref is not None:
        lines.append(f"Reference {metric_name}: **{ref['metric']:.2f}**, linear weights {_mb(ref['linear_bytes'])} MB.")
        if i8 is not None:
            lines.append(f"int8-dynamic: {i8['metric']:.2f} at {_mb(i8['linear_bytes'])} MB.")
            lines.append("")
            t = s["target_point"]
            if t is not None:
                lines.append(f"**Met** (within 1 point at <= 0.5x int8-dynamic bytes): `{label(t)}` reaches {t['metric']:.2f} "
                             f"({t['metric'] - ref['metric']:+.2f}) at {_mb(t['linear_bytes'])} MB = "
                             f"{t['linear_bytes'] / i8['linear_bytes']:.3f}x int8-dynamic.")
            else:
                lines.append("**Not met** by any bfc point: within 1 point of the reference at <= 0.5x int8-dynamic bytes.")
                b = s["best_at_half_int8"]
                if b is not None:
                    lines.append(f"Best bfc point at <= 0.5x int8 bytes: `{label(b)}`: {b['metric']:.2f} "
                                 f"({b['metric'] - ref['metric']:+.2f}) at {b['linear_bytes'] / i8['linear_bytes']:.3f}x int8.")
                w = s["best_within_1"]
                if w is not None:
                    lines.append(f"Smallest bfc point within 1 point: `{label(w)}`: {w['metric']:.2f} at "
                                 f"{w['linear_bytes'] / i8['linear_bytes']:.3f}x int8.")
    lines += ["", "## All points", "",
              "| point | " + metric_name + " | delta | linear MB | x fp32 | x int8 | file MB | latency ms | "
              "layer err (mean/max) | output err | build s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    front = {r["key"] for r in pareto_front(recs)}
    for r in sorted(recs, key=lambda r: (r["linear_bytes"], -r["metric"])):
        mark = " *" if r["key"] in front else ""
        lines.append("| " + " | ".join([
            f"`{label(r)}`{mark}", f"{r['metric']:.2f}",
            _f(r["metric"] - ref["metric"], "{:+.2f}") if ref else "-",
            _mb(r["linear_bytes"]), f"{r['linear_bytes'] / r['fp32_linear_bytes']:.3f}",
            f"{r['linear_bytes'] / i8['linear_bytes']:.3f}" if i8 else "-",
            f"{r['file_bytes'] / 1e6:.2f}", _f(r.get("latency_ms"), "{:.2f}"),
            f"{_f(r.get('layer_error'))} / {_f(r.get('layer_error_max'))}",
            _f(r.get("output_error")), _f(r.get("seconds"), "{:.1f}")]) + " |")
    lines += ["", "`*` = on the Pareto front (no other point has fewer or equal bytes and a higher metric)."]
    if any("train" in r.get("metrics", {}) for r in recs):
        lines += ["", "## Train / test", "", "| point | train | test | gap | layer err |", "|---|---|---|---|---|"]
        for r in sorted(recs, key=lambda r: (r["kind"] != "reference", r.get("layer_error") or 0)):
            m = r["metrics"]
            if "train" in m:
                lines.append(f"| `{label(r)}` | {m['train']:.2f} | {m[r.get('metric_key', 'test')] if 'test' in m else r['metric']:.2f} "
                             f"| {m['train'] - r['metric']:+.2f} | {_f(r.get('layer_error'))} |")
    pairs = distill_pairs(recs)
    if pairs:
        lines += ["", "## Distillation", "", "The same compression without and with end-to-end distillation "
                  "(`distill=DATA.npz`, bfc.distill).", "",
                  f"| point | steps | {metric_name} without | with | gain | output err without / with | distill s |",
                  "|---|---|---|---|---|---|---|"]
        for plain, d in pairs:
            p = d["params"]
            lines.append("| " + " | ".join([
                f"`{label(plain)}`", str(p.get("distill_steps", 500)), f"{plain['metric']:.2f}", f"{d['metric']:.2f}",
                f"{d['metric'] - plain['metric']:+.2f}",
                f"{_f(plain.get('output_error'))} / {_f(d.get('output_error'))}",
                _f(d.get("distill_seconds"), "{:.0f}")]) + " |")
    if failed:
        lines += ["", "## Points that failed", ""]
        lines += [f"- `{r['key']}`: {r.get('error')}" for r in failed]
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            rel = os.path.relpath(p, out_dir) if out_dir else str(p)
            lines += [f"![{Path(p).stem}]({rel})", ""]
    elif ok(records) and not available():
        lines += ["", "## Plots", "", NO_PLOTS[0].upper() + NO_PLOTS[1:] + "."]
    return "\n".join(lines) + "\n"
