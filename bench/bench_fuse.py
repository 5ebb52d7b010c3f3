"""MiniLM-L6 with and without bfc's transformer fusions (``bfc.passes.fuse``), fp32 and int8 dynamic.

    python bench/bench_fuse.py [--repeats N] [--shapes 1x128,32x128]

Variants (1 intra-op thread, onnxruntime's default session optimizations, median of interleaved repeats):
  fp32 / int8 dynamic (``quantize_dynamic``, default op types) of
  * unfused: the export as is (onnxruntime's session still builds SkipLayerNormalization and BiasGelu)
  * fused: ``fuse(model, recognize(model), 20)`` (MultiHeadAttention + residual Sum, the default)
  * MHA only: ``block_skip=False`` (onnxruntime's session builds SkipLayerNormalization)
  * MHA packed bias: ``packed_bias=True`` (Q/K/V bias Adds moved into MultiHeadAttention)
Writes bench/results/fuse.md (a markdown table with the machine line).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from common import RESULTS, machine_line  # noqa: E402
from onnxruntime.quantization import quantize_dynamic  # noqa: E402

from bfc.passes.fuse import fuse, recognize  # noqa: E402

VARIANTS = (("unfused", None), ("fused", {}), ("MHA only", {"block_skip": False}),
            ("MHA packed bias", {"packed_bias": True}))


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64)}


def build(model_path, tmp: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """{label: model path} for fp32 and int8 dynamic of every variant, and the fusion notes."""
    model = onnx.load(str(model_path))
    kind = recognize(model)
    paths, notes = {}, {}
    for name, opts in VARIANTS:
        fp32 = tmp / f"{name.replace(' ', '_')}.onnx"
        if opts is None:
            onnx.save(model, str(fp32))
        else:
            r = fuse(model, kind, 20, **opts)
            if not r.changed:
                raise SystemExit(f"{name}: {r.note}")
            notes[name] = r.note
            onnx.save(r.model, str(fp32))
        int8 = fp32.with_name(fp32.stem + "_int8.onnx")
        quantize_dynamic(str(fp32), str(int8))
        paths[f"fp32 {name}"], paths[f"int8 {name}"] = fp32, int8
    return paths, notes


def measure(paths: dict[str, Path], batch, seq, repeats) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per run of every model (interleaved), and each model's error against fp32 unfused:
    max |difference| / max |output| over the token embeddings (fp32 variants must be within 1e-4)."""
    feed = _feed(batch, seq)
    sessions = {k: _session(p) for k, p in paths.items()}
    outs = {k: s.run(None, feed)[-1] for k, s in sessions.items()}
    ref = outs["fp32 unfused"]
    errors = {k: float(np.abs(o - ref).max() / np.abs(ref).max()) for k, o in outs.items()}
    for k, err in errors.items():
        if k.startswith("fp32") and err > 1e-4:
            raise SystemExit(f"{k} at {batch}x{seq}: outputs differ from unfused (relative {err:.2e})")
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default="1x128,32x128")
    ap.add_argument("--model", help="MiniLM ONNX (default: models/minilm.py's cached export)")
    args = ap.parse_args(argv)
    if args.model:
        model_path = Path(args.model)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from models import minilm
        model_path = minilm.onnx_path()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths, notes = build(model_path, Path(tmp))
        nodes = {k: len(onnx.load(str(p), load_external_data=False).graph.node) for k, p in paths.items()}
        results, errors = {}, {}
        for b, s in shapes:
            # fewer repeats at the large shape: each fp32 run takes most of a second on 2 cores
            reps = args.repeats if b * s <= 512 else max(5, args.repeats // 2)
            results[(b, s)], errors[(b, s)] = measure(paths, b, s, reps)
            print(f"{b}x{s}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in results[(b, s)].items()), flush=True)
    cols = [f"{b}x{s}" for b, s in shapes]
    head = ("| model | nodes | " + " | ".join(f"{c} ms | vs unfused" for c in cols)
            + f" | error vs fp32 ({cols[0]}) |")
    lines = [head, "|" + "---|" * (3 + 2 * len(cols))]
    for k in sorted(paths, key=lambda k: k.startswith("int8")):      # fp32 rows, then int8
        row = [k, str(nodes[k])]
        for b, s in shapes:
            t, base = results[(b, s)][k], results[(b, s)][k.split()[0] + " unfused"]
            row += [f"{t:.2f}", f"{base / t:.2f}x"]
        row.append(f"{errors[shapes[0]][k]:.1e}")
        lines.append("| " + " | ".join(row) + " |")
    int8 = {c: results[sh]["int8 unfused"] / results[sh]["int8 fused"] for c, sh in zip(cols, shapes)}
    body = "\n".join([
        "# MiniLM-L6: transformer fusions (bfc.passes.fuse)", "",
        f"Command: `python bench/bench_fuse.py --repeats {args.repeats} --shapes {args.shapes}`  ",
        f"Machine: {machine_line()}  ",
        f"Load average (1 min) at start / end: {load0:.2f} / {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cores; above that the timings are contended)", "",
        "1 intra-op thread, onnxruntime's default session optimizations, median of interleaved repeats; "
        "int8 = `quantize_dynamic` (default op types) of each fp32 model. Error: max |token embedding - fp32 "
        "unfused| / max |fp32 unfused| on the benchmark input (fp32 variants must be within 1e-4; int8 dynamic "
        "rounds differently once any float differs, so int8 fused and unfused are compared to fp32).", "",
        *lines, "",
        "Fused (default): " + notes["fused"] + ".  ",
        "int8 dynamic fused vs int8 dynamic unfused: "
        + ", ".join(f"{c} {v:.2f}x" for c, v in int8.items()) + ".", ""])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fuse.md"
    out.write_text(body)
    print(body)
    return out


if __name__ == "__main__":
    main()
