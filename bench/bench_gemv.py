"""Decoder GEMV (1-8 rows): ai.bfc.LowBitMatMul int2/int3/int4 vs onnxruntime's int8 dynamic
quantization and MatMulNBits 4-bit, 1 thread, side by side in one process.

    python bench/bench_gemv.py                 # prints the table
    python bench/bench_gemv.py --write         # and writes bench/results/gemv.md
    python bench/bench_gemv.py --quick         # 4096x4096 only, fewer repeats

Variants (weights random, same K x N; x random float32 of shape [rows, K]):
  bfc int2/int3/int4  one ai.bfc.LowBitMatMul node (``bfc.ops.make_lowbit_matmul_model``): group 64,
                      float16 scales (bfc's defaults), no rotation (the GEMV kernel alone)
  ort int8 dynamic    ``onnxruntime.quantization.quantize_dynamic`` of a one-MatMul model (int8 weights,
                      DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime as it sees fit)
  ort nbits int4 L4   com.microsoft.MatMulNBits, 4 bits, block 32, accuracy_level 4 (int8 activations)
Timing: ``InferenceSession.run_with_iobinding`` with preallocated input and output (no per-call
allocation), ``rounds`` rounds x every variant (order rotated per round) x ``repeats`` calls; the
figure is the median over all calls (the machine is shared and noisy).  The weights are re-read
from the cache hierarchy each call (hot loop, as a decoder layer repeated alone).
GB/s = weight bytes (packed codes + scales as the kernel streams them) / median time.
Read bandwidth: one thread summing a 1 GB array (a C loop compiled here when a C compiler exists,
and numpy), and the same C loop over an 8 MB array re-read (cache-resident, like the hot loop).
Cold table (4096x4096, 1 row): copies of each model, ~1 GB of weights in all, called in turn,
so each call streams its weights from memory as a decoder with more weights than caches does.
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_line  # noqa: E402

from bfc import ops  # noqa: E402
from bfc.runtime import library_path, session  # noqa: E402

SHAPES = ((4096, 4096), (2048, 5632), (5632, 2048))
ROWS = (1, 2, 4, 8)
BITS = (2, 3, 4)
GROUP = 64
NBITS_BLOCK = 32
# targets (4096x4096, one row, 1 thread)
TARGET_INT4_SPEEDUP = 1.6
TARGET_INT2_SPEEDUP = 2.5
TARGET_BW_FRACTION = 0.60

C_READ = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
typedef uint64_t v8 __attribute__((vector_size(64)));
/* sum of n uint64 (n a multiple of 32), reps times: four 64-byte accumulators; the rep index
   enters the sum so the passes cannot be folded into one */
uint64_t bfc_read_sum(const uint64_t* p, size_t n, int reps) {
  v8 a = {0}, b = {0}, c = {0}, d = {0};
  for (int r = 0; r < reps; ++r) {
    const v8 rr = {(uint64_t)r, 0, 0, 0, 0, 0, 0, 0};
    for (size_t i = 0; i + 32 <= n; i += 32) {
      v8 x, y, z, w;
      memcpy(&x, p + i, 64); memcpy(&y, p + i + 8, 64); memcpy(&z, p + i + 16, 64); memcpy(&w, p + i + 24, 64);
      a += x ^ rr; b += y; c += z; d += w;
    }
  }
  a += b + c + d;
  uint64_t s = 0;
  for (int i = 0; i < 8; ++i) s += a[i];
  return s;
}
"""


def c_reader(tmp: Path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src, lib = tmp / "rd.c", tmp / "librd.so"
    src.write_text(C_READ)
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    if subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True).returncode != 0:
        return None
    fn = ctypes.CDLL(str(lib)).bfc_read_sum
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def read_bandwidth(tmp: Path, trials: int = 7) -> dict:
    """GB/s of one thread reading (best of trials): 1 GB (DRAM) by C and numpy, 8 MB re-read by C."""
    out = {}
    big = np.ones(1 << 27, np.uint64)        # 1 GiB, touched (allocated pages)
    fn = c_reader(tmp)
    if fn is not None:
        best = []
        for _ in range(trials):
            t = time.perf_counter()
            fn(big.ctypes.data, big.size, 1)
            best.append(big.nbytes / (time.perf_counter() - t) / 1e9)
        out["c_1gb"] = max(best)
        small = np.ones(1 << 20, np.uint64)   # 8 MiB
        reps = 50
        fn(small.ctypes.data, small.size, 2)
        vals = []
        for _ in range(trials):
            t = time.perf_counter()
            fn(small.ctypes.data, small.size, reps)
            vals.append(small.nbytes * reps / (time.perf_counter() - t) / 1e9)
        out["c_8mb"] = max(vals)
    f = big.view(np.float64)
    vals = []
    for _ in range(trials):
        t = time.perf_counter()
        f.sum()
        vals.append(f.nbytes / (time.perf_counter() - t) / 1e9)
    out["numpy_1gb"] = max(vals)
    del big
    out["read"] = max(out.get("c_1gb", 0.0), out["numpy_1gb"])
    return out


# ---- models -------------------------------------------------------------------------------

def lowbit_model(k, n, bits, rng):
    ng = -(-k // GROUP)
    u = rng.integers(0, 1 << bits, size=(k, n), dtype=np.uint8)
    s = (rng.random((ng, n), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
    m = ops.make_lowbit_matmul_model(u, s, bits=bits, group_size=GROUP, x_shape=["rows", k], onnx_opset=21)
    nbytes = -(-ng * GROUP * n * bits // 8) + s.nbytes
    if bits == 3:
        nbytes = ng * GROUP * n // 8 * 3 + s.nbytes
    return m, nbytes


def matmul_model(k, n, rng):
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")], "fc",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def int8_dynamic_model(k, n, rng, tmp: Path):
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.getLogger().setLevel(logging.ERROR)   # quantize_dynamic's "consider pre-processing" warning
    src, dst = tmp / f"fp_{k}_{n}.onnx", tmp / f"int8_{k}_{n}.onnx"
    onnx.save(matmul_model(k, n, rng), str(src))
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return onnx.load(str(dst)), k * n + 4


def nbits_model(k, n, rng):
    nb = -(-k // NBITS_BLOCK)
    b = rng.integers(0, 256, size=(n, nb, NBITS_BLOCK // 2), dtype=np.uint8)
    s = (rng.random(n * nb, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=NBITS_BLOCK, accuracy_level=4)
    g = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m, b.nbytes + s.nbytes


class Timed:
    def __init__(self, name, model, nbytes, k, n, rows, rng):
        import onnxruntime as ort
        self.name, self.nbytes = name, nbytes
        self.sess = session(model, threads=1)
        x = rng.standard_normal((rows, k)).astype(np.float32)
        self.x = ort.OrtValue.ortvalue_from_numpy(x)
        self.y = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, n), np.float32))
        self.io = self.sess.io_binding()
        self.io.bind_ortvalue_input(self.sess.get_inputs()[0].name, self.x)
        self.io.bind_ortvalue_output(self.sess.get_outputs()[0].name, self.y)
        self.times = []
        for _ in range(5):
            self.sess.run_with_iobinding(self.io)

    def time(self, repeats):
        run, io = self.sess.run_with_iobinding, self.io
        for _ in range(repeats):
            t = time.perf_counter()
            run(io)
            self.times.append(time.perf_counter() - t)

    def us(self):
        return 1e6 * statistics.median(self.times)


def bench_shape(k, n, rows_list, rounds, repeats, tmp, rng):
    results = {}
    int8_m, int8_b = int8_dynamic_model(k, n, rng, tmp)
    nb_m, nb_b = nbits_model(k, n, rng)
    lb = {bits: lowbit_model(k, n, bits, rng) for bits in BITS}
    for rows in rows_list:
        vs = [Timed("ort int8 dynamic", int8_m, int8_b, k, n, rows, rng),
              Timed("ort nbits int4 L4 b32", nb_m, nb_b, k, n, rows, rng)]
        vs += [Timed(f"bfc int{bits}", m, b, k, n, rows, rng) for bits, (m, b) in lb.items()]
        for r in range(rounds):
            order = vs[r % len(vs):] + vs[:r % len(vs)]
            for v in order:
                v.time(repeats)
        results[rows] = {v.name: (v.us(), v.nbytes) for v in vs}
        del vs
    return results


def bench_cold(k, n, rng, tmp, total_bytes, rounds):
    """1 row, weights streamed from memory: a round calls one session after another over copies
    whose weights add up to total_bytes (each copy its own prepacked kernel), so every call finds
    its weights evicted; per-call median over all calls."""
    import onnxruntime as ort
    int8_m, int8_b = int8_dynamic_model(k, n, rng, tmp)
    variants = [("ort int8 dynamic", int8_m, int8_b)] + [(f"bfc int{b}", *lowbit_model(k, n, b, rng)) for b in (4, 3, 2)]
    x = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, k)).astype(np.float32))
    out = {}
    for name, model, nbytes in variants:
        copies = max(2, int(total_bytes // nbytes))
        sess, ios = [], []
        for _ in range(copies):
            s = session(model, threads=1)
            io = s.io_binding()
            io.bind_ortvalue_input(s.get_inputs()[0].name, x)
            io.bind_ortvalue_output(s.get_outputs()[0].name,
                                    ort.OrtValue.ortvalue_from_numpy(np.zeros((1, n), np.float32)))
            s.run_with_iobinding(io)
            sess.append(s)
            ios.append(io)
        times = []
        for _ in range(rounds):
            for s, io in zip(sess, ios):
                t = time.perf_counter()
                s.run_with_iobinding(io)
                times.append(time.perf_counter() - t)
        out[name] = (1e6 * statistics.median(times), nbytes, copies)
        del sess, ios
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, 8 rounds")
    ap.add_argument("--write", action="store_true", help="write bench/results/gemv.md")
    ap.add_argument("--cold-gb", type=float, default=1.0,
                    help="weights per cold round in GB (4096x4096, 1 row; 0 skips the cold table)")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = 8 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        bw = read_bandwidth(tmp)
        allres = {(k, n): bench_shape(k, n, ROWS, rounds, args.repeats, tmp, rng) for k, n in shapes}
        cold = bench_cold(*SHAPES[0], rng, tmp, args.cold_gb * 1e9, 5) if args.cold_gb > 0 else None
    names = ["ort int8 dynamic", "ort nbits int4 L4 b32", "bfc int4", "bfc int3", "bfc int2"]
    lines = [f"Library: `{library_path()}`  ",
             f"Read bandwidth, 1 thread: {bw['read']:.1f} GB/s (1 GB array: C loop "
             f"{bw.get('c_1gb', float('nan')):.1f}, numpy sum {bw['numpy_1gb']:.1f}); 8 MB re-read (C loop, cache): "
             f"{bw.get('c_8mb', float('nan')):.1f} GB/s", "",
             "Microseconds (median), speed vs ort int8 dynamic (x), GB/s of weights streamed; 1 thread, "
             f"bfc group {GROUP} float16 scales, MatMulNBits block {NBITS_BLOCK} accuracy_level 4.", "",
             "| shape KxN | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (k, n), res in allres.items():
        for rows, r in res.items():
            base = r["ort int8 dynamic"][0]
            cells = []
            for nm in names:
                us, nb = r[nm]
                gbs = nb / (us * 1e-6) / 1e9
                cells.append(f"{us:.0f} us, {base / us:.2f}x, {gbs:.1f} GB/s")
            lines.append(f"| {k}x{n} | {rows} | " + " | ".join(cells) + " |")
    r1 = allres[SHAPES[0]][1]
    base = r1["ort int8 dynamic"][0]
    sp4, sp2 = base / r1["bfc int4"][0], base / r1["bfc int2"][0]
    gb4 = r1["bfc int4"][1] / (r1["bfc int4"][0] * 1e-6) / 1e9
    gb2 = r1["bfc int2"][1] / (r1["bfc int2"][0] * 1e-6) / 1e9
    c8 = bw.get("c_8mb", float("nan"))
    lines += ["", "| target (4096x4096, 1 row, 1 thread) | goal | measured | met |", "|---|---|---|---|",
              f"| int4 vs int8 dynamic | >= {TARGET_INT4_SPEEDUP}x | {sp4:.2f}x | {'yes' if sp4 >= TARGET_INT4_SPEEDUP else 'NO'} |",
              f"| int2 vs int8 dynamic | >= {TARGET_INT2_SPEEDUP}x | {sp2:.2f}x | {'yes' if sp2 >= TARGET_INT2_SPEEDUP else 'NO'} |",
              f"| hot loop: weights streamed from cache / 8 MB re-read ({c8:.1f} GB/s) | (info) | "
              f"int4 {gb4:.1f} GB/s ({gb4 / c8:.0%}), int2 {gb2:.1f} GB/s ({gb2 / c8:.0%}) | |"]
    if cold:
        cb = cold["ort int8 dynamic"][0]
        g4 = cold["bfc int4"][1] / (cold["bfc int4"][0] * 1e-6) / 1e9
        g2 = cold["bfc int2"][1] / (cold["bfc int2"][0] * 1e-6) / 1e9
        frac = min(g4, g2) / bw["read"]
        lines += [f"| cold: int4 / int2 vs int8 dynamic | >= {TARGET_INT4_SPEEDUP}x / >= {TARGET_INT2_SPEEDUP}x | "
                  f"{cb / cold['bfc int4'][0]:.2f}x / {cb / cold['bfc int2'][0]:.2f}x | "
                  f"{'yes' if cb / cold['bfc int4'][0] >= TARGET_INT4_SPEEDUP and cb / cold['bfc int2'][0] >= TARGET_INT2_SPEEDUP else 'NO'} |",
                  f"| cold: weights streamed from memory / 1 GB read bandwidth ({bw['read']:.1f} GB/s) | "
                  f">= {TARGET_BW_FRACTION:.0%} | int4 {g4:.1f} GB/s ({g4 / bw['read']:.0%}), int2 {g2:.1f} GB/s "
                  f"({g2 / bw['read']:.0%}) | {'yes' if frac >= TARGET_BW_FRACTION else 'NO'} |"]
    if cold:
        base = cold["ort int8 dynamic"][0]
        k, n = SHAPES[0]
        lines += ["", f"Cold weights ({k}x{n}, 1 row, 1 thread): each call's weights evicted by the "
                  f"~{args.cold_gb:g} GB of other copies called before it (weights streamed from memory).", "",
                  "| variant | copies | us | vs int8 dynamic | GB/s of weights | of read bandwidth |",
                  "|---|---|---|---|---|---|"]
        for name, (us, nb, copies) in cold.items():
            gbs = nb / (us * 1e-6) / 1e9
            lines.append(f"| {name} | {copies} | {us:.0f} | {base / us:.2f}x | {gbs:.1f} | {gbs / bw['read']:.0%} |")
    body = "\n".join(lines)
    header = f"# Decoder GEMV: LowBitMatMul vs onnxruntime int8 / MatMulNBits\n\nMachine: {machine_line()}\n"
    cmd = "python bench/bench_gemv.py" + (" --quick" if args.quick else "") + " --write"
    text = f"{header}Command: `{cmd}`\n\n{body}\n"
    print(text)
    if args.write:
        out = ROOT / "bench" / "results" / "gemv.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
