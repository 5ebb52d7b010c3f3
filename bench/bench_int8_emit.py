"""Stored compactly, computed as int8 dynamic: latency and resident memory of one layer in stock onnxruntime.

    python bench/bench_int8_emit.py [--repeats 7] [--runs 20] [--mem-repeats 3] [--big] [--no-write]

One linear layer y = x W (W K x N, seeded Gaussian / sqrt(K)), four models side by side, 1 thread,
default session options otherwise:

  qdyn    onnxruntime ``quantize_dynamic`` (its defaults) of the fp32 single-MatMul model
  int8    ``passes/int8_emit.emit_int8_matmul`` with a stored per-column int8 weight
  fold3   3-bit group-64 codes (``quantize_groups`` RTN) + fp16 scales in the file, turned into the
          per-column int8 weight by ``emit_folded_codes`` (folded by onnxruntime at session creation)
  fp32    the single-MatMul fp32 model

Rows 1x128 and 32x128 ([1, 128, K] and [32, 128, K] inputs); layers 384x1536 and 1536x384.
Latency: median over ``--repeats`` rounds (models interleaved within each round) of the mean of
``--runs`` runs (a quarter of them, at least 3, at 32x128).  Resident: RSS of a fresh child process (psutil) after ``InferenceSession(...)``
minus before it (onnxruntime already imported), median of ``--mem-repeats`` children; also the
peak (VmHWM) increase during session creation and the RSS after one run.  ``--big`` adds the
resident check for a 4096x4096 layer.  Error: relative Frobenius error of each model's output
against the exact fp32 product on the 1x128 input.  Writes bench/results/int8_emit.md (not
BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bfc.factorize import relative_error

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = ("qdyn", "int8", "fold3", "fp32")
LAYERS = ((384, 1536), (1536, 384))
ROWS = ((1, 128), (32, 128))

CHILD = r'''
import json, sys, gc
import numpy as np, onnxruntime as ort, psutil
def hwm():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmHWM"):
            return int(ln.split()[1]) * 1024
p = psutil.Process()
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
gc.collect()
r0, h0 = p.memory_info().rss, hwm()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
r1, h1 = p.memory_info().rss, hwm()
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
r1t = p.memory_info().rss
k = int(sys.argv[2])
s.run(None, {"x": np.ones((1, 128, k), np.float32)})
r2 = p.memory_info().rss
print(json.dumps({"session": r1 - r0, "trimmed": r1t - r0, "peak": h1 - max(h0, r0), "after_run": r2 - r0}))
'''


def weight(k, n, seed=0):
    return (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def build_models(k, n, folder: Path, seed=0, bits=3, group=64) -> tuple[dict, np.ndarray]:
    """Write the four models of one layer into ``folder``; returns ({name: path}, the 3-bit deq weight)."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnxruntime.quantization import quantize_dynamic

    from bfc.lowbit.groups import quantize_groups
    from bfc.lowbit.int8_fold import quantize_columns
    from bfc.ops import lowbit_codes_stream
    from bfc.passes.graph_builder import GraphBuilder
    from bfc.passes.int8_emit import emit_folded_codes, emit_int8_matmul

    w = weight(k, n, seed)
    paths = {m: folder / f"{m}_{k}x{n}.onnx" for m in MODELS}

    def graph_model(body):
        x = gs.Variable("x", np.float32, ["batch", "seq", k])
        graph = gs.Graph(inputs=[x], opset=21)
        b = GraphBuilder(graph, "bfc/layer", np.float32, 21)
        y = body(b, x)
        y.name, y.dtype = "y", np.float32
        graph.outputs = [y]
        m = gs.export_onnx(graph)
        m.opset_import[0].version = 21
        m.ir_version = 10
        return m

    onnx.save(graph_model(lambda b, x: b.op("MatMul", [x, b.const("W", w)])), paths["fp32"])
    quantize_dynamic(str(paths["fp32"]), str(paths["qdyn"]))
    w8, c8 = quantize_columns(w)
    onnx.save(graph_model(lambda b, x: emit_int8_matmul(b, x, w8, c8)), paths["int8"])
    gq = quantize_groups(w, bits=bits, group_size=group, method="rtn")
    stream = lowbit_codes_stream(gq.codes(), gq.group_size, bits)
    onnx.save(graph_model(lambda b, x: emit_int8_matmul(
        b, x, *emit_folded_codes(b, stream, gq.scales, bits, gq.group_size, k, n))), paths["fold3"])
    return paths, gq.dequantize()


def resident(path: Path, k: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(k)], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def sessions(paths: dict) -> dict:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return {m: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for m, p in paths.items()}


def latency(sess: dict, x: np.ndarray, repeats: int, runs: int) -> dict:
    feeds = {"x": x}
    for s in sess.values():
        for _ in range(3):
            s.run(None, feeds)
    times = {m: [] for m in sess}
    for _ in range(repeats):
        for m, s in sess.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feeds)
            times[m].append((time.perf_counter() - t0) / runs)
    return {m: statistics.median(t) for m, t in times.items()}


def errors(sess: dict, x: np.ndarray, w: np.ndarray) -> dict:
    ref = x.astype(np.float64) @ w.astype(np.float64)
    return {m: relative_error(ref, s.run(None, {"x": x})[0]) for m, s in sess.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--mem-repeats", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also the resident check of a 4096x4096 layer")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cmd = "python bench/bench_int8_emit.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    mb = 1 / 2 ** 20
    lat_rows, mem_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = list(LAYERS) + ([(4096, 4096)] if args.big else [])
        for k, n in shapes:
            paths, deq = build_models(k, n, Path(tmp))
            sizes = {m: os.path.getsize(p) for m, p in paths.items()}
            for m in MODELS:
                r = resident(paths[m], k, args.mem_repeats)
                mem_rows.append(f"| {k}x{n} | {m} | {sizes[m] * mb:.2f} | {r['session'] * mb:.1f} | {r['trimmed'] * mb:.1f} | "
                                f"{r['peak'] * mb:.1f} | {r['after_run'] * mb:.1f} |")
                print(mem_rows[-1], flush=True)
            if (k, n) not in LAYERS:
                continue
            sess = sessions(paths)
            rng = np.random.default_rng(1)
            x1 = rng.standard_normal((1, 128, k)).astype(np.float32)
            err = errors(sess, x1, weight(k, n))
            ref = x1.astype(np.float64) @ weight(k, n).astype(np.float64)
            err_float3 = relative_error(ref, x1.astype(np.float64) @ deq)
            for bsz, seq in ROWS:
                x = rng.standard_normal((bsz, seq, k)).astype(np.float32)
                lat = latency(sess, x, args.repeats, args.runs if bsz == 1 else max(3, args.runs // 4))
                cells = " | ".join(f"{lat[m] * 1e3:.3f} ({lat[m] / lat['qdyn']:.2f}x)" for m in MODELS)
                lat_rows.append(f"| {k}x{n} | {bsz}x{seq} | {cells} |")
                print(lat_rows[-1], flush=True)
            cells = {m: f"{err[m]:.2e}" for m in MODELS}
            cells["fold3"] += f" (3-bit in float, x @ deq: {err_float3:.2e})"
            lat_rows.append(f"| {k}x{n} | rel. error vs exact | " + " | ".join(cells[m] for m in MODELS) + " |")
            print(lat_rows[-1], flush=True)
            del sess
    body = (
        "One layer y = x W, 1 thread, stock onnxruntime, default session options otherwise. "
        "qdyn: `quantize_dynamic` defaults (per-tensor int8 weight); int8: `emit_int8_matmul` with a stored "
        "per-column int8 weight; fold3: 3-bit group-64 codes + fp16 scales in the file, folded by onnxruntime into "
        "the per-column int8 weight at session creation (`emit_folded_codes`); fp32: one MatMul.\n\n"
        f"### Latency (ms per run, median of {args.repeats} interleaved rounds; ratio to qdyn)\n\n"
        "| layer KxN | rows | qdyn | int8 | fold3 | fp32 |\n|---|---|---|---|---|---|\n" + "\n".join(lat_rows) +
        f"\n\n### Resident memory (fresh process; MB; median of {args.mem_repeats} children)\n\n"
        "session = RSS after `InferenceSession(path)` minus before; trimmed = the same after glibc `malloc_trim(0)` "
        "(heap freed during session creation but not yet returned to the system); peak = VmHWM increase during "
        "session creation; after run = RSS after one 1x128 run minus before (the steady state).\n\n"
        "| layer KxN | model | file MB | session | trimmed | peak | after run |\n|---|---|---|---|---|---|---|\n" + "\n".join(mem_rows) + "\n")
    if not args.no_write:
        from common import RESULTS, machine_line
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "int8_emit.md"
        path.write_text(f"# Stored compactly, computed as int8 dynamic\n\nCommand: `{cmd}`  \n"
                        f"Machine: {machine_line()}\n\n{body}")
        print(path)
    else:
        print(body)


if __name__ == "__main__":
    main()
