"""Custom-op rewrite: each planned layer becomes ONE ``ai.bfc.KSMatMul`` node.

Matches: the nodes of every rewritten ``LayerPlan`` (MatMul ``y = x @ W`` with x of
any rank [..., M], or Gemm ``y = alpha * op(A) @ W + beta * C``): the same plans the
portable target consumes (planning and factorization are target independent).
Algebra:
  x @ W_hat = KSMatMul(x; values_l, scale_l; in_perm = row_perm,
                       out_perm = inverse(col_perm), bias) [+ (x U) V^T]
  Gemm: beta * C becomes the op's bias when C is a constant vector of length N and
  alpha == 1 with no residual; otherwise alpha is a Mul and beta * C an Add; transA is
  a Transpose.  fp16 models get a Cast to float32 and back around the node (the
  kernels compute in float32).
Factor values keep their stored dtype (int8 / fp8 / fp16 / fp32) with float32 scales,
as initializers shared by every node of a weight group.  The op's semantics and its
numpy reference are in :mod:`bfc.ops`; onnxruntime runs it with :mod:`bfc.runtime`.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bfc.factorize import inverse_perm
from bfc.ops import DOMAIN, OP_TYPE, patterns_attribute
from bfc.passes.find_sites import BFC_PREFIX, find_node
from bfc.passes.plan import LayerPlan

FLOAT = 1  # TensorProto.FLOAT
FLOAT16 = 10


class _Emitter:
    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def op(self, kind, inputs, attrs=None, dtype=np.float32, domain=None, out=None):
        self.count += 1
        out = out if out is not None else gs.Variable(f"{self.prefix}/{kind.lower()}_out_{self.count}", dtype=dtype)
        self.graph.nodes.append(gs.Node(kind, name=f"{self.prefix}/{kind}_{self.count}", inputs=list(inputs),
                                        outputs=[out], attrs=attrs or {}, domain=domain))
        return out

    def const(self, what, values):
        self.count += 1
        return gs.Constant(f"{self.prefix}/{what}_{self.count}", np.ascontiguousarray(values))


def _group_tensors(e: _Emitter, plan: LayerPlan) -> dict:
    lw = plan.weights
    factors = []
    for l, (v, s) in enumerate(zip(lw.values, lw.scales)):
        factors += [e.const(f"values{l}", v), e.const(f"scale{l}", np.asarray(s, np.float32).reshape(
            s.shape if np.ndim(s) == 4 else (1, 1, 1, 1)))]
    attrs = {"patterns": patterns_attribute(lw.chain)}
    if lw.row_perm is not None:
        attrs["in_perm"] = [int(v) for v in lw.row_perm]
    if lw.col_perm is not None:
        attrs["out_perm"] = [int(v) for v in inverse_perm(np.asarray(lw.col_perm))]
    low = None
    if lw.low_rank is not None:
        low = (e.const("U", lw.low_rank[0].astype(np.float32)),
               e.const("Vt", np.ascontiguousarray(lw.low_rank[1].T).astype(np.float32)))
    return {"factors": factors, "attrs": attrs, "low_rank": low}


def _rewrite_node(e: _Emitter, node, plan: LayerPlan, group: dict) -> None:
    sn = next(s for s in plan.site.nodes if s.name == (node.name or f"{node.op}:{node.outputs[0].name}"))
    n_out = plan.weights.chain.shape[1]
    dtype = np.dtype(plan.site.weight.dtype)
    x, y = node.inputs[0], node.outputs[0]
    c = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    node.outputs, node.inputs = [], []
    if sn.trans_a:
        x = e.op("Transpose", [x], {"perm": [1, 0]}, dtype)
    if dtype != np.float32:
        x = e.op("Cast", [x], {"to": FLOAT})
    bias = gs.Variable.empty()
    fold_bias = (isinstance(c, gs.Constant) and sn.alpha == 1.0 and group["low_rank"] is None
                 and np.asarray(c.values).size == n_out and np.asarray(c.values).ndim <= 2)
    if fold_bias:
        bias = e.const("bias", (np.asarray(c.values, np.float64).reshape(n_out) * sn.beta).astype(np.float32))
        c = None
    out = e.op(OP_TYPE, [x, bias, *group["factors"]], dict(group["attrs"]), domain=DOMAIN)
    if group["low_rank"] is not None:
        u, vt = group["low_rank"]
        out = e.op("Add", [out, e.op("MatMul", [e.op("MatMul", [x, u]), vt])])
    if sn.alpha != 1.0:
        out = e.op("Mul", [out, e.const("alpha", np.array(sn.alpha, np.float32))])
    if c is not None:
        if isinstance(c, gs.Constant):
            c = e.const("c", (np.asarray(c.values, np.float64) * sn.beta).astype(np.float32))
        else:
            if dtype != np.float32:
                c = e.op("Cast", [c], {"to": FLOAT})
            if sn.beta != 1.0:
                c = e.op("Mul", [c, e.const("beta", np.array(sn.beta, np.float32))])
        out = e.op("Add", [out, c])
    if dtype != np.float32:
        out = e.op("Cast", [out], {"to": FLOAT16}, dtype)
    out.inputs[0].outputs = [y]       # the last op writes the original output tensor


def rewrite_custom_op(graph: gs.Graph, plans: list[LayerPlan], opset: int) -> int:
    """Rewrite every planned layer of ``graph`` into KSMatMul nodes; returns the nodes rewritten."""
    done = 0
    for li, plan in enumerate(plans):
        if not plan.rewritten:
            continue
        e = _Emitter(graph, f"{BFC_PREFIX}{li}_{plan.site.name.replace('/', '_')}")
        group = _group_tensors(e, plan)
        for sn in plan.site.nodes:
            _rewrite_node(e, find_node(graph, sn.name), plan, group)
            done += 1
    graph.cleanup().toposort()
    return done
