"""MiniLM-L6 end to end: latency (1 thread) and STS-B dev Spearman, side by side in one run.

    python bench/bench_minilm.py [--config models/configs/minilm-l6.toml] [--limit N]

Variants: the fp32 export, onnxruntime int8 dynamic quantization, MatMulNBits int4, and
bfc with the given config on the portable and the custom-op targets.  Latency: median
of repeated runs at batch 1 x seq 128 and 32 x 128, intra-op threads = 1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))
from common import write_result  # noqa: E402
from eval_sts import load_stsb  # noqa: E402  (models/: $BFC_STSB or the shared data folder)

import bfc  # noqa: E402
from bfc.runtime import latency_ms, session  # noqa: E402
from bfc.study.baselines import int4_nbits, int8_dynamic, linear_bytes  # noqa: E402
from bfc.study.evaluators import _tokenizer, encode_sentences, spearman  # noqa: E402


def stsb(path: Path, limit: int | None, half: str | None = None) -> float:
    """STS-B dev Spearman x100 (mean pooling + cosine), library registered for ai.bfc nodes; ``half``: the
    tuning or held-out half of ``models/stsb_split.py`` (None: all of dev)."""
    s1, s2, gold = load_stsb(half=half)
    if limit:
        s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    uniq = sorted(set(s1) | set(s2))
    pos = {s: i for i, s in enumerate(uniq)}
    emb = encode_sentences(session(str(path), threads=1), _tokenizer(None), uniq)
    a, b = emb[[pos[s] for s in s1]], emb[[pos[s] for s in s2]]
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)
    return 100.0 * spearman(cos, np.asarray(gold))


def feeds(batch: int, seq: int = 128) -> dict:
    """The latency input: ``batch`` x ``seq`` tokens (one repeated word id, full attention mask)."""
    return {"input_ids": np.full((batch, seq), 1037, np.int64), "attention_mask": np.ones((batch, seq), np.int64)}


def latency(path: Path, batch: int, seq: int = 128, repeat: int = 20) -> float:
    return latency_ms(session(str(path), threads=1), feeds(batch, seq), repeats=repeat)


def bfc_model(src: Path, calib: Path, config: str, target: str, out: Path) -> Path:
    """``bfc.optimize`` of ``src`` with the TOML ``config`` on ``target`` (no verification), saved to ``out``."""
    cfg = bfc.OptimizeConfig.from_toml(config, calibration=str(calib), target=target, verify=False)
    t = time.perf_counter()
    model, _ = bfc.optimize(str(src), cfg)
    onnx.save(model, str(out))
    print(f"bfc optimize ({target}): {time.perf_counter() - t:.1f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "models" / "configs" / "minilm-l6.toml"))
    ap.add_argument("--limit", type=int, default=None, help="STS-B pairs to evaluate (default all 1500)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    import minilm
    src = Path(minilm.onnx_path())
    calib = Path(minilm.calibration_path())
    work = Path(tempfile.mkdtemp(prefix="bfc-bench-minilm-"))
    variants = {"fp32": src,
                "ort int8 dynamic": int8_dynamic(src, work / "int8.onnx"),
                "ort MatMulNBits int4": int4_nbits(src, work / "int4.onnx")}
    for target in ("portable", "custom-op"):
        variants[f"bfc {target}"] = bfc_model(src, calib, args.config, target, work / f"bfc-{target}.onnx")
    original = onnx.load(str(src))
    int8_bytes = linear_bytes(original, onnx.load(str(variants["ort int8 dynamic"])))
    rows = []
    for name, path in variants.items():
        score = stsb(path, args.limit)
        lb = linear_bytes(original, onnx.load(str(path)))
        l1, l32 = latency(path, 1, repeat=args.repeat), latency(path, 32, repeat=max(3, args.repeat // 4))
        rows.append((name, score, lb, lb / int8_bytes, l1, l32))
        print(rows[-1], flush=True)
    base1 = dict((r[0], r[4]) for r in rows)
    lines = ["| model | STS-B dev Spearman | linear-weight bytes | vs int8 dynamic | latency 1x128 (ms) | "
             "latency 32x128 (ms) | speed-up vs int8 dynamic (1x128) |", "|---|---|---|---|---|---|---|"]
    for name, score, lb, rel, l1, l32 in rows:
        lines.append(f"| {name} | {score:.2f} | {lb / 1e6:.2f} MB | {rel:.3f}x | {l1:.2f} | {l32:.1f} | "
                     f"{base1['ort int8 dynamic'] / l1:.2f}x |")
    note = (f"Config: `{Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config}`"
            f" with the 48-sentence calibration of models/minilm.py; STS-B pairs: {args.limit or 1500}. "
            "onnxruntime intra-op threads = 1, median latency. Target: a configuration within 1 point of fp32 "
            "STS-B and >= 2x faster than int8 dynamic at 1x128. Linear-weight bytes count initializers: the custom-op "
            "target keeps its permutations as node attributes, the portable one as Gather indices.")
    write_result("minilm", "MiniLM-L6 end to end (latency and STS-B)",
                 "python bench/bench_minilm.py" + (f" --limit {args.limit}" if args.limit else ""),
                 "\n".join(lines) + "\n\n" + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
