"""Fashion-MNIST part of the bfc study (docs/study.md).

1. Generalization: the dense MLP of ``models/fashion_mnist.py`` (trained here, seeded) is
   swept by ``bfc study`` over monarch ranks 1, 2, 4, 8 x precisions fp32, fp16, fp8-e4m3,
   fp8-e5m2, int8 (calibrated on 256 training images; the 1024x10 head stays dense), with
   onnxruntime's int8/int4 and SVD/pruning baselines; train and test accuracy of every point
   -> ``OUT/generalization/`` (study.md, pareto.png, error_vs_drop.png, generalization.png).
2. Quantization of the KS model (trained from scratch in KS form, rank 4): every KS factor
   quantized to int8 / fp8-e4m3 / fp8-e5m2 with round-to-nearest (``method="rtn"``) and
   with bfc's optimal scaling (``method="auto"``: the best of the rank-one scale searches),
   test accuracy of the exact quantized function -> ``OUT/ks_quant.md`` and ``.json``.

    python models/study_fashion_mnist.py [--epochs 3] [--out docs/study/fashion-mnist]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import fashion_mnist as fm  # noqa: E402


def _cache() -> Path:
    return fm.cache_dir().parent / "study" / "fashion_mnist"


def gemm_to_matmul(src: Path, dst: Path) -> Path:
    """Gemm(x, W, b, transB) with constant W -> MatMul(x, W^T) + Add(b): the same function, in the
    MatMul form the study's baselines (quantize_dynamic, MatMulNBits, svd, prune) rewrite."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), n.input[1]))
        mid = n.output[0] + "_mm" if len(n.input) > 2 and n.input[2] else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [mid], name=n.name + "_matmul"))
        if mid != n.output[0]:
            nodes.append(helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=n.name + "_bias"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]          # stale shapes of the transposed weights
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def train_dense(epochs: int, seed: int = 0) -> Path:
    path = _cache() / f"dense-e{epochs}-s{seed}.onnx"
    if not path.exists():
        xtr, ytr = fm.load("train")
        model = fm.build_model("dense", seed=seed)
        fm.train(model, xtr, ytr, epochs=epochs, seed=seed)
        fm.export(model, path)
    out = path.with_name(path.stem + "-matmul.onnx")
    return out if out.exists() else gemm_to_matmul(path, out)


def calibration(n: int = 256) -> Path:
    path = _cache() / "calibration.npz"
    if not path.exists():
        xtr, _ = fm.load("train")
        idx = np.random.default_rng(0).choice(len(xtr), n, replace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=fm.normalize(xtr[np.sort(idx)]))
    return path


def generalization(epochs: int, out: Path) -> Path:
    from bfc.study import Study, baseline_point, get_evaluator, grid, write_report
    model = train_dense(epochs)
    ev = get_evaluator("fashion-mnist")
    study = Study(model, ev, _cache() / f"results-dense-e{epochs}.jsonl", _cache() / "models", calibration(),
                  latency_runs=20)
    # baselines leave the 1024x10 head fp32 too (min_size), as bfc does
    pts = [baseline_point("int8-dynamic", None, 20000), baseline_point("int4-nbits", None, 20000)]
    for name in ("svd", "svd-int8", "prune"):
        pts += [baseline_point(name, int(f * study.fp32_bytes), 20000) for f in (0.0625, 0.125)]
    pts += grid(("monarch",), (1, 2, 4, 8), ("fp32", "fp16", "fp8-e4m3", "fp8-e5m2", "int8"), (None,),
                min_size=20000)
    from tqdm import tqdm
    todo = study.pending(pts)
    with tqdm(total=len(todo) + 1, file=sys.stderr, unit="point") as bar:
        recs = study.run(pts, progress=lambda p: bar.update(1))
    return write_report(recs, out, title="bfc study: Fashion-MNIST dense MLP (784-1024-1024-10)",
                        metric_name="test accuracy (%)",
                        command=f"python models/study_fashion_mnist.py --epochs {epochs} --out {_shown(out.parent)}")


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _forward(layers, x):
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def ks_quant(epochs: int, out: Path, seed: int = 0) -> dict:
    import torch

    from bfc.quant import quantize
    from bfc.torch import KSLinear
    xtr, ytr = fm.load("train")
    xte, yte = fm.load("test")
    t0 = time.perf_counter()
    model = fm.build_model("ks", seed=seed)
    fm.train(model, xtr, ytr, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - t0
    xte_n, xtr_n = fm.normalize(xte), fm.normalize(xtr)
    mods = [m for m in model if isinstance(m, (KSLinear, torch.nn.Linear))]
    facs, layers = [], []
    for m in mods:
        b = m.bias.detach().double().numpy()
        if isinstance(m, KSLinear):
            f = m.to_factorization()
            facs.append(f)
            layers.append((f.to_dense(), b))
        else:
            facs.append(None)
            layers.append((m.weight.detach().double().numpy().T, b))
    # the dense product of the factors is the torch model's function
    torch_logits = fm.predict(model, xte)
    ref_logits = _forward(layers, xte_n.astype(np.float64))
    assert np.abs(torch_logits - ref_logits).max() < 1e-3 * max(1.0, np.abs(ref_logits).max())
    acc = lambda ls, x, y: 100.0 * float((_forward(ls, x).argmax(1) == y).mean())  # noqa: E731
    res = {"epochs": epochs, "seed": seed, "train_seconds": round(train_s, 1), "weights": fm.n_weights(model),
           "fp32": {"test": acc(layers, xte_n, yte), "train": acc(layers, xtr_n, ytr)}, "quant": []}
    for fmt in ("int8", "fp8-e4m3", "fp8-e5m2"):
        for method in ("rtn", "auto"):
            qlayers, errs, used = [], [], []
            for f, (w, b) in zip(facs, layers):
                if f is None:
                    qlayers.append((w, b))
                    continue
                q = quantize(f, fmt, method=method)
                qlayers.append((q.to_dense(), b))
                errs.append(float(q.rel_error))
                used.append(q.method)
            res["quant"].append({"fmt": fmt, "method": method, "chosen": used, "product_error": errs,
                                 "test": acc(qlayers, xte_n, yte), "train": acc(qlayers, xtr_n, ytr)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "ks_quant.json").write_text(json.dumps(res, indent=2))
    lines = ["# Fashion-MNIST KS model: quantization of the factors", "",
             f"KS MLP of models/fashion_mnist.py (784-1024-1024-10, KS layers rank 4, {res['weights']} weights), "
             f"trained {epochs} epochs from scratch (seed {seed}); the 1024x10 head stays fp32.",
             "Accuracy of the exact quantized function (dense product of the dequantized factors).", "",
             f"Reproduce: `python models/study_fashion_mnist.py --epochs {epochs} --out {_shown(out)}`", "",
             "| factors | scaling | test acc | delta vs fp32 | train acc | product error (KS layers) | method chosen |",
             "|---|---|---|---|---|---|---|",
             f"| fp32 | - | {res['fp32']['test']:.2f} | - | {res['fp32']['train']:.2f} | - | - |"]
    for q in res["quant"]:
        lines.append(f"| {q['fmt']} | {'RTN' if q['method'] == 'rtn' else 'optimal (auto)'} | {q['test']:.2f} | "
                     f"{q['test'] - res['fp32']['test']:+.2f} | {q['train']:.2f} | "
                     f"{', '.join(f'{e:.2e}' for e in q['product_error'])} | {', '.join(q['chosen'])} |")
    (out / "ks_quant.md").write_text("\n".join(lines) + "\n")
    return res


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "study" / "fashion-mnist")
    ap.add_argument("--only", choices=["generalization", "ks-quant"], default=None)
    args = ap.parse_args(argv)
    if args.only in (None, "ks-quant"):
        res = ks_quant(args.epochs, args.out)
        print(json.dumps({k: v for k, v in res.items() if k != "quant"}))
        for q in res["quant"]:
            print(f"{q['fmt']:9s} {q['method']:5s} test {q['test']:.2f} ({q['test'] - res['fp32']['test']:+.2f}) "
                  f"errors {['%.2e' % e for e in q['product_error']]}")
    if args.only in (None, "generalization"):
        print(f"report: {generalization(args.epochs, args.out / 'generalization')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
