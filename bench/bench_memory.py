"""Peak memory and wall time of factorize + quantize on large layers, one subprocess per case.

    python bench/bench_memory.py [--cases a,b,c] [--ref DIR] [--no-write]

Cases (seeded Gaussian weights scaled 1/sqrt(M), one BLAS thread):
  a  2048 x 5632 Monarch r4 (``chain_for("monarch", 2048, 5632, 4)``): factorize + int8 auto
  b  the same factorization quantized to fp8-e4m3 and to int8 (auto), side by side
  c  25088 x 64 Monarch int8, without and with calibration activations (256 random rows with
     per-feature scales; M > GRAM_MAX_DIM, so the Gram matrix is kept diagonal)

Each case runs in its own child process; its peak RSS is the child's ``ru_maxrss``
(``os.wait4``), so the parent's memory never counts.  ``--ref DIR`` runs the same cases
importing ``bfc`` from ``DIR`` (the folder holding an older checkout's ``bfc/``) and
reports them beside the current ones (e.g. the code before the "Scale" rework:
``git archive 61d21bc bfc | tar -x -C /tmp/ref`` then ``--ref /tmp/ref``).  Results go to
bench/results/memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r'''
import json, os, resource, sys, time
# import bfc from the given tree, not through the editable install's redirecting finder
sys.meta_path[:] = [f for f in sys.meta_path if "Redirecting" not in type(f).__name__]
sys.path.insert(0, os.environ["BFC_BENCH_TREE"])
import numpy as np
from bfc.factorize import chain_for, factorize
from bfc.quant import quantize

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

case = sys.argv[1]
out = {}
if case in ("a", "b"):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 5632)) / np.sqrt(2048)
    t0 = time.perf_counter()
    f = factorize(w, chain_for("monarch", 2048, 5632, 4))
    out["factorize_s"] = time.perf_counter() - t0
    out["rss_after_factorize_mb"] = rss()
    fmts = ["int8"] if case == "a" else [sys.argv[2]]
    for fmt in fmts:
        t1 = time.perf_counter()
        q = quantize(f, fmt, method="auto")
        out[fmt + "_quantize_s"] = time.perf_counter() - t1
        out[fmt + "_rel_error"] = q.rel_error
        out[fmt + "_method"] = q.method
    out["total_s"] = time.perf_counter() - t0
elif case == "c":
    rng = np.random.default_rng(1)
    w = rng.standard_normal((25088, 64)) / np.sqrt(25088)
    x = None
    if sys.argv[2] == "calib":
        x = rng.standard_normal((256, 25088)) * np.exp(rng.standard_normal(25088))
    t0 = time.perf_counter()
    f = factorize(w, chain_for("monarch", 25088, 64, 1), calibration=x)
    q = quantize(f, "int8", method="auto")
    out["total_s"] = time.perf_counter() - t0
    out["rel_error"] = q.rel_error
    out["output_error"] = f.info.get("output_error")
    out["calibration"] = f.info.get("calibration", "none")
out["cpu_total_s"] = time.process_time()
out["bfc"] = __import__("bfc").__file__
print(json.dumps(out))
'''

RUNS = {"a": [("a", "int8 factorize+quantize", ["a"])],
        "b": [("b-int8", "int8 quantize", ["b", "int8"]), ("b-fp8", "fp8-e4m3 quantize", ["b", "fp8-e4m3"])],
        "c": [("c-plain", "25088x64 int8", ["c", "plain"]), ("c-calib", "25088x64 int8 + calibration", ["c", "calib"])]}


AS_LIMIT = 12 << 30     # address-space cap per child: a K x K blow-up fails instead of swapping


def _limit():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_child(args, pythonpath: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               BFC_BENCH_TREE=pythonpath)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=pythonpath,   # cwd first on sys.path
                            preexec_fn=_limit)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = (err.decode().strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {proc.returncode}: {last[:120]}", "peak_rss_mb": usage.ru_maxrss / 1024.0,
                "wall_s": wall}
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024.0          # Linux: kilobytes
    res["wall_s"] = wall
    if not res.pop("bfc").startswith(pythonpath):
        raise RuntimeError(f"child imported bfc from outside {pythonpath}")
    return res


def fmt_row(label, r):
    if "failed" in r:
        return f"| {label} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} s, failed | {r['failed']} (cap {AS_LIMIT >> 30} GB) |"
    keys = [k for k in r if k.endswith("_s") and k != "wall_s"]
    times = ", ".join(f"{k[:-2]} {r[k]:.2f} s" for k in keys)
    extra = ", ".join(f"{k} {r[k]:.6g}" if isinstance(r[k], float) else f"{k} {r[k]}"
                      for k in r if k.endswith(("error", "method", "calibration")) and r[k] is not None)
    times = times.replace("cpu_total", "CPU (whole child)")
    return f"| {label} | {r['peak_rss_mb']:.0f} | {times} | {extra} |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--ref", default=None, help="older checkout (folder holding bfc/) to compare with")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from common import machine_line
    trees = [("current", str(ROOT))] + ([("ref", str(Path(args.ref).resolve()))] if args.ref else [])
    lines = ["| case | peak RSS (MB) | time | result |", "|---|---|---|---|"]
    results = {}
    for case in args.cases.split(","):
        for key, label, child_args in RUNS[case]:
            for tree, path in trees:
                r = run_child(child_args, path)
                results[(key, tree)] = r
                row = fmt_row(f"{label} ({tree})" if args.ref else label, r)
                print(row, flush=True)
                lines.append(row)
    ratio = []
    for tree, _ in trees:
        if ("b-int8", tree) in results and ("b-fp8", tree) in results and \
                not any("failed" in results[(k, tree)] for k in ("b-int8", "b-fp8")):
            i8, f8 = results[("b-int8", tree)], results[("b-fp8", tree)]
            ratio.append(f"fp8-e4m3 / int8 on the same factorization ({tree}): quantize time "
                         f"{f8['fp8-e4m3_quantize_s'] / i8['int8_quantize_s']:.2f}x, peak RSS "
                         f"{f8['peak_rss_mb'] / i8['peak_rss_mb']:.2f}x (extra over the factorization: "
                         f"{f8['peak_rss_mb'] - f8['rss_after_factorize_mb']:.0f} MB vs "
                         f"{i8['peak_rss_mb'] - i8['rss_after_factorize_mb']:.0f} MB)")
    body = "\n".join(lines) + "\n\n" + "\n".join(f"- {r}" for r in ratio) + "\n"
    if args.ref:
        body += (f"- ref: bfc imported from `{args.ref}` (see the module doc); current: this checkout\n")
    print(body)
    if not args.no_write:
        cmd = "python bench/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = HERE / "results" / "memory.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"# Memory and time of factorize + quantize on large layers\n\nCommand: `{cmd.strip()}`  \n"
                        f"Machine: {machine_line()}, one BLAS thread per child\n\n{body}")
        print(path)


if __name__ == "__main__":
    main()
