"""MiniLM-L6: the same bfc compression without and with end-to-end distillation (``--distill``).

    python bench/bench_minilm_distill.py [--points r4-int8,r8-int8,r2-int8,r4-fp8] [--steps 300]
        [--batch 32] [--lr 5e-4] [--sentences 2048] [--jobs 2] [--limit N]

Each point (Monarch rank r, precision p, portable target, every one of the 36 weight MatMuls,
the 48-sentence calibration of models/minilm.py) is built twice with ``bfc.optimize``: plain, and
with ``distill`` = ``python models/minilm.py distill-data`` (N unlabeled sentences from gensim's
corpora, never STS-B).  Each build runs in its own process (``--jobs`` at a time, 1 torch / ort
thread each), which records its peak RSS (``resource.getrusage``).  Measured per build: STS-B dev
Spearman x100 (1500 pairs, as bench/bench_minilm.py), linear-weight bytes against onnxruntime's
int8 dynamic quantization (``bfc.study.baselines``), the linear FLOPs ratio against dense (bfc's
report), build and distillation seconds.  The best point at <= 0.5x int8 bytes is also scored on
WordSim353 (Spearman) and Lee (Pearson) from gensim's test data.  Records go to a JSON-lines file
(``--results``; a rerun skips the builds already there) and the table to
bench/results/minilm_distill.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

TARGET_STSB, TARGET_BYTES, TARGET_FLOPS = 85.7, 0.5, 0.5
TARGET_SECONDS, TARGET_RSS_GB = 30 * 60, 4.0
BASE = dict(structure="monarch", max_error=10.0, max_output_error=None, min_size=4096, seed=0, target="portable",
            workers=1)


STRUCTURES = {"r": "monarch", "bf": "butterfly", "c3r": "chain3"}
LABELS = {"monarch": "Monarch", "butterfly": "butterfly chain", "chain3": "3-factor chain"}


def parse_point(name: str) -> dict:
    """``r4-int8`` -> Monarch rank 4 int8; ``bf2-int8`` -> butterfly chain rank 2; ``c3r4-int8`` -> 3-factor
    chain rank 4; precision ``fp8`` -> fp8-e4m3."""
    r, _, p = name.partition("-")
    import re
    m = re.fullmatch(r"(c3r|bf|r)(\d+)", r)
    if not m or not p:
        raise SystemExit(f"bad point {name!r}: expected rN-PRECISION, bfN-PRECISION or c3rN-PRECISION, e.g. r4-int8")
    return {"structure": STRUCTURES[m.group(1)], "rank": int(m.group(2)), "precision": {"fp8": "fp8-e4m3"}.get(p, p)}


def label(r: dict) -> str:
    return f"{LABELS[r.get('structure', 'monarch')]} r{r['rank']} {r['precision']}"


# ---- scores --------------------------------------------------------------------------------
def _gensim_data() -> Path:
    import gensim
    return Path(gensim.__file__).parent / "test" / "test_data"


def _embed(path, texts):
    from bfc.runtime import session
    from bfc.study.evaluators import _tokenizer, encode_sentences
    return encode_sentences(session(str(path), threads=1), _tokenizer(None), texts)


def _cos(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)


def wordsim353(path) -> float:
    """Spearman x100 of the embedding cosine of each word pair against the human mean (353 pairs)."""
    from bfc.study.evaluators import spearman
    rows = [ln.split("\t") for ln in (_gensim_data() / "wordsim353.tsv").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    words = sorted({r[0] for r in rows} | {r[1] for r in rows})
    pos = {w: i for i, w in enumerate(words)}
    e = _embed(path, words)
    cos = _cos(e[[pos[r[0]] for r in rows]], e[[pos[r[1]] for r in rows]])
    return 100.0 * spearman(cos, np.array([float(r[2]) for r in rows]))


def lee(path) -> float:
    """Pearson x100 of the document cosine against the human similarities (50 documents, 1225 pairs)."""
    docs = [d.strip() for d in (_gensim_data() / "lee.cor").read_text(errors="replace").splitlines() if d.strip()]
    sim = np.loadtxt(_gensim_data() / "similarities0-1.txt")
    e = _embed(path, docs)
    e = e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
    i, j = np.triu_indices(len(docs), 1)
    return 100.0 * float(np.corrcoef((e @ e.T)[i, j], sim[i, j])[0, 1])


# ---- one build (child process) ---------------------------------------------------------------
def build_one(args) -> dict:
    import onnx
    import torch
    torch.set_num_threads(args.threads)
    from bench_minilm import stsb

    import bfc
    from bfc.study.baselines import linear_bytes, linear_sites
    p = parse_point(args.one)
    params = dict(BASE, **p)
    if args.distill and not args.flops_only:
        params.update(distill=args.distill, distill_steps=args.steps, distill_batch=args.batch, distill_lr=args.lr,
                      distill_layernorm=args.layernorm, distill_match=tuple(args.match.split(",")) if args.match else ())
    cfg = bfc.OptimizeConfig(calibration=args.calibration, verify=False, **params)
    t0 = time.perf_counter()
    model, report = bfc.optimize(args.model, cfg)
    secs = time.perf_counter() - t0
    tag = (f"distill{args.steps}-b{args.batch}-lr{args.lr:g}" + ("-ln" if args.layernorm else "")
           + ("-match" if args.match else "") + f"-n{args.n_data}" if args.distill else "plain")
    out = Path(args.work) / f"{args.one}-{tag}.onnx"
    onnx.save(model, str(out))
    t = report.totals()
    dnote = [n for n in report.notes if n.startswith("distill")]
    dsecs = None
    for n in dnote:
        if " s" in n and "steps" in n:
            try:
                dsecs = float(n.rsplit("lr ", 1)[1].split(", ")[1].split(" s")[0])
            except (IndexError, ValueError):
                pass
    original = onnx.load(args.model)
    weight_nodes = {site.node for site in linear_sites(original)}       # the 36 weight MatMuls, not attention
    lin = [r for r in report.layers if r.layer in weight_nodes]
    flops_linear = sum(r.flops_after for r in lin) / sum(r.flops_before for r in lin)
    if args.flops_only:
        return {"point": args.one, "flops_linear": flops_linear}
    rec = {"point": args.one, "distill": bool(args.distill), **p,
           "steps": args.steps if args.distill else 0, "batch": args.batch if args.distill else None,
           "lr": args.lr if args.distill else None, "layernorm": bool(args.distill and args.layernorm),
           "match": args.match if args.distill else None, "sentences": args.n_data if args.distill else None,
           "rewritten": t["rewritten"], "sites": t["sites"],
           "flops_ratio": t["flops_after"] / t["flops_before"], "flops_linear": flops_linear, "linear_bytes": linear_bytes(original, model),
           "build_s": round(secs, 1), "distill_s": dsecs, "notes": dnote,
           "stsb": stsb(out, args.limit), "path": str(out)}
    if args.cross:
        rec["wordsim353"], rec["lee"] = wordsim353(out), lee(out)
    use = resource.getrusage(resource.RUSAGE_SELF)
    rec["peak_rss_gb"] = use.ru_maxrss / 2**20
    rec["cpu_s"] = round(use.ru_utime + use.ru_stime, 1)       # the whole child: build + scoring
    return rec


# ---- parent -------------------------------------------------------------------------------
def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def describe(r: dict) -> str:
    """The distillation column: steps, batch, lr, options, data size."""
    if not r["distill"]:
        return "none"
    return (f"{r['steps']} steps, batch {r['batch']}, lr {r['lr']:g}" + (", LayerNorm" if r.get("layernorm") else "")
            + (", + LayerNorm outputs" if r.get("match") == "op:LayerNormalization" else
               f", + {r['match']}" if r.get("match") else "")
            + f", {r.get('sentences') or 2048} sentences")


def table(recs, int8_bytes, ref) -> str:
    lines = ["| point | distillation | STS-B dev | vs fp32 | linear MB | x int8-dynamic | linear FLOPs x dense | "
             "build s | distill s | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    recs = sorted(recs, key=lambda r: (r.get("structure", "monarch"), r["linear_bytes"], r["precision"], r["distill"],
                                       r.get("sentences") or 0, r["steps"]))
    for r in recs:
        ds = f"{r['distill_s']:.0f}" if r.get("distill_s") else "-"
        lines.append(f"| {label(r)} | {describe(r)} | {r['stsb']:.2f} | {r['stsb'] - ref['stsb']:+.2f} | "
                     f"{r['linear_bytes'] / 1e6:.2f} | {r['linear_bytes'] / int8_bytes:.3f} | "
                     f"{r['flops_linear']:.3f} | {r['build_s']:.0f} | {ds} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def plot(recs, int8_bytes, ref, path: Path) -> Path | None:
    """STS-B against linear-weight bytes (x int8 dynamic) and against linear FLOPs (x dense):
    ``bfc.study.plots.plot_distill`` (plain hollow, distilled filled, arrows plain -> distilled)."""
    from bfc.study.plots import available, plot_distill
    if not available():
        return None
    pts = []
    for r in recs:
        fam = f"{LABELS[r.get('structure', 'monarch')]} {r['precision']}"
        pts.append({"family": fam, "label": f"r{r['rank']}", "pair": r["point"], "distilled": r["distill"],
                    "bytes": r["linear_bytes"] / int8_bytes, "flops": r["flops_linear"], "metric": r["stsb"]})
    return plot_distill(pts, path, reference=ref["stsb"], baselines=[("onnxruntime int8 dynamic", 1.0, 1.0,
                                                                      ref["int8_stsb"])],
                        target=(TARGET_STSB, TARGET_BYTES, TARGET_FLOPS), metric_name="STS-B dev Spearman x100",
                        bytes_label="linear-weight bytes / int8-dynamic",
                        title="MiniLM-L6: distillation at fixed compression (arrows: plain -> distilled)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="r4-int8,r8-int8,r2-int8,r4-fp8")
    ap.add_argument("--distill-points", default=None, help="distill only these points (default: every point)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--sentences", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="STS-B pairs (default all 1500)")
    ap.add_argument("--jobs", type=int, default=2, help="builds at a time (one process each, 1 thread)")
    ap.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "bfc-minilm-distill.jsonl")
    ap.add_argument("--report-only", action="store_true")
    # child mode
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--distill", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calibration", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cross", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flops-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layernorm", action="store_true", help="also train the LayerNorm scales/biases (distill_layernorm)")
    ap.add_argument("--match", default=None, help="distill_match, comma-separated (e.g. op:LayerNormalization)")
    ap.add_argument("--n-data", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(build_one(args)), flush=True)
        return 0

    import minilm
    import onnx
    from bench_minilm import stsb
    from common import write_result

    from bfc.study.baselines import int8_dynamic, linear_bytes
    src, calib = Path(minilm.onnx_path()), Path(minilm.calibration_path())
    work = Path(tempfile.gettempdir()) / "bfc-bench-minilm-distill"
    work.mkdir(exist_ok=True)
    data = work / f"distill-{args.sentences}.npz"
    if not data.exists():
        minilm.write_distill_data(data, args.sentences)
    i8 = int8_dynamic(src, work / "int8.onnx")
    int8_bytes = linear_bytes(onnx.load(str(src)), onnx.load(str(i8)))
    ref_path = work / "reference.json"
    if ref_path.exists():
        ref = json.loads(ref_path.read_text())
    else:
        ref = {"stsb": stsb(src, args.limit), "int8_stsb": stsb(i8, args.limit), "fp32_bytes": linear_bytes(onnx.load(str(src)))}
        ref["wordsim353"], ref["lee"] = wordsim353(src), lee(src)
        ref_path.write_text(json.dumps(ref))
    print("reference", ref, flush=True)

    def child(name, distill, cross=False):
        cmd = [sys.executable, __file__, "--one", name, "--model", str(src), "--calibration", str(calib),
               "--work", str(work), "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr)]
        cmd += ["--distill", str(data), "--n-data", str(args.sentences)] if distill else []
        cmd += ["--match", args.match] if distill and args.match else []
        cmd += ["--cross"] if cross else []
        cmd += ["--limit", str(args.limit)] if args.limit else []
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)

    def key(r):
        return (r["point"], r["distill"], r["steps"])
    done = {key(r) for r in load(args.results)}
    jobs = []
    if not args.report_only:
        names = args.points.split(",")      # the long distillations spread over the run, plain builds between
        jobs = [(names[0], True)] + [(n, False) for n in names] + [(n, True) for n in names[1:]]
        if args.distill_points:
            jobs = [j for j in jobs if not j[1] or j[0] in args.distill_points.split(",")]
    jobs = [j for j in jobs if (j[0], j[1], args.steps if j[1] else 0) not in done]
    running = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            name, d = jobs.pop(0)
            running.append((name, d, child(name, d)))
            print(f"started {name} distill={d}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, d, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            out = proc.stdout.read()
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{name} distill={d} failed (rc {proc.returncode})", flush=True)
                continue
            rec = json.loads(lines[-1][7:])
            with open(args.results, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print({k: rec[k] for k in ("point", "distill", "stsb", "linear_bytes", "distill_s", "peak_rss_gb")}, flush=True)

    all_recs = load(args.results)
    for r in all_recs:
        # records of builds before flops_linear was recorded: bfc's report gives the 12 attention MatMuls
        # (no constant weight) zero FLOPs, so its total ratio is the weight-MatMul ratio (checked on r4 int8:
        # 0.3472 both ways; --flops-only measures one point)
        r.setdefault("flops_linear", r["flops_ratio"])
    args.results.write_text("".join(json.dumps(r) + "\n" for r in all_recs))
    recs = all_recs                       # every build recorded, whatever its step count (the table says it)
    # best point within the byte and FLOP budget, scored on WordSim353 / Lee too
    ok = [r for r in recs if r["linear_bytes"] <= TARGET_BYTES * int8_bytes and r["flops_linear"] <= TARGET_FLOPS]
    best = max(ok, key=lambda r: r["stsb"]) if ok else None
    if best is not None and "wordsim353" not in best:        # the saved model of that build
        best.update(wordsim353=wordsim353(best["path"]), lee=lee(best["path"]))
        args.results.write_text("".join(json.dumps(r) + "\n" for r in all_recs))

    body = [f"fp32 reference: STS-B dev {ref['stsb']:.2f}, WordSim353 {ref['wordsim353']:.2f}, Lee {ref['lee']:.2f}; "
            f"onnxruntime int8 dynamic: STS-B {ref['int8_stsb']:.2f} at {int8_bytes / 1e6:.2f} MB of linear weights.",
            "", table(recs, int8_bytes, ref), ""]
    body.append(f"All 36 weight MatMuls of all-MiniLM-L6-v2 (models/minilm.py), portable target, "
                "48-sentence calibration, no layer-wise reconstruction; distillation data: `python models/minilm.py "
                "distill-data` with the row's sentence count (2048: gensim's corpora only, the first runs; 50000: "
                "WordNet glosses/examples + fortunes + gensim, the current default; max 128 tokens). "
                f"STS-B pairs: {args.limit or 1500}. "
                "Builds ran one to three at a time, one process each, torch on 1 thread; "
                "peak RSS is the build process's maximum resident set (ru_maxrss), build and evaluation included. "
                "Linear FLOPs: bfc's report, the 36 weight MatMuls per token (the 12 attention MatMuls stay dense "
                "and are not counted).")
    if best is not None:
        hit = (best["stsb"] >= TARGET_STSB and best["linear_bytes"] <= TARGET_BYTES * int8_bytes
               and best["flops_linear"] <= TARGET_FLOPS)
        body += ["", f"Best point at <= {TARGET_BYTES}x int8-dynamic bytes and <= {TARGET_FLOPS}x dense FLOPs: "
                 f"{label(best)}" + (f" + distillation ({describe(best)})" if best["distill"] else "")
                 + f": STS-B {best['stsb']:.2f}"
                 + (f", WordSim353 {best['wordsim353']:.2f} (fp32 {ref['wordsim353']:.2f}), Lee {best['lee']:.2f} "
                    f"(fp32 {ref['lee']:.2f})" if "wordsim353" in best else "") + ".",
                 "", f"**Target {'HIT' if hit else 'MISSED'}**: STS-B >= {TARGET_STSB} at <= {TARGET_BYTES}x int8-dynamic "
                 f"bytes with linear FLOPs <= {TARGET_FLOPS}x dense: best {best['stsb']:.2f} "
                 f"({best['linear_bytes'] / int8_bytes:.3f}x bytes, {best['flops_linear']:.3f}x FLOPs)."]
        dist = [r for r in recs if r["distill"]]
        if dist:
            worst_s = max(r.get("distill_s") or 0 for r in dist)
            worst_m = max(r["peak_rss_gb"] for r in dist)
            body.append("Rows whose settings differ from the command above (other steps, batch, data, matched tensors, "
                        "structure) ran as single children, one or two at a time, and their records were appended to the "
                        "results: `python bench/bench_minilm_distill.py --one POINT --model MODEL --calibration CALIB "
                        "--work DIR [--distill DATA --steps N --batch B --lr LR --match op:LayerNormalization --n-data N "
                        "--cross]` (POINT rN-int8 = Monarch rank N, bfN-int8 = butterfly chain of block rank N).")
            body.append(f"Best point: distillation {best.get('distill_s') or 0:.0f} s, peak RSS {best['peak_rss_gb']:.2f} GB "
                        f"(<= {TARGET_RSS_GB:g} GB: {'hit' if best['peak_rss_gb'] <= TARGET_RSS_GB else 'MISSED'}).")
            body.append(f"Distillation time <= {TARGET_SECONDS // 60} min: {'hit' if worst_s <= TARGET_SECONDS else 'MISSED'} "
                        f"(longest {worst_s / 60:.1f} min of wall time on 1 thread of a 2-core machine shared with other "
                        "engineers' jobs: load average 4-5 during the 2048-sentence runs, 7-10 during the 50000-sentence "
                        "runs, when the best point's whole build process used about 600 s of CPU time, sampled with ps); "
                        f"peak RSS <= {TARGET_RSS_GB:g} GB: {'hit' if worst_m <= TARGET_RSS_GB else 'MISSED'} "
                        f"(largest {worst_m:.2f} GB, GB = 2^30 bytes).")
    png = plot(recs, int8_bytes, ref, ROOT / "docs" / "study" / "minilm_distill.png")
    if png is not None:
        body.append(f"\nPlot: `{png.relative_to(ROOT)}` (STS-B against bytes and against linear FLOPs; arrows: plain -> "
                    "distilled).")
    cmd = "python bench/bench_minilm_distill.py" + (f" --points {args.points}" if args.points != ap.get_default("points") else "")
    cmd += "".join(f" --{k} {getattr(args, k)}" for k in ("steps", "batch", "lr", "sentences", "limit", "jobs")
                   if getattr(args, k) != ap.get_default(k))
    path = write_result("minilm_distill", "MiniLM-L6 with and without distillation", cmd, "\n".join(body))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
