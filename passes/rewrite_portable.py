"""Portable rewrite: each planned layer becomes standard ONNX ops (any runtime runs it).

Matches: the nodes of every rewritten ``LayerPlan`` (MatMul ``y = x @ W`` or Gemm
``y = alpha * op(A) @ W + beta * C``).
Algebra (x flattened to (N, M), chain K_1..K_L with patterns (a_l, b_l, c_l, d_l)),
computed feature-major so that no transpose ever splits a row of N values:
  x -> X^T           one 2-D Transpose (N, M) -> (M, N)
  P_row, layouts     the rows of X^T are put in the (a_1*d_1, b_1) block order of K_1 by one
                     Gather(axis=0) whose index also applies row_perm
  h @ K_l            MatMul(V_l^T, H): V_l^T is (a*d, c, b) (each dense block transposed),
                     H is (a*d, b, N), the result (a*d, c, N) holds feature i*c*d + k*d + l
                     at row (i*d + l)*c + k
  K_l -> K_(l+1)     one Gather(axis=0) on the (features, N) view reorders the rows into
                     K_(l+1)'s block order (skipped when it is the identity)
  P_col, exit        the last Gather also applies inverse(col_perm); one 2-D Transpose back
  + U V^T            MatMul(MatMul(x, U), V^T) added
  Gemm               Mul by alpha, Add beta*C (C folded when constant)
  [..., M] inputs    Reshape to (N, M) and back to [..., N_out] via Shape/Slice/Concat.
Cost: L MatMuls + at most L+1 row Gathers + 2 transposes; a Gather moves rows of N
contiguous values, which is far cheaper in onnxruntime than a 4-D/6-D Transpose.
Values: int8/fp8 stay in the file behind a per-axis DequantizeLinear on axis 0 (per-tensor
and (a, d, 1, 1) scales on the (a*d, c, b) view, (a, d, 1, c) scales on the (a*d*c, b)
view then a Reshape): the same numbers as opset 21's blocked form over (a*d, c, b) with
block_size b, but onnxruntime runs it ~7x faster and it needs only opset 13 (fp8: 19);
fp16 values are Cast to the model's float type; fp32 values are plain initializers.
Factor initializers are created once per weight group (shared weights stay shared).
Every created node and tensor is named ``bfc/<layer>/...`` so a second run skips them.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bfc.config import Precision
from bfc.errors import UnsupportedError
from bfc.factorize import inverse_perm
from bfc.passes.find_sites import BFC_PREFIX, find_node
from bfc.passes.layer import LayerWeights
from bfc.passes.plan import LayerPlan

_ONNX_FLOAT = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16}


class _Builder:
    def __init__(self, graph: gs.Graph, prefix: str, dtype: np.dtype):
        self.graph, self.prefix, self.dtype, self.count = graph, prefix, np.dtype(dtype), 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, what: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(what), np.ascontiguousarray(values))

    def op(self, op: str, inputs, attrs=None, dtype=None, out=None) -> gs.Variable:
        out = out if out is not None else gs.Variable(self.name(op.lower() + "_out"), dtype=dtype)
        node = gs.Node(op, name=self.name(op), inputs=list(inputs), outputs=[out], attrs=attrs or {})
        self.graph.nodes.append(node)
        return out

    def reshape(self, x, shape) -> gs.Variable:
        return self.op("Reshape", [x, self.const("shape", np.array(shape, np.int64))], dtype=self.dtype)


def _factor_weight(b: _Builder, lw: LayerWeights, l: int, opset: int):
    """Graph tensor holding factor l transposed per block, (a*d, c, b), in the model's float type."""
    p = lw.chain[l]
    ad, bb, cc = p.a * p.d, p.b, p.c
    v = np.ascontiguousarray(lw.values[l].reshape(ad, bb, cc).transpose(0, 2, 1))
    s = lw.scales[l]
    if lw.precision in (Precision.FP32, Precision.FP16):
        if np.any(s != 1):
            full = lw.values[l].astype(np.float32) * s
            v = np.ascontiguousarray(full.reshape(ad, bb, cc).transpose(0, 2, 1)).astype(v.dtype)
        if np.dtype(v.dtype) == b.dtype or lw.precision is Precision.FP32:
            return b.const("w", v.astype(b.dtype))
        return b.op("Cast", [b.const("w", v)], {"to": _ONNX_FLOAT[b.dtype]}, dtype=b.dtype)
    if lw.precision in (Precision.FP8_E4M3, Precision.FP8_E5M2) and opset < 19:
        raise UnsupportedError(f"fp8 weights need ONNX opset >= 19 (DequantizeLinear-19) but the model has "
                               f"opset {opset}; use --precision int8 or convert the model to opset 19+")
    # per-axis DequantizeLinear on axis 0 only: onnxruntime runs it ~7x faster than the blocked
    # form on the last axis, and it exists since opset 13.  (a, d, 1, c) scales become one scale
    # per row of the (a*d*c, b) view.
    sd = np.broadcast_to(s.astype(b.dtype), (p.a, p.d, 1, cc)).reshape(ad * cc)
    if np.all(sd == sd[0]) or s.shape[3] == 1:
        per_ad = sd.reshape(ad, cc)[:, 0]
        return b.op("DequantizeLinear", [b.const("q", v), b.const("scale", np.ascontiguousarray(per_ad))],
                    {"axis": 0}, dtype=b.dtype)
    w = b.op("DequantizeLinear", [b.const("q", v.reshape(ad * cc, bb)), b.const("scale", np.ascontiguousarray(sd))],
             {"axis": 0}, dtype=b.dtype)
    return b.reshape(w, [ad, cc, bb])


def _in_feature(p) -> np.ndarray:
    """Feature index held by each row of the (a*d, b) input layout of pattern p."""
    return p.row_index()[..., 0].reshape(-1)


def _out_position(p) -> np.ndarray:
    """Row (in the (a*d, c) output layout) that holds each output feature of pattern p."""
    feat = p.col_index()[:, :, 0, :].reshape(-1)
    pos = np.empty_like(feat)
    pos[feat] = np.arange(feat.size)
    return pos


def _gather_rows(b: _Builder, h, idx: np.ndarray, rows: int):
    """h viewed (rows, N), rows reordered by idx (skipped when idx is the identity)."""
    h = b.reshape(h, [rows, -1])
    if np.array_equal(idx, np.arange(idx.size)):
        return h
    return b.op("Gather", [h, b.const("idx", idx.astype(np.int32))], {"axis": 0}, dtype=b.dtype)


def _chain(b: _Builder, x2, weights, row_perm, col_perm) -> gs.Variable:
    """x2 (N, M) -> (x2 P_row^T) K_1 ... K_L P_col as (N, N_out), computed feature-major:
    every factor is one batched MatMul (a*d, c, b) @ (a*d, b, N); every feature
    permutation (row_perm, the layout changes between factors, col_perm) is one
    Gather on axis 0 of the (features, N) view, which moves whole rows of N values."""
    pats, ws = weights
    m = pats[0].shape[0]
    h = b.op("Transpose", [x2], {"perm": [1, 0]}, dtype=b.dtype)          # (M, N)
    idx = _in_feature(pats[0])
    if row_perm is not None:
        idx = np.asarray(row_perm)[idx]
    h = _gather_rows(b, h, idx, m)
    for l, (p, w) in enumerate(zip(pats, ws)):
        h = b.reshape(h, [p.a * p.d, p.b, -1])
        h = b.op("MatMul", [w, h], dtype=b.dtype)                         # (a*d, c, N)
        pos = _out_position(p)
        if l + 1 < len(pats):
            idx = pos[_in_feature(pats[l + 1])]
        else:
            idx = pos if col_perm is None else pos[inverse_perm(np.asarray(col_perm))]
        h = _gather_rows(b, h, idx, p.shape[1])
    return b.op("Transpose", [h], {"perm": [1, 0]}, dtype=b.dtype)       # (N, N_out)


def _rewrite_node(graph, node, plan: LayerPlan, group, b: _Builder):
    sn = next(s for s in plan.site.nodes if s.name == (node.name or f"{node.op}:{node.outputs[0].name}"))
    lw = plan.weights
    m, n = lw.chain.shape
    x, y = node.inputs[0], node.outputs[0]
    node.outputs = []
    if sn.trans_a:
        x = b.op("Transpose", [x], {"perm": [1, 0]}, dtype=b.dtype)
    flat = node.op == "MatMul" and (x.shape is None or len(x.shape) != 2)
    x2 = b.reshape(x, [-1, m]) if flat else x
    out = _chain(b, x2, group["chain"], lw.row_perm, lw.col_perm)
    if group["low_rank"] is not None:
        u, vt = group["low_rank"]
        lr = b.op("MatMul", [b.op("MatMul", [x2, u], dtype=b.dtype), vt], dtype=b.dtype)
        out = b.op("Add", [out, lr], dtype=b.dtype)
    if node.op == "Gemm":
        if sn.alpha != 1.0:
            out = b.op("Mul", [out, b.const("alpha", np.array(sn.alpha, b.dtype))], dtype=b.dtype)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            if isinstance(c, gs.Constant):
                c = b.const("bias", (np.asarray(c.values, np.float64) * sn.beta).astype(b.dtype))
            elif sn.beta != 1.0:
                c = b.op("Mul", [c, b.const("beta", np.array(sn.beta, b.dtype))], dtype=b.dtype)
            out = b.op("Add", [out, c], dtype=b.dtype)
    if flat:
        shape = b.op("Shape", [x], dtype=np.int64)
        lead = b.op("Slice", [shape, b.const("start", np.array([0], np.int64)),
                              b.const("end", np.array([-1], np.int64))], dtype=np.int64)
        tgt = b.op("Concat", [lead, b.const("n", np.array([n], np.int64))], {"axis": 0}, dtype=np.int64)
        out = b.op("Reshape", [out, tgt], dtype=b.dtype)
    # route the last op's output into the original output tensor (graph outputs keep their names)
    producer = out.inputs[0]
    producer.outputs = [y]
    node.inputs = []


def rewrite_portable(graph: gs.Graph, plans: list[LayerPlan], opset: int) -> int:
    """Rewrite every planned layer in ``graph`` (gs); returns the number of nodes rewritten."""
    done = 0
    for li, plan in enumerate(plans):
        if not plan.rewritten:
            continue
        site = plan.site
        dtype = np.dtype(site.weight.dtype)
        safe = site.name.replace("/", "_")
        b = _Builder(graph, f"{BFC_PREFIX}{li}_{safe}", dtype)
        lw = plan.weights
        group = {
            "chain": (list(lw.chain), [_factor_weight(b, lw, l, opset) for l in range(len(lw.chain))]),
            "low_rank": None if lw.low_rank is None else (b.const("U", lw.low_rank[0].astype(dtype)),
                                                          b.const("Vt", np.ascontiguousarray(lw.low_rank[1].T).astype(dtype))),
        }
        for sn in site.nodes:
            _rewrite_node(graph, find_node(graph, sn.name), plan, group, b)
            done += 1
    graph.cleanup().toposort()
    return done
