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
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTES = """
## Notes

- The CPU is shared (2 cores, other jobs running): dense timings vary by up to 2x between runs; compare
  rows of one run only.  The reference figure in the issue (fp32 Monarch 4096x4096 at batch 32:
  1.97 ms vs 23.9 ms dense, a 4-D-transpose subgraph) is beaten by the feature-major layout here.
- Latency rows use random weights, whose Monarch r1 approximation error is ~0.9: they measure the
  cost of the subgraph, not its accuracy.  Where onnxruntime falls short of the FLOP ratio: batch 1
  (fixed per-op overhead of ~8 small ops, and int8 pays its DequantizeLinear on every run because
  onnxruntime does not constant-fold it) and batch 256 at 4096 (the 2-D transposes and row Gathers
  move 4 MB per step).
- MiniLM-L6: its pretrained weights have no Kronecker-sparse structure (Monarch r1 weight error 0.89),
  so the default 10% budget keeps all 36 layers dense, each with its reason.  Forced rewrites
  (tests/test_passes_minilm.py, calibration on 48 sentences): last FFN-down layer as Monarch r8 int8
  -> sentence-embedding cosine 0.960; two FFN-down layers 0.919; all six 0.819; all 36 at Monarch r8
  0.560 (fine-tuning after factorization would be needed).
- Peak memory is above the 3x target: the original proto, the graphsurgeon graph, the output proto and
  onnxruntime's verification sessions each hold the weights for a while.  Done so far: checker before
  parsing, data-less stand-ins while exporting (one copy of untouched initializers), sizes measured
  part by part (upb's ByteSize serializes), verification from the saved files one session at a time,
  freed buffers returned to the OS, Gram matrices accumulated chunk by chunk for calibration.
  Left: build the output by editing the input proto in place (no second copy of untouched weights)
  and stream the save.
- Demo (`bfc demo`, Fashion-MNIST MLP 784-256-256-10, calibration 512 train images, 1000 test images):
  int8 Monarch r4 on fc1/fc2 at max-error 0.2, accuracy 0.846 -> 0.846, file 1052.6 kB -> 156.3 kB;
  latency batch 1 0.023 -> 0.09 ms, batch 256 1.33 -> 1.06 ms (small layers: op overhead dominates).
"""
SHAPES = ((384, 1536), (1536, 384), (1024, 1024), (4096, 4096))
BATCHES = (1, 32, 256)


def machine() -> str:
    return f"{machine_line()}, onnx {onnx.__version__}"


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
    from bfc.passes.pipeline import run_passes
    cfg = OptimizeConfig(structure="monarch", rank=1, max_error=None, min_size=0, precision=precision,
                         quant_method="rtn", verify=False)
    state = run_passes(model, cfg)
    return state.output, state.plans[0]


def latency_ms(model, x):
    from bfc.runtime import latency_ms as median_ms, session
    return median_ms(session(model, threads=1), {"x": x}, repeats=100)


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
    text = ["# bfc optimize benchmark", "", "Command: `python bench/bench_optimize.py`  ", f"Machine: {machine()}", ""]
    if not args.skip_minilm:
        with tempfile.TemporaryDirectory() as tmp:
            text += ["## MiniLM-L6 (all-MiniLM-L6-v2, 22.7 M params)", ""] + minilm_run(Path(tmp)) + [""]
    text += ["## Portable target: per-layer latency (onnxruntime CPU, 1 thread, median)", "",
             "Random weights, Monarch block rank 1 (p = q near sqrt), rewritten by bfc's portable pass "
             "(feature-major: 2 transposes, row Gathers, batched MatMuls; int8 behind per-axis DequantizeLinear, "
             "which onnxruntime executes on every run).", ""] + latency_table()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n" + NOTES)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
