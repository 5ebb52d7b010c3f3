"""Faster than int8 end to end (issue 20): every "Done when" figure side by side in one run, 1 thread.

    python bench/bench_speed.py [--quick] [--write] [--work DIR] [--only SECTION ...]

Sections (each a table of medians of interleaved rounds, ratios within one process):
  1. rotation on ``ort``: x [1, 128, K] -> Kronecker rotation (``passes.rotation_emit``, 2 factors)
     -> MatMulNBits int4 block 64 accuracy level 4, vs MatMulNBits alone (384x1536, 1536x384);
     models from ``bench_rotation.build``.
  2. MiniLM-L6 (all-MiniLM-L6-v2, /root/.cache/bfc/minilm): onnxruntime ``quantize_dynamic`` (int8
     dynamic) vs bfc's default run (``bfc optimize model.onnx -o X --calibration calibration.npz``)
     on ``ort`` and with ``--target custom-op``; Monarch rank-4 int8 on the custom op
     (``models/configs/minilm-l6.toml``; no distillation: no --distill data); the rotated low-bit config
     (``models/configs/minilm-l6-lowbit.toml`` on custom-op, rotations not learned: RotateQuantize
     shared by Q/K/V) and
     the same model with every layer's rotation inside its own LowBitMatMul (one-node form, the
     previous emission) -- at 1x128 and 32x128 tokens (``bench_default.interleaved_latency``).
  3. KS kernel rate: Monarch rank-4 int8 KSMatMul vs ``quantize_dynamic``'s MatMulInteger on
     384-wide layers at 32 and 128 rows: multiply-adds per second (the KS chain's nonzeros, the
     dense layer's K*N) and their ratio.
  4. one-row GEMV 4096x4096: LowBitMatMul int4 / int2 vs int8 dynamic (``bench_gemv.bench_shape``),
     and weights streamed from memory (``bench_gemv.bench_cold``) against the measured one-thread
     read bandwidth (``bench_gemv.read_bandwidth``).
  5. ``models/synthetic_decoder.py`` (2 layers, hidden 1024, ffn 2816, vocab 8000): one-token
     decoding (input_ids [1, 1]) tokens per second of the fp32 model, int8 dynamic and bfc's default
     run (no calibration) on ``ort``.

Writes ``bench/results/speed.md`` and reassembles BENCHMARKS.md (``common.write_result``) with --write.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import bench_default as bd  # noqa: E402
import bench_gemv as gemv  # noqa: E402
import bench_rotation as brot  # noqa: E402
import bench_runtime as brt  # noqa: E402
from common import load_average, write_result  # noqa: E402

import bfc  # noqa: E402
from bfc import ops, runtime  # noqa: E402
from bfc.ks.chain import monarch_chain  # noqa: E402
from bfc.lowbit.kron_rotation import KroneckerRotation  # noqa: E402

MINILM = Path("/root/.cache/bfc/minilm")
SECTIONS = ("rotation", "gemv", "ks", "minilm", "decoder")  # --only keys, in the order they run
CONFIGS = ROOT / "models" / "configs"
DECODER = {"layers": 2, "hidden": 1024, "ffn": 2816, "vocab": 8000}

# the "Done when"
ROT_MAX = 1.10                   # rotated int4 on ort <= 1.10x MatMulNBits L4
DEFAULT_ORT_MIN = 1.0            # default model on ort: no slower than int8 dynamic (both shapes)
DEFAULT_COP_MIN = {"1x128": 1.2, "32x128": 1.3}
MONARCH_MIN = 1.4                # Monarch r4 int8 MiniLM on custom-op at 32x128
KS_RATE_MIN = 0.6                # KS multiply-add rate / int8 dynamic's, 384-wide, batch >= 32
GEMV_MIN = {4: 1.6, 2: 2.5}
BW_MIN = 0.60
# per variant: the minimum over interleaved rounds (of each round's median where a round repeats a call):
# on a shared machine the least-disturbed round is the one that measures the code, not the neighbours
STAT = min


def yes(ok: bool | None) -> str:
    return "(figure)" if ok is None else "yes" if ok else "**NO**"


# ---- 1. rotation on ort ------------------------------------------------------------------------
def rotation_section(rounds: int, repeats: int) -> tuple[list[str], list[tuple]]:
    rng = np.random.default_rng(1)
    lines = ["| layer (x 1x128) | MatMulNBits L4 ms | Kronecker rotation + MatMulNBits ms | ratio | rotation nodes |",
             "|---|---|---|---|---|"]
    checks = []
    for k, n in brot.SHAPES:
        models = {"nbits": brot.build(k, n, None), "rot": brot.build(k, n, KroneckerRotation.random(k, 0, n_factors=2))}
        sess = {name: runtime.session(m, threads=1) for name, m in models.items()}
        feeds = {"x": rng.standard_normal((1, brot.ROWS, k)).astype(np.float32)}
        for name in sess:                       # warm-up (prepacking, first-run allocations)
            runtime.latency_ms(sess[name], feeds, repeats=3)
        per = {name: [] for name in sess}
        for r in range(rounds):
            for name in (list(sess) if r % 2 == 0 else list(sess)[::-1]):
                per[name].append(runtime.latency_ms(sess[name], feeds, repeats=repeats))
        a, b = STAT(per["nbits"]), STAT(per["rot"])
        rot_nodes = len(models["rot"].graph.node) - len(models["nbits"].graph.node)
        lines.append(f"| {k}x{n} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {rot_nodes} |")
        checks.append((f"rotated int4 {k}x{n} on ort at 1x128 <= {ROT_MAX:.2f}x MatMulNBits L4", f"{b / a:.2f}x",
                       b / a <= ROT_MAX))
    return lines, checks


# ---- 2. MiniLM ---------------------------------------------------------------------------------
def unfuse_rotate_quantize(src: Path, dst: Path) -> int:
    """The one-node form of a model with RotateQuantize: each prequantized LowBitMatMul reads the
    RotateQuantize's X and rotation inputs and attributes itself (bfc.ops: the same function bit for
    bit); returns the number of LowBitMatMul nodes rewritten."""
    m = onnx.load(str(src))
    prod = {o: nd for nd in m.graph.node if nd.op_type == ops.ROTATE_QUANTIZE_OP_TYPE for o in nd.output}
    count = 0
    for nd in m.graph.node:
        if nd.op_type != ops.LOWBIT_OP_TYPE or nd.input[0] not in prod:
            continue
        rq = prod[nd.input[0]]
        ins = [rq.input[0], nd.input[1], nd.input[2], nd.input[3], *rq.input[1:]]
        del nd.input[:]
        nd.input.extend(ins)
        keep = [a for a in nd.attribute if a.name != "prequantized"]
        del nd.attribute[:]
        nd.attribute.extend(keep + [a for a in rq.attribute if a.name in ("rot_patterns", "rot_angles")])
        count += 1
    rqs = [nd for nd in m.graph.node if nd.op_type == ops.ROTATE_QUANTIZE_OP_TYPE]
    for nd in rqs:
        m.graph.node.remove(nd)
    onnx.save(m, str(dst))
    return count


def bfc_config_model(config: Path, target: str, out: Path, **overrides) -> Path:
    cfg = bfc.OptimizeConfig.from_toml(str(config), calibration=str(MINILM / "calibration.npz"), target=target,
                                       verify=False, **overrides)
    model, _ = bfc.optimize(str(MINILM / "model.onnx"), cfg)
    onnx.save(model, str(out))
    return out


def count_ops(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    ours = [n.op_type for n in m.graph.node if n.domain == ops.DOMAIN]
    kinds = {t: ours.count(t) for t in sorted(set(ours))}
    return ", ".join(f"{v} {k}" for k, v in kinds.items()) or "no ai.bfc nodes"


def minilm_section(work: Path, rounds: dict, log) -> tuple[list[str], list[tuple]]:
    bd.quiet_onnxruntime_quantization()
    src = MINILM / "model.onnx"
    paths = {"int8 dynamic (quantize_dynamic)": bd.build_qdyn(src, work / "qdyn.onnx")}
    t = time.perf_counter()
    bd.run_bfc(src, work / "default_ort.onnx", MINILM / "calibration.npz", work / "default_ort.log")
    paths["bfc default, ort"] = work / "default_ort.onnx"
    log(f"default ort {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    cmd = bd.bfc_command() + ["optimize", str(src), "-o", str(work / "default_cop.onnx"), "--calibration",
                              str(MINILM / "calibration.npz"), "--target", "custom-op"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bfc optimize --target custom-op failed: {proc.stderr[-500:]}")
    paths["bfc default, custom-op"] = work / "default_cop.onnx"
    log(f"default custom-op {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    paths["Monarch r4 int8, custom-op"] = bfc_config_model(CONFIGS / "minilm-l6.toml", "custom-op",
                                                           work / "monarch_cop.onnx")
    log(f"monarch {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    # the config's butterfly rotations unlearned (the randomized Hadamard-like butterfly: same nodes and
    # kernels, the learning only changes the angles and takes minutes)
    lb = bfc_config_model(CONFIGS / "minilm-l6-lowbit.toml", "custom-op", work / "lowbit_cop.onnx",
                          learn_rotation=False)
    paths["rotated 3-bit config, custom-op (shared RotateQuantize)"] = lb
    n_unf = unfuse_rotate_quantize(lb, work / "lowbit_cop_onenode.onnx")
    paths["same, one-node LowBitMatMul (rotation per layer)"] = work / "lowbit_cop_onenode.onnx"
    log(f"lowbit {time.perf_counter() - t:.0f} s ({n_unf} layers)")
    sessions = {name: bd.session(p, 1) for name, p in paths.items()}
    base = "int8 dynamic (quantize_dynamic)"
    res = {}
    for label, batch in bd.TOKEN_SHAPES:
        res[label] = bd.interleaved_latency(sessions, bd._token_feeds(batch), rounds[label], stat=STAT)
        log(f"minilm {label} done")
    lines = ["| model | ai.bfc nodes | 1x128 ms | speed vs int8 dynamic | 32x128 ms | speed vs int8 dynamic |",
             "|---|---|---|---|---|---|"]
    for name, p in paths.items():
        cells = []
        for label, _ in bd.TOKEN_SHAPES:
            ms = res[label][name]
            cells += [f"{ms:.1f}", f"{res[label][base] / ms:.2f}x"]
        lines.append(f"| {name} | {count_ops(p)} | " + " | ".join(cells) + " |")
    sp = {(name, label): res[label][base] / res[label][name] for name in paths for label, _ in bd.TOKEN_SHAPES}
    checks = []
    for label, _ in bd.TOKEN_SHAPES:
        v = sp[("bfc default, ort", label)]
        checks.append((f"MiniLM default on ort at {label}: no slower than int8 dynamic", f"{v:.2f}x",
                       v >= DEFAULT_ORT_MIN))
    for label, _ in bd.TOKEN_SHAPES:
        v = sp[("bfc default, custom-op", label)]
        checks.append((f"MiniLM default on custom-op at {label}: >= {DEFAULT_COP_MIN[label]}x int8 dynamic",
                       f"{v:.2f}x", v >= DEFAULT_COP_MIN[label]))
    v = sp[("Monarch r4 int8, custom-op", "32x128")]
    checks.append((f"Monarch r4 int8 MiniLM on custom-op at 32x128: >= {MONARCH_MIN}x int8 dynamic", f"{v:.2f}x",
                   v >= MONARCH_MIN))
    return lines, checks


# ---- 3. KS kernel rate ---------------------------------------------------------------------------
def ks_rate_section(rounds: int, repeats: int) -> tuple[list[str], list[tuple]]:
    bd.quiet_onnxruntime_quantization()
    rng = np.random.default_rng(3)
    lines = ["| layer | rows | int8 dynamic ms | KS Monarch r4 int8 ms | int8 dynamic GMAC/s | KS GMAC/s (nonzeros) "
             "| KS rate / int8 dynamic's |", "|---|---|---|---|---|---|---|"]
    checks = []
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        chain = monarch_chain(k, n, rank=4)
        vals = [v / np.sqrt(p.b) for v, p in zip(chain.random_values(rng), chain)]
        qs = [ops.quantize_factor(v, "int8", "column") for v in vals]
        ks = ops.make_ks_matmul_model(chain, [q for q, _ in qs], [s for _, s in qs], onnx_opset=21)
        ctx = brt.Ctx(k, n, (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), {})
        dyn = brt.build_dyn_int8(ctx)
        nnz = sum(p.a * p.b * p.c * p.d for p in chain)
        sess = {"dyn": runtime.session(dyn, threads=1), "ks": runtime.session(ks, threads=1)}
        for rows in (32, 128):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            per = {name: [] for name in sess}
            for s in sess.values():
                runtime.latency_ms(s, {s.get_inputs()[0].name: x}, repeats=3)
            for r in range(rounds):
                for name in (list(sess) if r % 2 == 0 else list(sess)[::-1]):
                    s = sess[name]
                    per[name].append(runtime.latency_ms(s, {s.get_inputs()[0].name: x}, repeats=repeats))
            a, b = STAT(per["dyn"]), STAT(per["ks"])
            rd, rk = rows * k * n / (a * 1e-3) / 1e9, rows * nnz / (b * 1e-3) / 1e9
            lines.append(f"| {k}x{n} | {rows} | {a:.3f} | {b:.3f} | {rd:.1f} | {rk:.1f} | {rk / rd:.2f} |")
            checks.append((f"KS rate {k}x{n} at {rows} rows >= {KS_RATE_MIN} of int8 dynamic's", f"{rk / rd:.2f}",
                           rk / rd >= KS_RATE_MIN))
    return lines, checks


# ---- 4. GEMV -------------------------------------------------------------------------------------
def gemv_section(tmp: Path, rounds: int, repeats: int, cold_gb: float) -> tuple[list[str], list[tuple]]:
    rng = np.random.default_rng(4)
    k, n = gemv.SHAPES[0]
    bw = gemv.read_bandwidth(tmp)
    hot = gemv.bench_shape(k, n, [1], rounds, repeats, tmp, rng)[1]
    cold = gemv.bench_cold(k, n, rng, tmp, cold_gb * 1e9, 5)
    base_h, base_c = hot["ort int8 dynamic"][0], cold["ort int8 dynamic"][0]
    lines = [f"One-thread read bandwidth (1 GB array): {bw['read']:.1f} GB/s.", "",
             "| variant (4096x4096, 1 row) | hot us | speed vs int8 dynamic | cold us (weights from memory) | "
             "speed vs int8 dynamic | cold GB/s of weights | of read bandwidth |", "|---|---|---|---|---|---|---|"]
    for name in ("ort int8 dynamic", "bfc int4", "bfc int3", "bfc int2"):
        hu, nb = hot[name]
        cu = cold[name][0]
        gbs = nb / (cu * 1e-6) / 1e9
        lines.append(f"| {name} | {hu:.0f} | {base_h / hu:.2f}x | {cu:.0f} | {base_c / cu:.2f}x | {gbs:.1f} | "
                     f"{gbs / bw['read']:.0%} |")
    checks = []
    for bits in (4, 2):
        name = f"bfc int{bits}"
        sh, sc = base_h / hot[name][0], base_c / cold[name][0]
        checks.append((f"one row 4096x4096 LowBitMatMul int{bits} >= {GEMV_MIN[bits]}x int8 dynamic (hot / cold)",
                       f"{sh:.2f}x / {sc:.2f}x", min(sh, sc) >= GEMV_MIN[bits]))
    fr = min(cold[f"bfc int{b}"][1] / (cold[f"bfc int{b}"][0] * 1e-6) / 1e9 for b in (4, 2)) / bw["read"]
    checks.append((f"weights streamed (cold, int4 and int2) >= {BW_MIN:.0%} of read bandwidth", f"{fr:.0%}",
                   fr >= BW_MIN))
    return lines, checks


# ---- 5. decoder tokens/s -------------------------------------------------------------------------
def decoder_section(work: Path, rounds: int, log) -> tuple[list[str], list[tuple]]:
    src = work / "decoder.onnx"
    subprocess.run([sys.executable, str(ROOT / "models" / "synthetic_decoder.py"), str(src)]
                   + [f"--{k}={v}" for k, v in DECODER.items()], check=True, capture_output=True)
    bd.quiet_onnxruntime_quantization()
    paths = {"fp32": src, "int8 dynamic (quantize_dynamic)": bd.build_qdyn(src, work / "decoder_qdyn.onnx")}
    t = time.perf_counter()
    _, said = bd.run_bfc(src, work / "decoder_bfc.onnx", None, work / "decoder_bfc.log")
    paths["bfc default (no calibration), ort"] = work / "decoder_bfc.onnx"
    log(f"decoder default {time.perf_counter() - t:.0f} s")
    sessions = {name: bd.session(p, 1) for name, p in paths.items()}
    feeds = {"input_ids": np.array([[42]], np.int64)}
    ms = bd.interleaved_latency(sessions, feeds, rounds, stat=STAT)
    lines = [f"Decoder: {', '.join(f'{k} {v}' for k, v in DECODER.items())}; one token, no KV cache (the graph "
             "has none): one forward of input_ids [1, 1].  bfc: " + said, "",
             "| model | ms per token | tokens/s | vs int8 dynamic |", "|---|---|---|---|"]
    base = ms["int8 dynamic (quantize_dynamic)"]
    for name in paths:
        lines.append(f"| {name} | {ms[name]:.2f} | {1e3 / ms[name]:.0f} | {base / ms[name]:.2f}x |")
    v = 1e3 / ms["bfc default (no calibration), ort"]
    return lines, [("synthetic decoder tokens/s, one-token decoding, bfc default", f"{v:.0f} tokens/s", None)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about half the time)")
    ap.add_argument("--write", action="store_true", help="write bench/results/speed.md and BENCHMARKS.md")
    ap.add_argument("--work", type=Path, default=None, help="folder for the built models (default: a temporary one)")
    ap.add_argument("--cold-gb", type=float, default=0.5, help="weights per cold GEMV round in GB")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                    help="run only these sections (not with --write: the results file holds every section)")
    args = ap.parse_args(argv)
    if args.only and args.write:
        ap.error("--only measures a subset of the sections; --write needs them all")
    q = args.quick
    start = time.perf_counter()
    load0 = load_average()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    sections, checks = [], []
    with tempfile.TemporaryDirectory() as td:
        work = args.work or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        for key, title, fn in (
                ("rotation", "Rotation on the ort target (Kronecker, 2 factors) vs MatMulNBits int4 accuracy level 4",
                 lambda: rotation_section(6 if q else 12, 10)),
                ("gemv", "One row, 4096x4096: LowBitMatMul vs int8 dynamic (MatMulInteger)",
                 lambda: gemv_section(Path(td), 6 if q else 12, 20, args.cold_gb)),
                ("ks", "KS kernel rate: Monarch r4 int8 vs int8 dynamic on 384-wide layers",
                 lambda: ks_rate_section(4 if q else 8, 10)),
                ("minilm", "MiniLM-L6 end to end",
                 lambda: minilm_section(work, {"1x128": 20 if q else 40, "32x128": 4 if q else 8}, log)),
                ("decoder", "Synthetic decoder: one-token decoding",
                 lambda: decoder_section(work, 20 if q else 40, log))):
            if args.only and key not in args.only:
                continue
            log(f"start: {title}")
            lines, ch = fn()
            sections.append(f"### {title}\n\n" + "\n".join(lines))
            checks += ch
            print(sections[-1], flush=True)
    secs = time.perf_counter() - start
    head = (f"All figures from one process, 1 intra-op thread; each variant's time is the minimum over interleaved "
            f"rounds (of the round's median where a round repeats the call; GEMV: bench_gemv's medians).  The machine was "
            f"shared with other engineers' jobs (2 cores): load average {load0} at the start, {load_average()} at "
            f"the end; ratios are side by side, absolute times move with the load.  Library "
            f"`{runtime.library_path()}`.  Total {secs:.0f} s.")
    tgt = ["### Done when (issue 20)", "", "| target | measured | met |", "|---|---|---|"]
    tgt += [f"| {name} | {val} | {yes(ok)} |" for name, val, ok in checks]
    body = head + "\n\n" + "\n\n".join(["\n".join(tgt)] + sections)
    cmd = ("python bench/bench_speed.py" + (" --quick" if q else "") + (" --write" if args.write else "")
           + (" --only " + " ".join(args.only) if args.only else ""))
    print(body)
    if args.write:
        write_result("speed", "Faster than int8 end to end (issue 20)", cmd, body)
        print("wrote bench/results/speed.md and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    sys.exit(main())
