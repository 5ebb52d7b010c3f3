"""Portable rewrite: each planned layer becomes standard ONNX ops (any runtime runs it).

Matches: the nodes of every rewritten ``LayerPlan`` (MatMul ``y = x @ W`` or Gemm
``y = alpha * op(A) @ W + beta * C``).
Algebra (x flattened to (N, M), chain K_1..K_L with patterns (a_l, b_l, c_l, d_l)):
  x P_row^T          -> Gather(axis=1, row_perm)               (omitted when identity)
  h @ K_l            -> h viewed (N, a, b, d) is transposed to (a*d, N, b) and
                        MatMul'ed with the (a*d, b, c) values: (a*d, N, c)
  K_l -> K_(l+1)     -> with r = a_l c_l / a_(l+1), the feature index splits into digits
                        [a_l][a_(l+1)/a_l][r][d_l/d_(l+1)][d_(l+1)]; ONE Transpose moves
                        (a_l, d_l, N, c_l) to (a_(l+1), d_(l+1), N, b_(l+1)); size-1 digits
                        are dropped and identity transposes become plain Reshapes
  last factor        -> (a, d, N, c) transposed back to (N, a*c*d)
  P_col              -> Gather(axis=1, inverse(col_perm))      (omitted when identity)
  + U V^T            -> MatMul(MatMul(x, U), V^T) added
  Gemm               -> Mul by alpha, Add beta*C (C folded when constant)
  [..., M] inputs    -> Reshape to (N, M) and back to [..., N_out] via Shape/Slice/Concat.
Values: int8/fp8 stay in the file behind DequantizeLinear: per-tensor scale, per-axis
(axis 0 of the (a*d, b, c) view) for (a, d, 1, 1) scales, blocked (axis 1,
block_size b, opset >= 21) for (a, d, 1, c) scales, else DequantizeLinear + Mul;
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

    def transpose_view(self, x, dims, perm, out_shape) -> gs.Variable:
        """Reshape x to ``dims`` (-1 for N), transpose by ``perm``, reshape to ``out_shape``;
        size-1 dims are dropped and an identity permutation costs only a Reshape."""
        keep = [i for i, d in enumerate(dims) if d != 1]
        perm = [keep.index(p) for p in perm if p in keep]
        dims = [dims[i] for i in keep]
        if perm == sorted(perm):
            return self.reshape(x, out_shape)
        h = self.reshape(x, dims)
        h = self.op("Transpose", [h], {"perm": perm}, dtype=self.dtype)
        return self.reshape(h, out_shape)


def _factor_weight(b: _Builder, lw: LayerWeights, l: int, opset: int):
    """Graph tensor holding factor l as (a*d, b, c) in the model's float type."""
    p = lw.chain[l]
    ad, bb, cc = p.a * p.d, p.b, p.c
    v = lw.values[l].reshape(ad, bb, cc)
    s = lw.scales[l]
    if lw.precision in (Precision.FP32, Precision.FP16):
        vs = v if np.all(s == 1) else (lw.values[l].astype(np.float32) * s).reshape(ad, bb, cc).astype(v.dtype)
        if np.dtype(vs.dtype) == b.dtype or lw.precision is Precision.FP32:
            return b.const("w", vs.astype(b.dtype))
        return b.op("Cast", [b.const("w", vs)], {"to": _ONNX_FLOAT[b.dtype]}, dtype=b.dtype)
    if lw.precision in (Precision.FP8_E4M3, Precision.FP8_E5M2) and opset < 19:
        raise UnsupportedError(f"fp8 weights need ONNX opset >= 19 (DequantizeLinear-19) but the model has "
                               f"opset {opset}; use --precision int8 or convert the model to opset 19+")
    q = b.const("q", v)
    s_ad = s.shape[0] * s.shape[1] > 1
    s_c = s.shape[3] > 1
    sd = s.astype(b.dtype)
    if not s_ad and not s_c:
        return b.op("DequantizeLinear", [q, b.const("scale", sd.reshape(()))], dtype=b.dtype)
    if s_ad and not s_c:
        return b.op("DequantizeLinear", [q, b.const("scale", sd.reshape(ad))], {"axis": 0}, dtype=b.dtype)
    s3 = np.broadcast_to(sd, (p.a, p.d, 1, cc)).reshape(ad, 1, cc) if s_ad else sd.reshape(1, 1, cc)
    if opset >= 21 and s_ad:
        return b.op("DequantizeLinear", [q, b.const("scale", s3)], {"axis": 1, "block_size": bb}, dtype=b.dtype)
    w = b.op("DequantizeLinear", [q, b.const("one", np.array(1.0, b.dtype))], dtype=b.dtype)
    return b.op("Mul", [w, b.const("scale", s3)], dtype=b.dtype)


def _chain(b: _Builder, x2, weights) -> gs.Variable:
    """x2 (N, M) -> x2 @ K_1 ... K_L as (N, N_out)."""
    pats = list(weights[0])
    p = pats[0]
    h = b.transpose_view(x2, [-1, p.a, p.b, p.d], [1, 3, 0, 2], [p.a * p.d, -1, p.b])
    for l, (p, w) in enumerate(zip(pats, weights[1])):
        h = b.op("MatMul", [h, w], dtype=b.dtype)
        if l + 1 < len(pats):
            q = pats[l + 1]
            ap, r, dp = q.a // p.a, p.a * p.c // q.a, p.d // q.d
            h = b.transpose_view(h, [p.a, dp, q.d, -1, ap, r], [0, 4, 2, 3, 5, 1], [q.a * q.d, -1, q.b])
    return b.transpose_view(h, [p.a, p.d, -1, p.c], [2, 0, 3, 1], [-1, p.a * p.c * p.d])


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
    h = b.op("Gather", [x2, group["row_perm"]], {"axis": 1}, dtype=b.dtype) if group["row_perm"] is not None else x2
    out = _chain(b, h, group["chain"])
    if group["col_perm"] is not None:
        out = b.op("Gather", [out, group["col_perm"]], {"axis": 1}, dtype=b.dtype)
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
            "row_perm": None if lw.row_perm is None else b.const("row_perm", np.asarray(lw.row_perm, np.int64)),
            "col_perm": None if lw.col_perm is None else b.const("col_perm", inverse_perm(np.asarray(lw.col_perm)).astype(np.int64)),
            "low_rank": None if lw.low_rank is None else (b.const("U", lw.low_rank[0].astype(dtype)),
                                                          b.const("Vt", np.ascontiguousarray(lw.low_rank[1].T).astype(dtype))),
        }
        for sn in site.nodes:
            _rewrite_node(graph, find_node(graph, sn.name), plan, group, b)
            done += 1
    graph.cleanup().toposort()
    return done
