"""Training closes the gap: each configuration post-training and trained (``--distill``), on MiniLM-L6.

For every configuration (a ``models/configs/*.toml`` file) two builds: without ``distill`` (post-training)
and with it (trained, the file's ``distill-*`` keys).  Each build runs in a child process (its own peak
RSS and CPU time: ``resource.getrusage``) and records

  * STS-B dev Spearman x 100 on the tuning half and the held-out half (``models/stsb_split.py``; steps and
    learning rates were chosen on the tuning half, the held-out half is the figure to quote);
  * linear-weight bytes vs onnxruntime's int8 dynamic quantization of the same MatMuls
    (``bfc.study.baselines.linear_bytes``), and the linear layers' FLOPs vs dense (the report's per-layer
    ``flops_after / flops_before`` over the 36 weight MatMuls);
  * wall time and CPU time of the build (the machine is shared: CPU time is the stable figure), peak RSS.

Results go to ``bench/results/training.json`` (one record per build, rerun builds replace theirs), a section
of BENCHMARKS.md (``--write``) and ``docs/study/training.png`` (score against bytes and against FLOPs,
arrows post-training -> trained).

    python bench/bench_training.py                         # every configuration, both builds
    python bench/bench_training.py --only minilm-l6-2bit --builds trained
    python bench/bench_training.py --write                 # table + plot from the stored records
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "bench"))
from common import write_result  # noqa: E402

CONFIGS = {"minilm-l6-2bit": ROOT / "models" / "configs" / "minilm-l6-2bit.toml",
           "minilm-l6": ROOT / "models" / "configs" / "minilm-l6.toml"}
RESULTS = ROOT / "bench" / "results" / "training.json"
TUNING = ROOT / "bench" / "results" / "training_tuning.json"     # the runs that chose steps / lr (tuning half only)
PLOT = ROOT / "docs" / "study" / "training.png"
FP32 = {"tuning": 87.23, "held-out": 86.27}      # fp32 MiniLM-L6 (models/eval_sts.py --threads 1)
TITLE = "MiniLM-L6: training closes the gap (bench_training)"
COMMAND = "python bench/bench_training.py && python bench/bench_training.py --write"


def build_one(args) -> dict:
    """One build in this (child) process; the record of the module doc."""
    import onnx
    import torch
    torch.set_num_threads(args.threads)
    from eval_sts import OnnxEncoder, stsb_spearman

    import bfc
    from bfc.study.baselines import linear_bytes, linear_sites
    overrides = {"calibration": args.calibration, "verify": False}
    if args.build == "trained":
        overrides["distill"] = args.distill
        overrides.update(settings(args.set))
    cfg = bfc.OptimizeConfig.from_toml(CONFIGS[args.config], **overrides)     # no distill: the distill-* keys idle
    def cpu_s():              # this process and its finished children (the planner's worker processes)
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))
    t0, c0 = time.perf_counter(), cpu_s()
    model, report = bfc.optimize(args.model, cfg)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    out = Path(args.work) / f"{args.config}-{args.build}.onnx"
    onnx.save(model, str(out))
    original = onnx.load(args.model)
    weight_nodes = {s.node for s in linear_sites(original)}
    lin = [r for r in report.layers if r.layer in weight_nodes]
    enc = OnnxEncoder(out, threads=1)
    rec = {"config": args.config, "build": args.build, "rewritten": len([r for r in lin if r.reason is None]),
           "linear_bytes": linear_bytes(original, model),
           "flops_linear": sum(r.flops_after for r in lin) / sum(r.flops_before for r in lin),
           "build_wall_s": round(wall, 1), "build_cpu_s": round(cpu, 1),
           "notes": [n for n in report.notes if n.startswith("distill")],
           "tuning": stsb_spearman(enc, half="tuning"),
           **({} if args.tune else {"held-out": stsb_spearman(enc, half="held-out")}),
           "peak_rss_gb": max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)) / 2**20,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_avg": os.getloadavg()}
    if args.build == "trained":
        secs = [float(m) for n in rec["notes"] for m in re.findall(r"(\d+) s[,)]", n)]
        d = cfg.distillation
        rec.update(steps=d.steps, batch=d.batch, lr=d.lr, blockwise_steps=d.blockwise_steps,
                   distill_data=str(args.distill), distill_wall_s=secs[0] if secs else None)
    return rec


def settings(pairs) -> dict:
    """``--set KEY=VALUE`` (flat config keys, e.g. distill_steps=800): VALUE as a TOML value."""
    import tomllib
    out = {}
    for p in pairs or ():
        k, _, v = p.partition("=")
        out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
    return out


def int8_bytes(model_path, work) -> int:
    import onnx

    from bfc.study.baselines import int8_dynamic, linear_bytes
    path = Path(work) / "int8-dynamic.onnx"
    if not path.exists():
        int8_dynamic(model_path, path)
    return linear_bytes(onnx.load(str(model_path)), onnx.load(str(path)))


def load() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def store(rec: dict) -> None:
    recs = [r for r in load() if (r["config"], r["build"]) != (rec["config"], rec["build"])] + [rec]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(recs, indent=1, sort_keys=True) + "\n")


def table(recs: list[dict], int8: int) -> str:
    rows = ["| configuration | build | STS-B held-out (fp32 86.27) | tuning (fp32 87.23) | linear bytes vs int8 "
            "dynamic | linear FLOPs vs dense | build wall s | build CPU s | peak RSS GB | training |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (r["config"], r["build"] != "post-training")):
        bw = f"{r['blockwise_steps']} block-wise + " if r.get("blockwise_steps") else ""
        train = (f"{bw}{r['steps']} steps, batch {r['batch']}, lr {r['lr']:g}, {r.get('distill_wall_s') or 0:.0f} s wall"
                 if r["build"] == "trained" else "-")
        rows.append(f"| {r['config']} | {r['build']} | {r['held-out']:.2f} ({r['held-out'] - FP32['held-out']:+.2f}) | "
                    f"{r['tuning']:.2f} | {r['linear_bytes'] / int8:.3f}x ({r['linear_bytes'] / 1e6:.3f} MB) | "
                    f"{r['flops_linear']:.3f}x | {r['build_wall_s']:.0f} | {r['build_cpu_s']:.0f} | "
                    f"{r['peak_rss_gb']:.2f} | {train} |")
    return "\n".join(rows)


def plot(recs: list[dict], int8: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "bytes", "linear-weight bytes vs int8 dynamic"),
                           (axes[1], "flops_linear", "linear FLOPs vs dense")):
        for cfg in sorted({r["config"] for r in recs}):
            pts = {r["build"]: r for r in recs if r["config"] == cfg}
            xy = {b: ((r["linear_bytes"] / int8) if key == "bytes" else r[key], r["held-out"]) for b, r in pts.items()}
            for b, (x, y) in xy.items():
                ax.scatter([x], [y], marker="o" if b == "trained" else "x")
                ax.annotate(f"{cfg} {b}", (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
            if len(xy) == 2:
                (x0, y0), (x1, y1) = xy["post-training"], xy["trained"]
                ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "gray"})
        ax.axhline(FP32["held-out"], color="k", lw=0.8, ls="--")
        ax.axhline(FP32["held-out"] - 0.5, color="gray", lw=0.6, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("STS-B dev held-out half, Spearman x100")
    fig.suptitle("MiniLM-L6: post-training (x) -> trained (o); dashed fp32, dotted fp32 - 0.5")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def write(int8: int) -> None:
    recs = load()
    plot(recs, int8)
    body = "\n\n".join([
        "The 2-core machine was SHARED with other engineers' jobs (load average in each record of "
        "bench/results/training.json); torch 1 thread, onnxruntime 1 thread for scoring.",
        table(recs, int8),
        f"int8 dynamic linear-weight bytes: {int8 / 1e6:.3f} MB.  STS-B: the fixed split of models/stsb_split.py; "
        "steps and learning rates were chosen on the tuning half only; the held-out half is the figure to quote. "
        "Build time is the whole `bfc optimize` (planning + distillation + rewrite); CPU time of the build process "
        "and its reaped children (the planner's pool workers run under a forkserver and are not counted, so "
        "planning's CPU is undercounted; training runs in the build process and is counted); peak RSS of the child "
        "process (GB = 2^30 bytes), including the scoring sessions.  A configuration without a trained row was "
        "not trained in this run.  "
        f"Plot: `{PLOT.relative_to(ROOT)}`."])
    if TUNING.exists():
        rows = ["| configuration | run | block-wise steps | end-to-end steps | batch | lr | LayerNorm outputs matched | "
                "LayerNorm trained | STS-B tuning half | build wall s | whole-model output error (calibration) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in json.loads(TUNING.read_text()):
            err = re.findall(r"error ([\d.]+ -> [\d.]+)", " ".join(t["notes"]))
            kept = " (not kept: the planned layers stayed)" if "did not improve" in " ".join(t["notes"]) else ""
            rows.append(f"| {t.get('config', 'minilm-l6-2bit')} | {t['name']}{kept} | {t.get('blockwise_steps', 0)} | "
                        f"{t['steps']} | {t['batch']} | {t['lr']:g} | {t['match_layernorm_outputs']} | "
                        f"{t['train_layernorm']} | {t['tuning']:.2f} | {t['build_wall_s']} | {err[0] if err else '-'} |")
        body += ("\n\nChoosing the schedule (tuning half only, fp32 87.23; `bench/results/training_tuning.json`, "
                 "each a `bfc.optimize` run with torch on 1 thread; `bench_training.py --tune NAME --only CONFIG "
                 "--set KEY=VALUE`):\n\n" + "\n".join(rows))
    write_result("training", TITLE, COMMAND, body)          # bench/results/training.md + BENCHMARKS.md


def tune(args) -> int:
    """``--tune NAME``: a trained build of one configuration with overrides, tuning half only (module doc)."""
    if not args.only or len(args.only) != 1:
        raise SystemExit("--tune needs exactly one --only CONFIG")
    cmd = [sys.executable, __file__, "--one", args.only[0], "trained", "--model", args.model, "--calibration",
           args.calibration, "--distill", args.distill, "--work", args.work, "--threads", str(args.threads),
           "--tune", args.tune] + [a for s in args.set or () for a in ("--set", s)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        print(res.stderr[-2000:], file=sys.stderr)
        return res.returncode
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec = {"name": args.tune, "config": args.only[0], "settings": args.set or [], **{
        k: rec[k] for k in ("steps", "batch", "lr", "blockwise_steps", "tuning", "build_wall_s", "build_cpu_s",
                            "peak_rss_gb", "linear_bytes", "flops_linear", "notes", "date", "load_avg", "distill_data")}}
    cfg = bfc_config(args.only[0], args.set)
    rec.update(match_layernorm_outputs=bool(cfg.distillation.match), train_layernorm=cfg.distillation.layernorm,
               train_rotation=cfg.distillation.rotation)
    recs = json.loads(TUNING.read_text()) if TUNING.exists() else []
    recs = [r for r in recs if r["name"] != args.tune] + [rec]
    TUNING.write_text(json.dumps(recs, indent=1) + "\n")
    print(f"{args.tune}: tuning {rec['tuning']:.2f}, {rec['build_wall_s']:.0f} s wall, {rec['peak_rss_gb']:.2f} GB; "
          f"{rec['notes']}")
    return 0


def bfc_config(name, pairs):
    import bfc
    return bfc.OptimizeConfig.from_toml(CONFIGS[name], **settings(pairs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/bfc/minilm/model.onnx"))
    ap.add_argument("--calibration", default=str(Path.home() / ".cache/bfc/minilm/calibration.npz"))
    ap.add_argument("--distill", default="/tmp/bfc-training/distill-pool.npz",
                    help="models/minilm.py distill-data output (made when absent: the whole ~160k-sentence pool)")
    ap.add_argument("--work", default="/tmp/bfc-training")
    ap.add_argument("--only", action="append", choices=sorted(CONFIGS))
    ap.add_argument("--builds", default="post-training,trained")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="only write BENCHMARKS.md and the plot")
    ap.add_argument("--tune", metavar="NAME", help="one trained build of --only CONFIG with the --set overrides, "
                    "scored on the STS-B tuning half only, recorded in bench/results/training_tuning.json")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (flat key) for --tune")
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "BUILD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.one:
        args.config, args.build = args.one
        print(json.dumps(build_one(args)))
        return 0
    if args.write:
        write(int8_bytes(args.model, args.work))
        return 0
    if args.tune:
        return tune(args)
    if not Path(args.distill).exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "minilm.py"), "distill-data", args.distill,
                        "--sentences", "0"], check=True)
    for cfg in args.only or sorted(CONFIGS):
        for build in args.builds.split(","):
            cmd = [sys.executable, __file__, "--one", cfg, build, "--model", args.model, "--calibration",
                   args.calibration, "--distill", args.distill, "--work", args.work, "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return res.returncode
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            store(rec)
            print(f"{cfg} {build}: held-out {rec['held-out']:.2f}, tuning {rec['tuning']:.2f}, "
                  f"{rec['build_wall_s']:.0f} s wall, {rec['build_cpu_s']:.0f} s CPU, {rec['peak_rss_gb']:.2f} GB")
    write(int8_bytes(args.model, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
