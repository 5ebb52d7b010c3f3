"""PNG plots of a study's records (matplotlib, Agg backend; small files).

  pareto.png          metric vs linear-weight bytes (log x), every point, the Pareto front of
                      bfc and of all points; int8-dynamic and the reference as guide lines
  error_vs_drop.png   metric drop against the mean per-layer output error (bfc, svd, prune)
                      and against the model-output error (every point)
  generalization.png  train and test metric and their gap against the mean layer error,
                      colour = precision, marker = rank (only when records carry ``train``)
  distill.png         metric vs linear-weight bytes and vs linear FLOPs (x dense) of the bfc points
                      measured without and with distillation: plain hollow, distilled filled, an
                      arrow from each plain point to its distilled one (only with distilled points)
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

NO_PLOTS = "plots need matplotlib, which is not installed: pip install 'bfc[study]', then rerun with --report-only"

MARKERS = {"bfc": "o", "int8-dynamic": "s", "int4-nbits": "D", "svd": "v", "svd-int8": "^", "prune": "x",
           "reference": "*"}
COLORS = {"bfc": "tab:blue", "int8-dynamic": "tab:orange", "int4-nbits": "tab:red", "svd": "tab:green",
          "svd-int8": "tab:olive", "prune": "tab:purple", "reference": "black"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ok(records) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def pareto_front(records) -> list[dict]:
    """Points not beaten by another (fewer or equal bytes and higher or equal metric, one strictly)."""
    pts = sorted(ok(records), key=lambda r: (r["linear_bytes"], -r["metric"]))
    front, best = [], -np.inf
    for r in pts:
        if r["metric"] > best:
            front.append(r)
            best = r["metric"]
    return front


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_pareto(records, path, metric_name="metric", title=None) -> Path:
    plt = _plt()
    recs = ok(records)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind in sorted({r["kind"] for r in recs}):
        rs = [r for r in recs if r["kind"] == kind]
        ax.scatter([r["linear_bytes"] / 1e6 for r in rs], [r["metric"] for r in rs], label=kind,
                   marker=MARKERS.get(kind, "o"), color=COLORS.get(kind), s=36, alpha=0.85)
    for front, style, lab in ((pareto_front([r for r in recs if r["kind"] == "bfc"]), "-", "bfc front"),
                              (pareto_front(recs), ":", "overall front")):
        if len(front) > 1:
            ax.plot([r["linear_bytes"] / 1e6 for r in front], [r["metric"] for r in front], style,
                    color="gray", lw=1, label=lab)
    ref = [r for r in recs if r["kind"] == "reference"]
    if ref:
        ax.axhline(ref[0]["metric"], color="black", lw=0.6, ls="--")
        ax.axhline(ref[0]["metric"] - 1, color="black", lw=0.6, ls=":", label="reference - 1")
    i8 = [r for r in recs if r["kind"] == "int8-dynamic"]
    if i8:
        ax.axvline(0.5 * i8[0]["linear_bytes"] / 1e6, color="tab:orange", lw=0.6, ls=":", label="0.5x int8-dynamic")
    ax.set_xscale("log")
    ax.set_xlabel("linear-weight bytes (MB, log)")
    ax.set_ylabel(metric_name)
    lo = [r["metric"] for r in recs]
    if lo and ref:
        ax.set_ylim(max(min(lo) - 2, ref[0]["metric"] - 40), max(lo) + 1)
    ax.set_title(title or "metric vs bytes")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_error_vs_drop(records, path, metric_name="metric") -> Path:
    plt = _plt()
    recs = ok(records)
    ref = [r for r in recs if r["kind"] == "reference"]
    base = ref[0]["metric"] if ref else max(r["metric"] for r in recs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, xl in ((axes[0], "layer_error", "mean per-layer output error"),
                        (axes[1], "output_error", "model output relative error")):
        for kind in sorted({r["kind"] for r in recs}):
            rs = [r for r in recs if r["kind"] == kind and r.get(key) and r[key] > 0]
            if rs:
                ax.scatter([r[key] for r in rs], [base - r["metric"] for r in rs], label=kind,
                           marker=MARKERS.get(kind, "o"), color=COLORS.get(kind), s=30)
        ax.set_xscale("log")
        ax.set_xlabel(xl + " (log)")
        ax.set_ylabel(f"{metric_name} drop vs reference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(path))


def has_train(records) -> bool:
    return any("train" in r.get("metrics", {}) for r in ok(records) if r["kind"] == "bfc")


def plot_generalization(records, path, test_key="test", train_key="train") -> Path:
    plt = _plt()
    recs = [r for r in ok(records) if r["kind"] == "bfc" and train_key in r.get("metrics", {})]
    ref = [r for r in ok(records) if r["kind"] == "reference"]
    precs = sorted({r["params"].get("precision", "?") for r in recs})
    ranks = sorted({r["params"].get("rank", 1) for r in recs})
    cmap = plt.get_cmap("viridis", max(len(precs), 2))
    marks = "osD^vPX*"
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, what in zip(axes, ("train", "test", "gap")):
        for i, p in enumerate(precs):
            for j, k in enumerate(ranks):
                rs = [r for r in recs if r["params"].get("precision") == p and r["params"].get("rank", 1) == k]
                if not rs:
                    continue
                y = [(r["metrics"][train_key] if what == "train" else r["metrics"][test_key] if what == "test"
                      else r["metrics"][train_key] - r["metrics"][test_key]) for r in rs]
                ax.scatter([max(r.get("layer_error", 0), 1e-6) for r in rs], y, color=cmap(i),
                           marker=marks[j % len(marks)], s=34,
                           label=(p if j == 0 else None) if what == "train" else (f"rank {k}" if i == 0 else None))
        if ref and train_key in ref[0].get("metrics", {}):
            m = ref[0]["metrics"]
            ax.axhline(m[train_key] if what == "train" else m[test_key] if what == "test" else m[train_key] - m[test_key],
                       color="black", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("mean layer error (factorization + quantization, log)")
        ax.set_ylabel({"train": "train accuracy", "test": "test accuracy", "gap": "train - test"}[what])
        ax.grid(alpha=0.3)
        if what != "gap":
            ax.legend(fontsize=7, title="precision" if what == "train" else "marker")
    return _save(fig, Path(path))


DISTILL_COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:cyan", "tab:olive")


def plot_distill(points, path, *, reference=None, baselines=(), target=None, metric_name="metric",
                 bytes_label="linear-weight bytes", title=None) -> Path:
    """Two panels, ``metric_name`` against bytes (left) and against linear FLOPs x dense (right).

    ``points``: dicts with ``family`` (colour; e.g. "Monarch int8"), ``label`` (the plain point's
    annotation), ``pair`` (plain and distilled points of one compression share it), ``distilled``
    (bool), ``bytes``, ``flops`` (x dense), ``metric``.  ``reference``: the fp32 metric (dashed line);
    ``baselines``: (name, bytes, flops, metric) squares; ``target``: (metric, bytes, flops) dotted
    guide lines (a None entry draws no line).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    fams = sorted({p["family"] for p in points})
    col = {f: DISTILL_COLORS[i % len(DISTILL_COLORS)] for i, f in enumerate(fams)}
    plain = {p["pair"]: p for p in points if not p["distilled"]}
    for ax, key, xl in ((axes[0], "bytes", bytes_label), (axes[1], "flops", "linear FLOPs x dense")):
        for p in points:
            c = col[p["family"]]
            ax.scatter([p[key]], [p["metric"]], s=40, facecolors=c if p["distilled"] else "none", edgecolors=c)
            q = plain.get(p["pair"])
            if p["distilled"] and q is not None:
                ax.annotate("", (p[key], p["metric"]), (q[key], q["metric"]),
                            arrowprops=dict(arrowstyle="->", color=c, alpha=0.6))
            if not p["distilled"] and p.get("label"):
                ax.annotate(p["label"], (p[key], p["metric"]), textcoords="offset points", xytext=(5, -10), fontsize=7)
        for name, b, f, m in baselines:
            ax.scatter([b if key == "bytes" else f], [m], marker="s", color="tab:orange", s=36,
                       label=name if key == "bytes" else None)
        if reference is not None:
            ax.axhline(reference, color="black", lw=0.8, ls="--", label=f"fp32 {reference:.2f}" if key == "bytes" else None)
        if target is not None:
            if target[0] is not None:
                ax.axhline(target[0], color="tab:red", lw=0.8, ls=":", label=f"target {target[0]:g}" if key == "bytes" else None)
            x = target[1] if key == "bytes" else target[2]
            if x is not None:
                ax.axvline(x, color="tab:red", lw=0.8, ls=":")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    for f in fams:
        axes[0].scatter([], [], facecolors="none", edgecolors=col[f], label=f"{f}, no distillation")
        axes[0].scatter([], [], color=col[f], label=f"{f}, distilled")
    axes[0].set_ylabel(metric_name)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"{metric_name}: distillation at fixed compression", fontsize=10)
    return _save(fig, Path(path))


def label(r: dict) -> str:
    p = r.get("params", {})
    if r["kind"] == "reference":
        return "reference (fp32)"
    if r["kind"] == "bfc":
        bits = [p.get("structure", "auto")]
        if "rank" in p:
            bits.append(f"r{p['rank']}")
        if p.get("structure") == "lowrank-residual":
            bits.append(f"+lr{p.get('residual_rank', 8)}")
        bits.append(p.get("precision", "int8"))
        if p.get("max_error") is not None:
            bits.append(f"err<={p['max_error']}")
        if p.get("distill") is not None:
            bits.append(f"+distill {p.get('distill_steps', 500)} steps")
        extra = [f"{k}={v}" for k, v in sorted(p.items())
                 if k not in ("structure", "rank", "residual_rank", "precision", "max_error", "distill", "distill_steps")]
        return "bfc " + " ".join(bits + extra)
    tail = f" (>= {p['min_size']} weights)" if p.get("min_size") else ""
    if "budget" in p:
        return f"{r['kind']} @ {p['budget'] / 1e6:.3f} MB{tail}"
    return r["kind"] + tail


def distill_pairs(records) -> list[tuple[dict, dict]]:
    """(plain, distilled) record pairs: a distilled bfc point and the same point without the distill keys."""
    recs = [r for r in ok(records) if r["kind"] == "bfc"]
    plain = {tuple(sorted((k, str(v)) for k, v in r["params"].items())): r for r in recs if "distill" not in r["params"]}
    out = []
    for r in recs:
        if "distill" not in r["params"]:
            continue
        base = tuple(sorted((k, str(v)) for k, v in r["params"].items() if not k.startswith("distill")))
        if base in plain:
            out.append((plain[base], r))
    return sorted(out, key=lambda pr: (pr[0]["linear_bytes"], pr[1]["params"].get("distill_steps", 500)))


def study_distill_points(records) -> list[dict]:
    """``plot_distill`` points of a study's (plain, distilled) bfc pairs (bytes in MB)."""
    out = []
    for i, (plain, d) in enumerate(distill_pairs(records)):
        for r, dist in ((plain, False), (d, True)):
            pp = r["params"]
            out.append({"family": f"{pp.get('structure', 'auto')} {pp.get('precision', 'int8')}",
                        "label": label(plain)[4:], "pair": i, "distilled": dist,
                        "bytes": r["linear_bytes"] / 1e6, "metric": r["metric"],
                        "flops": r.get("details", {}).get("flops_ratio", float("nan"))})
    return out


def available() -> bool:
    """True when matplotlib is installed (the optional ``study`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(records, out_dir, metric_name="metric", title=None) -> list[Path]:
    """The PNGs of ``records`` in ``out_dir``; none without matplotlib (see ``available``)."""
    out_dir = Path(out_dir)
    if not ok(records) or not available():
        return []
    paths = [plot_pareto(records, out_dir / "pareto.png", metric_name, title),
             plot_error_vs_drop(records, out_dir / "error_vs_drop.png", metric_name)]
    if has_train(records):
        paths.append(plot_generalization(records, out_dir / "generalization.png"))
    dpts = study_distill_points(records)
    if dpts:
        ref = [r["metric"] for r in ok(records) if r["kind"] == "reference"]
        i8 = [r for r in ok(records) if r["kind"] == "int8-dynamic"]
        base = [("int8-dynamic", i8[0]["linear_bytes"] / 1e6, 1.0, i8[0]["metric"])] if i8 else []
        paths.append(plot_distill(dpts, out_dir / "distill.png", reference=ref[0] if ref else None, baselines=base,
                                  metric_name=metric_name, bytes_label="linear-weight bytes (MB)", title=title))
    return paths
