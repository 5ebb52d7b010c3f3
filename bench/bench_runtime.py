"""Latency of bfc's ai.bfc.KSMatMul custom op vs onnxruntime baselines, side by side.

    python bench/bench_runtime.py                 # full grid -> bench/results/runtime.md
    python bench/bench_runtime.py --quick         # 1024x1024 and 4096x4096, batches 1 32 256 only
    python bench/bench_runtime.py --shapes 4096x4096 --batches 32 --threads 1

Columns (one onnxruntime session each, same input, same thread count):
  dense-fp32   MatMul with a dense fp32 weight (the unfactorized layer)
  dyn-int8     onnxruntime.quantization.quantize_dynamic(weight_type=QInt8) of that MatMul
  nbits4       com.microsoft MatMulNBits, 4-bit RTN, block 32 (MatMulNBitsQuantizer), accuracy_level 0
               (float activations)
  nbits4-L4    the same with accuracy_level 4 (int8 activations, int8 dot products)
  ks-<fmt>-<structure>  one KSMatMul node (fp32 / int8 / fp8-e4m3 values, absmax per-column
               scales) for a Monarch chain and a butterfly(-like) chain of the same shape, kernels
               chosen by BFC_KS_ISA (auto: avx512 where the CPU has AVX-512 VNNI)
  ks-int8-monarch@avx2  the same int8 Monarch node forced onto the AVX2 kernels (BFC_KS_ISA=avx2),
               so the VNNI gain is measured side by side
  ks-fp8-monarch@fp32  the fp8 Monarch node with BFC_KS_ISA=avx512: weights decoded to float32, float32
               activations (ks-fp8-* under auto run AVX512_BF16 dot products where the CPU has them)
  lowbit-rot-int4  one ai.bfc.LowBitMatMul: butterfly rotation (fused) + int4 weights, group 32, per-row
               int8 activations (VNNI); effective GFLOP/s count the dense 2·B·M·N (its rotation is extra)
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
from bfc.factorize import relative_error  # noqa: E402
from bfc.ks.chain import butterfly_chain, chainable_chain, monarch_chain, prime_factors  # noqa: E402

SHAPES = [(384, 1536), (1536, 384), (768, 3072), (1024, 1024), (4096, 4096)]
BATCHES = [1, 32, 128, 256]
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
    isa: str | None = None       # BFC_KS_ISA while its session is created (None: the caller's setting)


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


def build_nbits4(ctx, level=0):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if ctx.M % 32:
        return None
    q = MatMulNBitsQuantizer(_matmul_model(ctx.weight), bits=4, block_size=32, is_symmetric=True,
                             accuracy_level=level)
    q.process()
    return q.model.model


def build_nbits4_l4(ctx):
    return build_nbits4(ctx, 4)


def build_lowbit(ctx):
    """Rotated int4 (RTN of Q^T W per group of 32 rows, fp16 scales) as one LowBitMatMul node."""
    from bfc.lowbit import ButterflyRotation, LowBitFormat, quantize_groups
    rot = ButterflyRotation.hadamard_like(ctx.M, 0)
    gq = quantize_groups(rot.rotate_weight(ctx.weight), LowBitFormat(4, 32, True, "float16"), method="rtn")
    return ops.make_lowbit_matmul_model(gq.codes(), gq.scales, bits=4, group_size=gq.group_size,
                                        rot_values=[np.asarray(v, np.float32) for v in rot.values],
                                        rot_patterns=rot.chain, onnx_opset=21)


def build_ks(fmt, structure):
    def build(ctx):
        if structure not in ctx.chains:
            return None
        chain, vals = ctx.chains[structure]
        qs = [ops.quantize_factor(v, fmt, "column") for v in vals]
        return ops.make_ks_matmul_model(chain, [q for q, _ in qs], [s for _, s in qs], onnx_opset=21)
    return build


def backends():
    out = [Backend("dense-fp32", build_dense), Backend("dyn-int8", build_dyn_int8), Backend("nbits4", build_nbits4),
           Backend("nbits4-L4", build_nbits4_l4), Backend("lowbit-rot-int4", build_lowbit)]
    for structure in ("monarch", "butterfly"):
        for fmt, tag in (("fp32", "fp32"), ("int8", "int8"), ("fp8-e4m3", "fp8")):
            out.append(Backend(f"ks-{tag}-{structure}", build_ks(fmt, structure), flops=structure))
    out.append(Backend("ks-int8-monarch@avx2", build_ks("int8", "monarch"), flops="monarch", isa="avx2"))
    out.append(Backend("ks-fp8-monarch@fp32", build_ks("fp8-e4m3", "monarch"), flops="monarch", isa="avx512"))
    return out + EXTRA_BACKENDS


def ks_isa(isa: str | None = None) -> str:
    """The KS kernel ISA a session created now runs (the library's BfcKsIsa), '?' if unknown."""
    import ctypes

    old = os.environ.get("BFC_KS_ISA")
    try:
        if isa is not None:
            os.environ["BFC_KS_ISA"] = isa
        fn = ctypes.CDLL(str(runtime.library_path())).BfcKsIsa
        fn.restype = ctypes.c_char_p
        return fn().decode() or "?"
    except Exception:  # noqa: BLE001 - an older library without the symbol
        return "?"
    finally:
        if old is None:
            os.environ.pop("BFC_KS_ISA", None)
        else:
            os.environ["BFC_KS_ISA"] = old


def make_session(model, threads, isa):
    if isa is None:
        return runtime.session(model, threads=threads)
    old = os.environ.get("BFC_KS_ISA")
    os.environ["BFC_KS_ISA"] = isa
    try:
        return runtime.session(model, threads=threads)
    finally:
        if old is None:
            os.environ.pop("BFC_KS_ISA", None)
        else:
            os.environ["BFC_KS_ISA"] = old


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
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
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
    ap.add_argument("--batches", nargs="*", type=int, default=None)
    ap.add_argument("--threads", nargs="*", type=int, default=THREADS)
    ap.add_argument("--quick", action="store_true", help="only 1024x1024 and 4096x4096")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime.md"))
    args = ap.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else [(1024, 1024), (4096, 4096)] if args.quick else SHAPES)
    if args.batches is None:
        args.batches = [1, 32, 256] if args.quick else BATCHES
    rng = np.random.default_rng(0)
    bks = backends()
    if ks_isa("avx2") == "?":  # no AVX2 build or CPU: the forced columns cannot run
        bks = [bk for bk in bks if bk.isa is None]
    elif ks_isa("avx512") == "?":
        bks = [bk for bk in bks if bk.isa != "avx512"]
    results = {}   # (M, N, batch, threads) -> {backend: ms}
    flops = {}
    fp8_acc = {}   # (M, N) -> {path: relative error}
    for M, N in shapes:
        ctx = make_ctx(M, N, rng)
        models = {}
        for bk in bks:
            try:
                models[bk.name] = bk.build(ctx)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
                print(f"[bench] {bk.name} {M}x{N}: cannot build ({exc})", file=sys.stderr)
                models[bk.name] = None
        flops[(M, N)] = {bk.name: (2 * M * N if bk.flops == "dense" else 2 * ctx.chains[bk.flops][0].nnz)
                         for bk in bks}
        if models.get("ks-fp8-monarch") is not None and models.get("ks-fp8-monarch@fp32") is not None:
            fp8_acc[(M, N)] = fp8_accuracy(ctx, models["ks-fp8-monarch"], rng)
        for th in args.threads:
            isas = {bk.name: bk.isa for bk in bks}
            sessions = {name: make_session(m, th, isas[name]) for name, m in models.items() if m is not None}
            for B in args.batches:
                x = rng.standard_normal((B, M)).astype(np.float32)
                row = {name: time_session(s, x, args.budget) for name, s in sessions.items()}
                results[(M, N, B, th)] = row
                print(f"[bench] {M}x{N} B={B} threads={th}: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in row.items()), file=sys.stderr)
    write_report(args, shapes, bks, results, flops, fp8_acc)


def fp8_accuracy(ctx, model, rng, rows=64):
    """Relative error of the fp8 Monarch node's two paths (auto: AVX512_BF16 where present; avx512: fp32
    decode) against the float64 product of the same dequantized factors, and bf16 vs fp32 decode."""
    chain, vals = ctx.chains["monarch"]
    qs = [ops.quantize_factor(v, "fp8-e4m3", "column") for v in vals]
    factors = [t for q, s in qs for t in (q, s)]
    x = rng.standard_normal((rows, ctx.M)).astype(np.float32)
    ref = ops.ks_matmul_reference(x, None, factors, chain, emulate_int8=False).astype(np.float64)
    ys = {isa: make_session(model, 1, isa).run(None, {"X": x})[0].astype(np.float64)
          for isa in ("auto", "avx512")}
    return {"isa": ks_isa(), "bf16": relative_error(ref, ys["auto"]), "fp32": relative_error(ref, ys["avx512"]),
            "bf16_vs_fp32": relative_error(ys["avx512"], ys["auto"])}


def write_report(args, shapes, bks, results, flops, fp8_acc=None):
    names = [bk.name for bk in bks]
    cmd = ("python bench/bench_runtime.py " + " ".join(sys.argv[1:])).strip()
    auto = ks_isa()
    isa_of = {bk.name: (ks_isa(bk.isa) if bk.isa else auto) for bk in bks if bk.name.startswith("ks-")}
    lines = [f"KS machine: {machine_line()}", "",
             "ISA of each bfc column: " + ", ".join(f"{n} {isa_of[n]}" for n in names if n in isa_of) +
             ". With avx512 the int8 big-block factors run the VNNI kernels (vpdpbusd) and gather/scatter use "
             "16x16 zmm transposes; float32 factors, small blocks (b, c <= 4) and (with avx512) fp8 factors run the AVX2 kernels; with "
             "avx512bf16 (the default where the CPU has AVX512_BF16) big-block fp8 factors run vdpbf16ps on bf16 activations "
             "(int8 results are bit-identical on every ISA).", "",
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
    if fp8_acc:
        lines += ["## fp8 (e4m3) Monarch: accuracy of the two kernel paths", "",
                  "Relative error ||y - y_ref|| / ||y_ref|| against the float64 product of the same dequantized "
                  "factors, 64 random rows (the same model as the ks-fp8-monarch columns).", "",
                  "| shape | auto path | bf16 activations (vdpbf16ps) | fp32 decode (BFC_KS_ISA=avx512) | "
                  "bf16 vs fp32 decode |", "|---|---|---|---|---|"]
        for (M, N), a in fp8_acc.items():
            lines.append(f"| {M}x{N} | {a['isa']} | {a['bf16']:.2e} | {a['fp32']:.2e} | {a['bf16_vs_fp32']:.2e} |")
        lines.append("")
    lines += targets(results, flops)
    if Path(args.out).resolve() == (ROOT / "bench" / "results" / "runtime.md").resolve():
        sys.path.insert(0, str(ROOT / "bench"))
        from common import write_result

        write_result("runtime", "Native KSMatMul kernels", cmd, "\n".join(lines))
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Native KSMatMul kernels\n\nCommand: `{cmd}`\n\n" + "\n".join(lines) + "\n")
    print(f"[bench] wrote {args.out}", file=sys.stderr)


def targets(results, flops):
    """The issue's targets, each computed from cells of this run."""
    out = ["## Targets (from this run)", ""]

    def gf(r, f, n, B):
        return f[n] * B / (r[n] * 1e6) if n in r else None

    for th in sorted({k[3] for k in results}):
        key = (4096, 4096, 32, th)
        if key in results and "ks-int8-monarch" in results[key]:
            r = results[key]
            ks = r["ks-int8-monarch"]
            out.append(f"- 4096x4096 Monarch int8, batch 32, {th} thread(s): {ks:.3f} ms, "
                       f"{r['dyn-int8'] / ks:.1f}x faster than onnxruntime int8 dynamic (target >= 15x), "
                       f"{r['dense-fp32'] / ks:.1f}x dense fp32")
    for (M, N, B, th), r in sorted(results.items()):
        if B < 32 or "dyn-int8" not in r:
            continue
        f = flops[(M, N)]
        dyn = gf(r, f, "dyn-int8", B)
        parts = []
        for n in ("ks-int8-monarch", "ks-int8-monarch@avx2"):
            g = gf(r, f, n, B)
            if g is not None:
                parts.append(f"{n} {g:.0f} GFLOP/s = {g / dyn:.2f}x")
        if parts:
            out.append(f"- {M}x{N} B={B} T={th}: onnxruntime int8 dynamic {dyn:.0f} GFLOP/s; " + "; ".join(parts) +
                       " (target: int8 Monarch >= 0.60x)")
    for (M, N, B, th), r in sorted(results.items()):
        if "lowbit-rot-int4" in r and "nbits4-L4" in r:
            out.append(f"- {M}x{N} B={B} T={th}: rotated int4 LowBitMatMul (rotation included) "
                       f"{r['lowbit-rot-int4']:.3f} ms = {r['nbits4-L4'] / r['lowbit-rot-int4']:.2f}x the speed of "
                       f"MatMulNBits acc-4 ({r['nbits4-L4']:.3f} ms; target >= 1.0x), "
                       f"{r['nbits4'] / r['lowbit-rot-int4']:.2f}x acc-0")
        if "ks-fp8-monarch" in r and "ks-fp8-monarch@fp32" in r:
            out.append(f"- {M}x{N} B={B} T={th}: fp8 Monarch bf16 path {r['ks-fp8-monarch']:.3f} ms vs fp32 decode "
                       f"{r['ks-fp8-monarch@fp32']:.3f} ms = {r['ks-fp8-monarch@fp32'] / r['ks-fp8-monarch']:.2f}x")
    out.append(f"- 2 threads vs 1 below: the machine has {os.cpu_count()} logical CPUs shared with other jobs "
               f"(load average {os.getloadavg()[0]:.2f} at the end of the run); with both cores busy a second "
               "intra-op thread only waits for a core, so these ratios measure the load, not the work split "
               "(KS: chunks of output blocks per factor, tiles for gather/scatter; LowBitMatMul: 32-output "
               "blocks x 64-row chunks)")
    for (M, N, B, th), r in sorted(results.items()):
        if B >= 32 and th == 2 and (M, N, B, 1) in results:
            r1 = results[(M, N, B, 1)]
            sp = ", ".join(f"{n} {r1[n] / r[n]:.2f}x" for n in r if n.startswith("ks-") and n in r1)
            out.append(f"- {M}x{N} B={B}, 2 threads vs 1 (target >= 1.7x): {sp}")
    return out + [""]


if __name__ == "__main__":
    main()
