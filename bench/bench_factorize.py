"""Factorization benchmark: bfc vs pyfaust and lazylinop, time / error / peak memory, one run;
and the throughput of one big layer (factorize + quantize), this tree beside an older one.

    python bench/bench_factorize.py [--ref DIR]   # writes bench/results/factorize.md

Throughput: a seeded 2048 x 5632 Gaussian weight (scaled 1/sqrt(2048)), ``factorize`` onto
``chain_for("monarch", 2048, 5632, 4)`` then ``quantize(f, "int8", method="auto")``, in a child
process with one BLAS thread (OMP/OPENBLAS/MKL_NUM_THREADS=1), wall and CPU time
(``time.process_time``) of each step; ``--ref DIR`` runs the same child importing ``bfc`` from
DIR (an older checkout's ``bfc/``: ``git archive COMMIT bfc | tar -x -C DIR``) and checks
that both give the same quantized bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
from scipy.linalg import hadamard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from bfc.factorize import factorize, relative_error  # noqa: E402
from bfc.ks import butterfly_chain, monarch_chain  # noqa: E402

warnings.filterwarnings("ignore")


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_ratio(fn, w):
    """Peak numpy allocation during fn() divided by the input matrix's bytes."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / w.nbytes


def anchors():
    out = {}
    try:
        import pyfaust.fact
        out["pyfaust bbtree"] = lambda w, kind: (lambda: pyfaust.fact.butterfly(w, type="bbtree").toarray()) \
            if kind == "butterfly" else None
    except ImportError:
        pass
    try:
        from lazylinop.butterfly import Chain, ksd
        def lz(w, kind):
            chain = Chain.square_dyadic(w.shape) if kind == "butterfly" else Chain.monarch(w.shape)
            return lambda: ksd(w, chain).toarray()
        out["lazylinop ksd"] = lz
    except ImportError:
        pass
    return out


THROUGHPUT_CHILD = r'''
import hashlib, json, os, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if "Redirecting" not in type(f).__name__]
sys.path.insert(0, os.environ["BFC_BENCH_TREE"])
import numpy as np
from bfc.factorize import chain_for, factorize
from bfc.quant import quantize
w = np.random.default_rng(0).standard_normal((2048, 5632)) / np.sqrt(2048)
out = {}
t0, c0 = time.perf_counter(), time.process_time()
f = factorize(w, chain_for("monarch", 2048, 5632, 4))
t1, c1 = time.perf_counter(), time.process_time()
q = quantize(f, "int8", method="auto")
t2, c2 = time.perf_counter(), time.process_time()
h = hashlib.sha256()
for fac in q.factors:
    h.update(np.ascontiguousarray(fac.values).tobytes() + np.ascontiguousarray(fac.scale).tobytes())
print(json.dumps({"factorize_s": t1 - t0, "factorize_cpu_s": c1 - c0, "quantize_s": t2 - t1,
                  "quantize_cpu_s": c2 - c1, "total_s": t2 - t0, "total_cpu_s": c2 - c0,
                  "rel_error": q.rel_error, "method": q.method, "sha256": h.hexdigest(),
                  "bfc": __import__("bfc").__file__}))
'''


def throughput(tree: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", BFC_BENCH_TREE=tree)
    proc = subprocess.run([sys.executable, "-c", THROUGHPUT_CHILD], capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if not res.pop("bfc").startswith(str(tree)):
        raise RuntimeError(f"the child imported bfc from outside {tree}")
    return res


def throughput_section(ref) -> str:
    load0 = os.getloadavg()
    runs = [("this tree", throughput(str(ROOT)))]
    if ref is not None:
        runs.append((f"--ref {ref}", throughput(str(Path(ref).resolve()))))
    lines = ["## Throughput: 2048 x 5632 Monarch r4, int8 (auto), one core", "",
             f"Load average before (1/5/15 min): {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} on "
             f"{os.cpu_count()} shared cores; CPU time is the child's ``process_time`` (one BLAS thread), "
             "wall time includes waiting for a core.", "",
             "| code | factorize wall / CPU (s) | quantize wall / CPU (s) | total wall / CPU (s) | rel. error | method | quantized bytes sha256 |",
             "|---|---|---|---|---|---|---|"]
    for label, r in runs:
        lines.append(f"| {label} | {r['factorize_s']:.2f} / {r['factorize_cpu_s']:.2f} | {r['quantize_s']:.2f} / "
                     f"{r['quantize_cpu_s']:.2f} | {r['total_s']:.2f} / {r['total_cpu_s']:.2f} | {r['rel_error']:.6g} | "
                     f"{r['method']} | `{r['sha256'][:16]}` |")
    cpu = runs[0][1]["total_cpu_s"]
    lines += ["", f"- Target: <= 5 s on one core: **{'met' if cpu <= 5 else 'MISSED'}** ({cpu:.2f} s CPU, "
              f"{runs[0][1]['total_s']:.2f} s wall)."]
    if len(runs) > 1:
        same = runs[0][1]["sha256"] == runs[1][1]["sha256"]
        lines.append(f"- Same quantized bytes as the reference tree: **{'yes' if same else 'NO'}**; CPU time "
                     f"{runs[1][1]['total_cpu_s'] / cpu:.2f}x the reference's speed.")
    return "\n".join(lines) + "\n"


ROOT = Path(__file__).resolve().parent.parent


def _previous() -> tuple[str, str]:
    """(anchor table + notes, throughput section) of the results file as it is (for parts not rerun)."""
    path = Path(__file__).resolve().parent / "results" / "factorize.md"
    if not path.exists():
        return "", ""
    text = path.read_text()
    start = text.find("| matrix |")
    cut = text.find("## Throughput")
    anchors = text[start:cut if cut >= 0 else len(text)].strip() if start >= 0 else ""
    if anchors and "(not rerun" not in anchors:
        first = text[:start]
        when = next((ln for ln in first.splitlines() if ln.startswith("Machine:")), "")
        anchors = f"Anchor table not rerun (from the previous run; {when.strip()}):\n\n" + anchors
    return anchors, text[cut:].strip() + "\n" if cut >= 0 else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=None, help="a folder holding an older checkout's bfc/ (throughput beside it)")
    ap.add_argument("--parts", default="anchors,throughput",
                    help="anchors (the table against pyfaust/lazylinop), throughput; a part not run keeps its "
                         "section of the results file")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    cmd = "python bench/bench_factorize.py" + (f" --parts {args.parts}" if args.parts != ap.get_default("parts") else "") \
        + (f" --ref {args.ref}" if args.ref else "")
    old = _previous()
    tp = throughput_section(args.ref) if "throughput" in parts else old[1]
    print(tp, flush=True)
    if "anchors" not in parts:
        write_result("factorize", "Factorization (bfc.factorize vs pyfaust / lazylinop)", cmd,
                     old[0] + "\n\n" + tp)
        return
    rows = []
    cases = [("Hadamard", n, "butterfly", hadamard(n).astype(np.float64)) for n in (256, 1024, 4096)]
    cases.append(("Gaussian->Monarch", 1024, "monarch", np.random.default_rng(0).standard_normal((1024, 1024))))
    anchor_fns = anchors()
    for name, n, kind, w in cases:
        chain = butterfly_chain(n) if kind == "butterfly" else monarch_chain(n)
        repeat = 3 if n <= 1024 else 1
        bfc_orders = ["left-to-right", "balanced"] if (kind == "butterfly" and n <= 1024) or kind == "monarch" \
            else ["left-to-right"]
        results = {}
        for order in bfc_orders:
            t, f = timed(lambda: factorize(w, chain, order=order), repeat)
            mem = peak_ratio(lambda: factorize(w, chain, order=order), w)
            results[f"bfc {order}"] = (t, f.rel_error, mem)
        for aname, make in anchor_fns.items():
            fn = make(w, kind)
            if fn is None:
                continue
            # the anchors' timings include forming the dense product (toarray) only for the error: time the call alone
            t0, dense = timed(fn, 1)
            results[aname] = (t0, relative_error(w, dense), float("nan"))
        fastest_anchor = min((v[0] for k, v in results.items() if not k.startswith("bfc")), default=float("nan"))
        for label, (t, err, mem) in results.items():
            ratio = fastest_anchor / t if label.startswith("bfc") else float("nan")
            rows.append((f"{name} N={n}", label, t * 1e3, err, mem, ratio))
        print(rows[-len(results):], flush=True)
    lines = ["| matrix | method | time (ms) | rel. error | peak mem / input | speed-up vs fastest anchor |",
             "|---|---|---|---|---|---|"]
    for m, label, t, err, mem, ratio in rows:
        mem_s = "" if mem != mem else f"{mem:.2f}x"
        ratio_s = "" if ratio != ratio else f"{ratio:.1f}x"
        lines.append(f"| {m} | {label} | {t:.1f} | {err:.2e} | {mem_s} | {ratio_s} |")
    notes = ("Anchor times include `.toarray()` of their result (needed for the error); bfc's time is the "
             "factorization alone (its error is computed afterwards). Peak memory: tracemalloc peak of "
             "numpy allocations during one bfc call, over the input's bytes. Targets: Hadamard N=1024 "
             "<= 1/20 of the faster anchor at error <= 1e-12; N=4096 < 0.3 s; Monarch N=1024 <= 1/10 of "
             "lazylinop; peak memory < 3x the input.")
    write_result("factorize", "Factorization (bfc.factorize vs pyfaust / lazylinop)", cmd,
                 "\n".join(lines) + "\n\n" + notes + "\n\n" + tp)


if __name__ == "__main__":
    main()
