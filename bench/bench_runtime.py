"""Latency of bfc's ai.bfc.KSMatMul custom op vs onnxruntime baselines, side by side.

    python bench/bench_runtime.py                 # full grid -> bench/results/runtime.md
    python bench/bench_runtime.py --quick         # 1024x1024 and 4096x4096 only
    python bench/bench_runtime.py --shapes 4096x4096 --batches 32 --threads 1

Columns (one onnxruntime session each, same input, same thread count):
  dense-fp32   MatMul with a dense fp32 weight (the unfactorized layer)
  dyn-int8     onnxruntime.quantization.quantize_dynamic(weight_type=QInt8) of that MatMul
  nbits4       com.microsoft MatMulNBits, 4-bit RTN, block 32 (MatMulNBitsQuantizer)
  ks-<fmt>-<structure>  one KSMatMul node (fp32 / int8 / fp8-e4m3 values, absmax per-column
               scales) for a Monarch chain and a butterfly(-like) chain of the same shape
Random weights: this measures speed, not accuracy.  Effective GFLOP/s of the KS columns
count the structured FLOPs (2 * batch * nnz); dense columns count 2 * batch * M * N.

Hook for more columns (the portable subgraph rewrite, end-to-end models): append a
``Backend(name, build)`` to ``EXTRA_BACKENDS`` (``build(ctx) -> ModelProto | None`` with
``ctx`` holding M, N, the chain, its float values and the dense weight); the model is run
with ``bfc.runtime.session`` so it may mix standard and ai.bfc ops.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bfc import ops, runtime  # noqa: E402
from bfc.ks.chain import butterfly_chain, chainable_chain, monarch_chain, prime_factors  # noqa: E402

SHAPES = [(384, 1536), (1536, 384), (1024, 1024), (4096, 4096)]
BATCHES = [1, 32, 256]
THREADS = [1, 2]


@dataclass
class Ctx:
    M: int
    N: int
    weight: np.ndarray           # dense (M, N) float32
    chains: dict                 # structure -> (Chain, [float values])


@dataclass
class Backend:
    name: str
    build: object                # build(ctx) -> ModelProto | None
    flops: str = "dense"         # "dense" or a structure name (effective FLOPs use its nnz)


EXTRA_BACKENDS: list[Backend] = []


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    M, N = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "dense",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", M])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", N])],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def build_dense(ctx):
    return _matmul_model(ctx.weight)


def build_dyn_int8(ctx):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "m.onnx", Path(d) / "q.onnx"
        onnx.save(_matmul_model(ctx.weight), src)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return onnx.load(dst)


def build_nbits4(ctx):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if ctx.M % 32:
        return None
    q = MatMulNBitsQuantizer(_matmul_model(ctx.weight), bits=4, block_size=32, is_symmetric=True)
    q.process()
    return q.model.model


def build_ks(fmt, structure):
    def build(ctx):
        if structure not in ctx.chains:
            return None
        chain, vals = ctx.chains[structure]
        qs = [ops.quantize_factor(v, fmt, "column") for v in vals]
        return ops.make_ks_matmul_model(chain, [q for q, _ in qs], [s for _, s in qs])
    return build


def backends():
    out = [Backend("dense-fp32", build_dense), Backend("dyn-int8", build_dyn_int8), Backend("nbits4", build_nbits4)]
    for structure in ("monarch", "butterfly"):
        for fmt, tag in (("fp32", "fp32"), ("int8", "int8"), ("fp8-e4m3", "fp8")):
            out.append(Backend(f"ks-{tag}-{structure}", build_ks(fmt, structure), flops=structure))
    return out + EXTRA_BACKENDS


def butterfly_like(M, N):
    if M == N and M & (M - 1) == 0:
        return butterfly_chain(M)
    return chainable_chain(M, N, n_factors=min(len(prime_factors(M)), len(prime_factors(N))))


def make_ctx(M, N, rng):
    chains = {}
    for name, chain in (("monarch", monarch_chain(M, N)), ("butterfly", butterfly_like(M, N))):
        chains[name] = (chain, [v / np.sqrt(p.b) for v, p in zip(chain.random_values(rng), chain)])
    w = (rng.standard_normal((M, N)) / np.sqrt(M)).astype(np.float32)
    return Ctx(M, N, w, chains)


def time_session(sess, x, budget_s=0.25, min_runs=5, max_runs=200):
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    sess.run(None, feed)
    ts = []
    start = time.perf_counter()
    while len(ts) < max_runs and (len(ts) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def machine_line():
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    if simd:
        cpu += f" ({', '.join(simd)}; KS kernels: BFC_KS_ISA={os.environ.get('BFC_KS_ISA', 'auto')})"
    import onnxruntime as ort

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, onnxruntime {ort.__version__}, numpy {np.__version__}; "
            f"load average at start {load:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="MxN, e.g. 4096x4096")
    ap.add_argument("--batches", nargs="*", type=int, default=BATCHES)
    ap.add_argument("--threads", nargs="*", type=int, default=THREADS)
    ap.add_argument("--quick", action="store_true", help="only 1024x1024 and 4096x4096")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime.md"))
    args = ap.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else [(1024, 1024), (4096, 4096)] if args.quick else SHAPES)
    rng = np.random.default_rng(0)
    bks = backends()
    results = {}   # (M, N, batch, threads) -> {backend: ms}
    flops = {}
    for M, N in shapes:
        ctx = make_ctx(M, N, rng)
        models = {}
        for bk in bks:
            try:
                models[bk.name] = bk.build(ctx)
            except Exception as exc:  # a baseline that cannot be built is reported, not fatal
                print(f"[bench] {bk.name} {M}x{N}: cannot build ({exc})", file=sys.stderr)
                models[bk.name] = None
        flops[(M, N)] = {bk.name: (2 * M * N if bk.flops == "dense" else 2 * ctx.chains[bk.flops][0].nnz)
                         for bk in bks}
        for th in args.threads:
            sessions = {name: runtime.session(m, threads=th) for name, m in models.items() if m is not None}
            for B in args.batches:
                x = rng.standard_normal((B, M)).astype(np.float32)
                row = {name: time_session(s, x, args.budget) for name, s in sessions.items()}
                results[(M, N, B, th)] = row
                print(f"[bench] {M}x{N} B={B} threads={th}: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in row.items()), file=sys.stderr)
    write_report(args, shapes, bks, results, flops)


def write_report(args, shapes, bks, results, flops):
    names = [bk.name for bk in bks]
    cmd = "python bench/bench_runtime.py " + " ".join(sys.argv[1:])
    lines = ["# KSMatMul runtime benchmark", "",
             f"Command: `{cmd.strip()}`  ", f"Machine: {machine_line()}", "",
             "Median latency in ms per `session.run` (lower is better); in parentheses, effective GFLOP/s "
             "(dense columns: 2·B·M·N; KS columns: 2·B·nnz of their chain). `-`: not applicable.", ""]
    for M, N in shapes:
        lines += [f"## {M}x{N}", "", "| batch | threads | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for th in args.threads:
            for B in args.batches:
                row = results.get((M, N, B, th), {})
                cells = []
                for n in names:
                    if n not in row:
                        cells.append("-")
                    else:
                        gf = flops[(M, N)][n] * B / (row[n] * 1e6)
                        cells.append(f"{row[n]:.3f} ({gf:.1f})")
                lines.append(f"| {B} | {th} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += targets(results, flops)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"[bench] wrote {args.out}", file=sys.stderr)


def targets(results, flops):
    out = ["## Targets", ""]
    key = (4096, 4096, 32, 1)
    if key in results:
        r = results[key]
        ks = r.get("ks-int8-monarch")
        if ks:
            out.append(f"- 4096x4096 Monarch, batch 32, 1 thread: int8 custom op {ks:.3f} ms (target <= 0.6 ms); "
                       f"{r['dense-fp32'] / ks:.1f}x dense fp32 (target >= 40x), "
                       f"{r['dyn-int8'] / ks:.1f}x dynamic int8 (target >= 15x)")
    for (M, N, B, th), r in sorted(results.items()):
        if B < 32 or th != 1:
            continue
        f = flops[(M, N)]
        dense_gf = f["dense-fp32"] * B / (r["dense-fp32"] * 1e6)
        for s in ("monarch", "butterfly"):
            g = {fmt: f[f"ks-{fmt}-{s}"] * B / (r[f"ks-{fmt}-{s}"] * 1e6)
                 for fmt in ("fp32", "int8", "fp8") if f"ks-{fmt}-{s}" in r}
            if len(g) == 3:
                out.append(f"- {M}x{N} B={B} {s}: fp32 {g['fp32'] / dense_gf:.2f}x dense GFLOP/s (target >= 0.6), "
                           f"int8 {g['int8'] / dense_gf:.2f}x (target >= 1.2), fp8/fp32 {g['fp8'] / g['fp32']:.2f} "
                           f"(target >= 1)")
    for (M, N, B, th), r in sorted(results.items()):
        if B == 256 and th == 2 and (M, N, B, 1) in results:
            r1 = results[(M, N, B, 1)]
            sp = ", ".join(f"{n} {r1[n] / r[n]:.2f}x" for n in r if n.startswith("ks-"))
            out.append(f"- {M}x{N} B=256, 2 threads vs 1 (target >= 1.7x): {sp}")
    return out + [""]


if __name__ == "__main__":
    main()
