"""Benchmark of ``bfc optimize``: MiniLM-L6 wall time and peak memory, portable per-layer latency.

    python bench/bench_optimize.py                 # writes bench/results/optimize.md
    python bench/bench_optimize.py --skip-minilm   # latency table only

1. ``bfc optimize`` on all-MiniLM-L6-v2 (models/minilm.py, cached outside git), as a
   subprocess: wall time and peak RSS (targets: <= 30 s, <= 3x the model file).
2. Per-layer latency in onnxruntime (CPU, 1 thread, median of repeats): dense MatMul vs
   the portable Monarch (block rank 1) subgraph in fp32 and int8, for 384x1536, 1536x384,
   1024x1024, 4096x4096 at batch 1, 32, 256.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((384, 1536), (1536, 384), (1024, 1024), (4096, 4096))
BATCHES = (1, 32, 256)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {ort.__version__}, "
            f"onnx {onnx.__version__}, numpy {np.__version__}")


def matmul_model(m, n, seed=0):
    w = (np.random.default_rng(seed).standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")], "bench",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", m])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def portable(model, precision):
    from bfc.config import OptimizeConfig
    from bfc.passes.cleanup import export
    from bfc.passes.find_sites import find_sites
    from bfc.passes.plan import plan_sites
    from bfc.passes.rewrite_portable import rewrite_portable
    cfg = OptimizeConfig(structure="monarch", rank=1, max_error=None, min_size=0, precision=precision,
                         quant_method="rtn", verify=False)
    graph = gs.import_onnx(model)
    plans = plan_sites(find_sites(graph), cfg)
    rewrite_portable(graph, plans, 21)
    return export(graph, model, ["layer"]), plans[0]


def latency_ms(model, x, budget_s=1.0):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x})
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 500):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def latency_table() -> list[str]:
    rows = ["| layer | batch | dense ms | Monarch fp32 ms | speed-up | Monarch int8 ms | speed-up | FLOP ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for m, n in SHAPES:
        dense = matmul_model(m, n)
        fp32, plan = portable(dense, "fp32")
        int8, _ = portable(dense, "int8")
        ratio = (2 * m * n) / plan.flops_after
        for b in BATCHES:
            x = np.random.default_rng(1).standard_normal((b, m)).astype(np.float32)
            d, f, q = latency_ms(dense, x), latency_ms(fp32, x), latency_ms(int8, x)
            rows.append(f"| {m}x{n} | {b} | {d:.3f} | {f:.3f} | {d / f:.2f}x | {q:.3f} | {d / q:.2f}x | {ratio:.1f}x |")
            print(rows[-1], flush=True)
    return rows


def minilm_run(out_dir: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "models"))
    try:
        import minilm
        path, cal = minilm.onnx_path(), minilm.calibration_path()
    except Exception as e:  # noqa: BLE001 - optional heavy dependency
        return [f"MiniLM skipped: {type(e).__name__}: {e}"]
    bfc = Path(sys.executable).parent / "bfc"
    lines = []
    for extra, label in (([], "default (max-error 0.1, int8, no calibration)"),
                         (["--calibration", str(cal)], "with calibration (48 sentences)")):
        cmd = [str(bfc), "optimize", str(path), "-o", str(out_dir / "minilm.bfc.onnx"), "-q",
               "--report", str(out_dir / "minilm.json")] + extra
        # a fresh parent per run, so RUSAGE_CHILDREN's max RSS is this run's peak alone
        probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                 "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                 "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
                 "sys.stderr.write(r.stderr)")
        r = subprocess.run([sys.executable, "-c", probe] + cmd, capture_output=True, text=True)
        wall_s, peak_kb, rc = r.stdout.split()
        wall, peak = float(wall_s), int(peak_kb) * 1024
        r.returncode = int(rc)
        if r.returncode:
            lines.append(f"- {label}: FAILED ({r.stderr.strip()})")
            continue
        import json
        rep = json.loads((out_dir / "minilm.json").read_text())
        size = path.stat().st_size
        outs = ", ".join(f"{o['name']} cosine {o['cosine']:.4f}" for o in rep["outputs"])
        lines.append(f"- {label}: `{' '.join(['bfc'] + cmd[1:]).replace(str(path), 'model.onnx')}`  \n"
                     f"  wall {wall:.1f} s (target <= 30 s); peak RSS {peak / 2**20:.0f} MiB = {peak / size:.2f}x the "
                     f"{size / 2**20:.0f} MiB model file (target <= 3x); {rep['totals']['rewritten']}/36 layers "
                     f"rewritten; {outs}")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "optimize.md")
    args = ap.parse_args(argv)
    import tempfile
    text = ["# bfc optimize benchmark", "", f"Command: `python bench/bench_optimize.py`  ", f"Machine: {machine()}", ""]
    if not args.skip_minilm:
        with tempfile.TemporaryDirectory() as tmp:
            text += ["## MiniLM-L6 (all-MiniLM-L6-v2, 22.7 M params)", ""] + minilm_run(Path(tmp)) + [""]
    text += ["## Portable target: per-layer latency (onnxruntime CPU, 1 thread, median)", "",
             "Random weights, Monarch block rank 1 (p = q near sqrt), rewritten by bfc's portable pass "
             "(feature-major: 2 transposes, row Gathers, batched MatMuls; int8 behind per-axis DequantizeLinear, "
             "which onnxruntime executes on every run).", ""] + latency_table()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
