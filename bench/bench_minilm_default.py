"""MiniLM-L6, the default `bfc optimize` run with the 48-sentence calibration: STS-B dev, bytes, layers, output error.

    python bench/bench_minilm_default.py [--limit N] [--target portable|custom-op]

Runs `bfc.optimize(model, OptimizeConfig(calibration=...))` (every other option at its
default: auto structure, int8, --max-error 0.1, --max-output-error 0.05) and scores the
fp32 export and the result on STS-B dev side by side.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))
from bench_minilm import stsb  # noqa: E402
from common import write_result  # noqa: E402

import bfc  # noqa: E402
from bfc.study.baselines import linear_bytes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=None, help="STS-B pairs (default all 1500)")
    ap.add_argument("--target", default="portable")
    args = ap.parse_args(argv)
    import minilm
    src, calib = Path(minilm.onnx_path()), Path(minilm.calibration_path())
    out = Path(tempfile.mkdtemp(prefix="bfc-bench-default-")) / "model.bfc.onnx"
    t = time.perf_counter()
    _, report = bfc.optimize(src, bfc.OptimizeConfig(calibration=calib, target=args.target), output=out)
    secs = time.perf_counter() - t
    original = onnx.load(str(src))
    fp32, opt = stsb(src, args.limit), stsb(out, args.limit)
    lb0, lb1 = linear_bytes(original, original), linear_bytes(original, onnx.load(str(out)))
    t_ = report.totals()
    err = max((o.rel_error for o in report.outputs), default=float("nan"))
    lines = ["| model | STS-B dev | linear-weight bytes | file bytes | layers rewritten | output error (calibration) |",
             "|---|---|---|---|---|---|",
             f"| fp32 export | {fp32:.2f} | {lb0 / 1e6:.2f} MB | {src.stat().st_size / 1e6:.2f} MB | - | - |",
             f"| bfc default ({args.target}) | {opt:.2f} | {lb1 / 1e6:.2f} MB ({lb1 / lb0:.3f}x) | "
             f"{report.model_bytes_after / 1e6:.2f} MB | {t_['rewritten']}/{t_['sites']} | {err:.3g} |"]
    notes = "; ".join(report.notes) or "no layer backed off"
    text = "\n".join(lines) + (f"\n\nSTS-B delta {opt - fp32:+.2f} points; optimize took {secs:.0f} s "
                               f"(verification included). Guard: {notes}.")
    print(text)
    write_result("minilm_default", "MiniLM-L6: the default run with its 48-sentence calibration",
                 "python bench/bench_minilm_default.py" + (f" --limit {args.limit}" if args.limit else ""), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
