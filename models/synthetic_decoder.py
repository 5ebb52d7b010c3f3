"""A Llama-shaped decoder ONNX model with seeded random weights, written weight by weight.

    python models/synthetic_decoder.py OUT.onnx --layers L --hidden H --ffn F \
        [--vocab V] [--heads N] [--seed S]

Graph (opset 17, IR version 8; input ``input_ids`` int64 [batch, seq], output ``logits``
float32 [batch, seq, V]):

    h = Gather(embed, input_ids)                                        embed: V x H
    per layer l:
        x = rmsnorm(h, g1)            rmsnorm(h, g) = h / sqrt(mean(h^2, -1) + eps) * g
        q, k, v = x Wq, x Wk, x Wv     (H x H each; N heads of H / N, no rotary)
        a = softmax(q_h k_h^T / sqrt(H / N) + causal) v_h,  causal = -1e4 above the diagonal
        h = h + concat_h(a) Wo
        x = rmsnorm(h, g2)
        h = h + (silu(x Wgate) * (x Wup)) Wdown                         H x F, H x F, F x H
    logits = rmsnorm(h, gf) Whead                                       H x V

Every MatMul weight is N(0, 1/fan_in) (fan_in = its first dimension), the embedding
N(0, 1) and the norm gains 1 + 0.1 N(0, 1), each drawn from its own generator
``default_rng([seed, index])``.  Tensors are generated in row chunks of at most
``CHUNK_BYTES`` and appended to one external-data file beside the model
(``OUT.onnx.data``); the graph refers to them by offset and length, so the script's
memory stays at one chunk whatever the model size.  Both files are written under
temporary names and renamed at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8
EPS = 1e-6
MASK = -1e4
CHUNK_BYTES = 16 << 20
ALIGN = 64


class _Writer:
    """Appends float32 tensors to the external-data file and records their initializers."""

    def __init__(self, data_path: Path, final_name: str, seed: int):
        self.f = open(data_path, "wb")
        self.name = final_name
        self.seed = seed
        self.count = 0
        self.initializers: list[TensorProto] = []

    def tensor(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> str:
        """Write mean + std * N(0, 1) of ``shape`` in row chunks; returns ``name``."""
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        pad = (-self.f.tell()) % ALIGN
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        rows = shape[0]
        row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        step = max(1, CHUNK_BYTES // (4 * row_elems))
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            block = rng.standard_normal(n * row_elems) * std + mean
            self.f.write(block.astype("<f4").tobytes())
        length = self.f.tell() - offset
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.initializers.append(t)
        return name

    def close(self):
        self.f.close()


def _const(name: str, values, dtype=np.int64) -> TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def build(out: Path, layers: int, hidden: int, ffn: int, vocab: int = 32000, heads: int | None = None,
          seed: int = 0) -> Path:
    """Write the model to ``out`` and its weights to ``out`` + ``.data``; returns ``out``."""
    heads = heads or max(1, hidden // 64)
    if hidden % heads:
        raise SystemExit(f"--hidden {hidden} is not divisible by --heads {heads}")
    for nm, v in (("layers", layers), ("hidden", hidden), ("ffn", ffn), ("vocab", vocab), ("heads", heads)):
        if v < 1:
            raise SystemExit(f"--{nm} must be positive, got {v}")
    hd = hidden // heads
    out = Path(out)
    data_name = out.name + ".data"
    tmp_data = out.with_name(data_name + ".tmp")
    tmp_model = out.with_name(out.name + ".tmp")
    w = _Writer(tmp_data, data_name, seed)
    nodes: list = []
    consts = [_const("axes_last", [-1]), _const("heads_shape", [0, 0, heads, hd]),
              _const("merge_shape", [0, 0, hidden]), _const("eps", np.float32(EPS), np.float32),
              _const("scale", np.float32(1.0 / np.sqrt(hd)), np.float32),
              _const("mask_value", np.float32(MASK), np.float32), _const("idx1", [1])]

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def rmsnorm(x, gain, p):
        sq = node("Mul", [x, x], p + "/sq")
        ms = node("ReduceMean", [sq], p + "/mean", axes=[-1], keepdims=1)
        rs = node("Sqrt", [node("Add", [ms, "eps"], p + "/add_eps")], p + "/sqrt")
        return node("Mul", [node("Div", [x, rs], p + "/div"), gain], p + "/out")

    # causal mask (S x S): -1e4 strictly above the diagonal
    shp = node("Shape", ["input_ids"], "mask/shape")
    s = node("Gather", [shp, "idx1"], "mask/seq", axis=0)
    ss = node("Concat", [s, s], "mask/ss", axis=0)
    ones = node("ConstantOfShape", [ss], "mask/ones", value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    upper = node("Trilu", [ones, "mask_k"], "mask/strict", upper=1)
    consts.append(_const("mask_k", 1))
    mask = node("Mul", [upper, "mask_value"], "mask/value")

    emb = w.tensor("model.embed_tokens.weight", (vocab, hidden), 1.0)
    h = node("Gather", [emb, "input_ids"], "embed", axis=0)
    for l in range(layers):
        p = f"layers.{l}"
        g1 = w.tensor(f"{p}.input_layernorm.weight", (hidden,), 0.1, 1.0)
        x = rmsnorm(h, g1, p + "/ln1")
        proj = {}
        for nm in ("q", "k", "v"):
            wt = w.tensor(f"{p}.self_attn.{nm}_proj.weight", (hidden, hidden), 1 / np.sqrt(hidden))
            proj[nm] = node("Reshape", [node("MatMul", [x, wt], f"{p}/{nm}_proj"), "heads_shape"], f"{p}/{nm}_heads")
        q = node("Transpose", [proj["q"]], f"{p}/q_t", perm=[0, 2, 1, 3])
        kt = node("Transpose", [proj["k"]], f"{p}/k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [proj["v"]], f"{p}/v_t", perm=[0, 2, 1, 3])
        sc = node("Mul", [node("MatMul", [q, kt], f"{p}/qk"), "scale"], f"{p}/scaled")
        att = node("Softmax", [node("Add", [sc, mask], f"{p}/masked")], f"{p}/softmax", axis=-1)
        ctx = node("MatMul", [att, v], f"{p}/ctx")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{p}/ctx_t", perm=[0, 2, 1, 3]), "merge_shape"],
                   f"{p}/ctx_merged")
        wo = w.tensor(f"{p}.self_attn.o_proj.weight", (hidden, hidden), 1 / np.sqrt(hidden))
        h = node("Add", [h, node("MatMul", [ctx, wo], f"{p}/o_proj")], f"{p}/attn_residual")
        g2 = w.tensor(f"{p}.post_attention_layernorm.weight", (hidden,), 0.1, 1.0)
        x = rmsnorm(h, g2, p + "/ln2")
        wg = w.tensor(f"{p}.mlp.gate_proj.weight", (hidden, ffn), 1 / np.sqrt(hidden))
        wu = w.tensor(f"{p}.mlp.up_proj.weight", (hidden, ffn), 1 / np.sqrt(hidden))
        wd = w.tensor(f"{p}.mlp.down_proj.weight", (ffn, hidden), 1 / np.sqrt(ffn))
        gate = node("MatMul", [x, wg], f"{p}/gate_proj")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        act = node("Mul", [silu, node("MatMul", [x, wu], f"{p}/up_proj")], f"{p}/swiglu")
        h = node("Add", [h, node("MatMul", [act, wd], f"{p}/down_proj")], f"{p}/mlp_residual")
    gf = w.tensor("model.norm.weight", (hidden,), 0.1, 1.0)
    x = rmsnorm(h, gf, "final_norm")
    head = w.tensor("lm_head.weight", (hidden, vocab), 1 / np.sqrt(hidden))
    nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="lm_head"))
    w.close()

    graph = helper.make_graph(
        nodes, "synthetic_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        initializer=consts + w.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bfc synthetic_decoder")
    model.ir_version = IR_VERSION
    with open(tmp_model, "wb") as fh:
        fh.write(model.SerializeToString())
    os.replace(tmp_data, out.with_name(data_name))
    os.replace(tmp_model, out)
    onnx.checker.check_model(str(out))          # by path: external data checked, not loaded
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a Llama-shaped decoder ONNX model with random weights.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=None, help="default: hidden / 64 (at least 1)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = build(a.out, a.layers, a.hidden, a.ffn, a.vocab, a.heads, a.seed)
    print(f"wrote {path} and {path.name}.data", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
