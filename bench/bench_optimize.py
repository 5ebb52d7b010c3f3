"""Benchmark of ``bfc optimize``: MiniLM-L6 wall time and peak memory, portable per-layer latency.

    python bench/bench_optimize.py                 # writes bench/results/optimize.md
    python bench/bench_optimize.py --skip-minilm   # latency table only

1. ``bfc optimize`` on all-MiniLM-L6-v2 (models/minilm.py, cached outside git), as a
   subprocess: wall time and peak RSS (targets: <= 30 s, <= 3x the model file).
2. Per-layer latency in onnxruntime (CPU, 1 thread, median of repeats): dense MatMul vs
   the portable Monarch (block rank 1) subgraph in fp32 and int8, for 384x1536, 1536x384,
   1024x1024, 4096x4096 at batch 1, 32, 256.
3. The demo (bundled Fashion-MNIST MLP, `bfc demo`'s settings) with --objective size and
   --objective latency (at batch 1 and at batch 256), portable and custom-op targets: test
   accuracy, file size, and latency of the optimized model against the original at batch 1
   and 256 (1 thread; the two models interleaved, median of samples).
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
- Demo: measured in the section above on every run of this benchmark (it replaces the figures noted here
  before: objective size, accuracy 0.846 -> 0.846, file 1052.6 kB -> 156.3 kB, batch 1 0.023 -> 0.09 ms).
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
    from bfc.runtime import latency_ms as median_ms
    from bfc.runtime import session
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


DEMO_VARIANTS = (("size", 1), ("latency", 1), ("latency", 256))
DEMO_BATCHES = (1, 256)


def interleaved_ms(models: list, feed: dict, samples: int, copies: int = 3, sample_s: float = 0.0005) -> list[float]:
    """Median ms per run of each model: ``copies`` sessions per model (now and then one session runs
    ~2x slower for its whole life on this shared box), ``samples`` rounds in which every session
    runs back to back for about ``sample_s`` seconds, one after the other (load changes hit all
    alike); the median over all samples of a model's sessions."""
    import time

    from bfc.runtime import session
    sessions = [(i, session(m, threads=1)) for _ in range(copies) for i, m in enumerate(models)]
    reps = []
    for _, s in sessions:
        s.run(None, feed)
        t = time.perf_counter()
        s.run(None, feed)
        reps.append(max(1, min(1000, int(sample_s / max(time.perf_counter() - t, 1e-7)))))
    out: list[list[float]] = [[] for _ in models]
    for _ in range(samples):
        for (i, s), r in zip(sessions, reps):
            t = time.perf_counter()
            for _ in range(r):
                s.run(None, feed)
            out[i].append(1e3 * (time.perf_counter() - t) / r)
    return [float(np.median(v)) for v in out]


def code_version() -> str:
    """The benchmarked checkout's commit (and whether its tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def code_line() -> str:
    """'code <commit>; native library `<path>` (built <time>)': what a latency figure was measured with."""
    import time

    from bfc.runtime import is_available, library_path
    lib = "not built"
    if is_available():
        path = library_path()
        lib = f"`{path}` (built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(path.stat().st_mtime))})"
    return f"code {code_version()}; native library {lib}"


def demo_table(samples: int) -> list[str]:
    """``bfc demo``'s optimization (int8, max-error 0.2, max-output-error 0.15, 512 calibration images)
    with objective size and latency, portable and custom-op targets, against the original model."""
    import os
    import tempfile
    from importlib.resources import as_file, files

    from bfc.api import optimize
    from bfc.config import OptimizeConfig
    from bfc.passes import latency
    from bfc.runtime import is_available, session
    with as_file(files("bfc") / "data" / "demo_mlp.onnx") as mpath, \
            as_file(files("bfc") / "data" / "demo_data.npz") as dpath:
        original = onnx.load(str(mpath))
        data = np.load(dpath)
        x_test, y_test, calib_x = data["test_images"], data["test_labels"], data["calib_images"]
    targets = ["portable"] + (["custom-op"] if is_available() else [])
    load0 = os.getloadavg()[0]
    rows = ["| target | objective | layers (structure) | accuracy | file kB | original b=1 ms | optimized b=1 ms | "
            "ratio b=1 | original b=256 ms | optimized b=256 ms | ratio b=256 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    acc0 = float(np.mean(session(original, threads=1).run(None, {"image": x_test})[0].argmax(1) == y_test))
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calibration.npz"
        np.savez(calib, image=calib_x)
        for target in targets:
            for objective, lb in DEMO_VARIANTS:
                latency.clear_cache()
                cfg = OptimizeConfig(precision="int8", calibration=calib, max_error=0.2, max_output_error=0.15,
                                     target=target, objective=objective, latency_batch=lb, verify=False)
                model, rep = optimize(original, cfg)
                sess = session(model, threads=1)
                acc = float(np.mean(sess.run(None, {"image": x_test})[0].argmax(1) == y_test))
                layers = ", ".join(f"{r.layer.split('/')[-1]}: {r.structure}" for r in rep.layers)
                cells = []
                same = model.SerializeToString() == original.SerializeToString()
                for b in DEMO_BATCHES:
                    o, q = interleaved_ms([original, model], {"image": x_test[:b]}, samples)
                    cells += [f"{o:.4f}", f"{q:.4f}", f"{o / q:.2f}x" + (" (same model)" if same else "")]
                obj = objective if objective == "size" else f"latency, batch {lb}"
                rows.append(f"| {target} | {obj} | {layers} | {acc:.4f} | {model.ByteSize() / 1000:.1f} | "
                            + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
                timed = [f"{r.layer}: {r.reason if r.structure == 'dense' else r.note}" for r in rep.layers
                         if "ms" in f"{r.reason or ''}{r.note or ''}"]
                if timed:
                    notes.append(f"- {target}, {obj}: " + "; ".join(timed))
    return ["## Demo: optimized vs original latency (Fashion-MNIST MLP 784-256-256-10)", "",
            f"`bfc demo`'s settings (int8, --max-error 0.2, --max-output-error 0.15, calibration on the "
            f"{len(calib_x)} bundled training images), objective size (the demo's default) and --objective latency "
            f"with --latency-batch 1 or 256; each optimized model timed against the original at batch 1 and 256: "
            f"onnxruntime CPU, 1 thread, 3 sessions per model, all 6 interleaved, {samples} samples of ~0.5 ms of "
            f"back-to-back runs per session, median over a model's samples. ratio = original / optimized (>= 1.00x: "
            f"the optimized model is no slower; 'same model': the optimized model is byte for byte the original, "
            f"every layer kept dense, so any difference is noise). "
            f"Accuracy on the {len(x_test)} bundled test images (original {acc0:.4f}, file "
            f"{original.ByteSize() / 1000:.1f} kB). Load average {load0:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end (2 cores, shared). Measured with {code_line()}.", ""] + rows + [
            "", "The planner's own per-layer measurements (bfc.passes.latency, one-MatMul models, 1 thread, "
            "at the latency batch):", ""] + notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-layers", action="store_true", help="no per-layer latency table")
    ap.add_argument("--demo-samples", type=int, default=51, help="interleaved timing samples per session (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "optimize.md")
    args = ap.parse_args(argv)
    import tempfile
    cmd = " ".join(["python bench/bench_optimize.py", *(sys.argv[1:] if argv is None else argv)])
    text = ["# bfc optimize benchmark", "", f"Command: `{cmd}`  ", f"Machine: {machine()}", ""]
    if not args.skip_minilm:
        with tempfile.TemporaryDirectory() as tmp:
            text += ["## MiniLM-L6 (all-MiniLM-L6-v2, 22.7 M params)", ""] + minilm_run(Path(tmp)) + [""]
    if not args.skip_layers:
        text += ["## Portable target: per-layer latency (onnxruntime CPU, 1 thread, median)", "",
                 "Random weights, Monarch block rank 1 (p = q near sqrt), rewritten by bfc's portable pass "
                 "(feature-major: 2 transposes, row Gathers, batched MatMuls; int8 behind per-axis DequantizeLinear, "
                 "which onnxruntime executes on every run).", ""] + latency_table() + [""]
    text += demo_table(args.demo_samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n" + NOTES)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
