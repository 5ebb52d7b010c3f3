"""MiniLM-L6 below 8 bits: bfc's rotated low-bit layers vs onnxruntime MatMulNBits (STS-B dev, bytes).

    python bench/bench_minilm_lowbit.py [--only NAME ...] [--limit N]   # results cached in --work
    python bench/bench_minilm_lowbit.py --write                          # bench/results/minilm_lowbit.md

Variants: fp32; onnxruntime int8 dynamic (the byte reference: linear-weight bytes relative to
it, ``bfc.study.baselines.linear_bytes``); onnxruntime MatMulNBits RTN (MatMulNBitsQuantizer,
symmetric) 4 bits block 32/64/128 and 2 bits block 32/64/128, HQQ (asymmetric) 4 and 2 bits
block 32/64/128, GPTQ (symmetric, the calibration below) 4 bits block 32/128; bfc ``structure=rotated`` with a
learned butterfly rotation per input tensor + GPTQ on the 48-sentence calibration
(models/minilm.calibration_path()), every weight MatMul rewritten (no error budget), on the
ort target (MatMulNBits for 2/4 bits) and the portable target (standard ops).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))
from bench_minilm import stsb  # noqa: E402
from common import write_result  # noqa: E402

import bfc  # noqa: E402
from bfc.study.baselines import int8_dynamic, linear_bytes, nbits  # noqa: E402

BFC_COMMON = {"structure": "rotated", "learn_rotation": True, "max_error": 10.0, "max_output_error": None,
              "min_size": 4096, "verify": False}
BFC = {f"bfc rotated int{b} g{g} ({t})": {"bits": b, "group_size": g, "target": t}
       for b, g in ((4, 64), (4, 128), (3, 64), (3, 128), (2, 64), (2, 128)) for t in ("ort", "portable")}
ORT = {"ort MatMulNBits int4 b32": (4, 32), "ort MatMulNBits int4 b64": (4, 64),
       "ort MatMulNBits int4 b128": (4, 128), "ort MatMulNBits int2 b32": (2, 32), "ort MatMulNBits int2 b64": (2, 64),
       "ort MatMulNBits int2 b128": (2, 128)}
# onnxruntime's other MatMulNBitsQuantizer algorithms: HQQ (asymmetric, fp32 zero points), GPTQ (calibration .npz)
ORT_ALGO = {**{f"ort MatMulNBits HQQ int4 b{b}": (4, b, "hqq") for b in (32, 64, 128)},
            **{f"ort MatMulNBits HQQ int2 b{b}": (2, b, "hqq") for b in (32, 64, 128)},
            **{f"ort MatMulNBits GPTQ int4 b{b}": (4, b, "gptq") for b in (32, 128)}}


def build(name, src, calib, work: Path, config_file=None) -> tuple[Path, str]:
    out = work / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
    if name == "fp32":
        return src, ""
    if name == "ort int8 dynamic":
        return int8_dynamic(src, out), ""
    if name in ORT:
        bits, block = ORT[name]
        return nbits(src, out, bits=bits, block_size=block), ""
    if name in ORT_ALGO:
        bits, block, algo = ORT_ALGO[name]
        return nbits(src, out, bits=bits, block_size=block, algorithm=algo,
                     calibration=calib if algo == "gptq" else None), ""
    if config_file is not None:
        cfg = bfc.OptimizeConfig.from_toml(config_file, calibration=str(calib), verify=False, target=BFC[name]["target"]) \
            if name in BFC else bfc.OptimizeConfig.from_toml(config_file, calibration=str(calib), verify=False)
    else:
        cfg = bfc.OptimizeConfig(calibration=calib, **BFC_COMMON, **BFC[name])
    t = time.perf_counter()
    bfc.optimize(str(src), cfg, output=out)
    return out, f"{time.perf_counter() - t:.0f} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="variant names (default all)")
    ap.add_argument("--config", type=Path, help="also run this TOML config (variant 'config <name>')")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bfc-minilm-lowbit"))
    ap.add_argument("--write", action="store_true", help="write bench/results/minilm_lowbit.md from the cache")
    args = ap.parse_args(argv)
    import minilm
    src, calib = Path(minilm.onnx_path()), Path(minilm.calibration_path())
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "results.json"
    res = json.loads(cache.read_text()) if cache.exists() else {}
    original = onnx.load(str(src))
    names = ["fp32", "ort int8 dynamic", *ORT, *ORT_ALGO, *BFC]
    if args.config is not None:
        names.append(f"config {args.config.name} (ort)")
        BFC[names[-1]] = {"target": "ort"}
        names.append(f"config {args.config.name} (portable)")
        BFC[names[-1]] = {"target": "portable"}
    if not args.write:
        for name in names:
            if args.only is not None and name not in args.only and not (args.config and name.startswith("config")):
                continue
            path, secs = build(name, src, calib, args.work, args.config if name.startswith("config") else None)
            score = stsb(path, args.limit)
            res = json.loads(cache.read_text()) if cache.exists() else {}
            res[name] = {"stsb": score, "bytes": linear_bytes(original, onnx.load(str(path))), "build": secs,
                         "pairs": args.limit or 1500}
            cache.write_text(json.dumps(res, indent=1))
            print(name, res[name], flush=True)
        return 0
    ref = res["ort int8 dynamic"]["bytes"]
    lines = ["| model | STS-B dev Spearman | linear-weight bytes | vs int8 dynamic | bfc optimize time |",
             "|---|---|---|---|---|"]
    for name, r in sorted(res.items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"| {name} | {r['stsb']:.2f} | {r['bytes'] / 1e6:.3f} MB | {r['bytes'] / ref:.3f}x | "
                     f"{r['build'] or '-'} |")
    note = ("STS-B dev: 1500 pairs, mean pooling + cosine, Spearman x100.  Linear-weight bytes: every initializer "
            "a variant adds or changes (codes, scales, rotation angles/blocks, shape constants), "
            "``bfc.study.baselines.linear_bytes``.  bfc: `structure=rotated`, learned butterfly rotation (100 Adam "
            "steps) per input tensor (Q/K/V share one), GPTQ with the calibration Gram, fp16 group scales, no "
            "correction (no error budget: correction_rank 0 only adds one when it is the cheapest way to meet "
            "max-error), all 36 weight MatMuls rewritten.  ort target: MatMulNBits (accuracy_level 0) for 2/4 bits, "
            "in-graph unpacking for 3 bits; portable: in-graph unpacking of the packed codes (opset 20).  "
            "onnxruntime MatMulNBits: MatMulNBitsQuantizer RTN, symmetric, fp32 scales; HQQ: onnxruntime's "
            "HQQWeightOnlyQuantConfig (asymmetric: fp32 scales + fp32 zero points per block, so b32 costs more "
            "bytes than RTN b32); GPTQ: GPTQWeightOnlyQuantConfig (symmetric) on the same 48 calibration "
            "sentences.  onnxruntime 1.32's GPTQ (bundled neural-compressor numpy code) propagates the rounding "
            "error through the lower triangle of an upper-triangular Cholesky factor, i.e. not at all: its "
            "weights equal RTN's on GPTQ's own grid, then re-rounded onto MatMulNBits' symmetric grid, hence "
            "below RTN.")
    write_result("minilm_lowbit", "MiniLM-L6 below 8 bits (rotated low-bit vs MatMulNBits)",
                 "python bench/bench_minilm_lowbit.py && python bench/bench_minilm_lowbit.py --write",
                 "\n".join(lines) + "\n\n" + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
