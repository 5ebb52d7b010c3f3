"""Rewrite: every planned layer's nodes are replaced by what the target emits.

Requires: plans, guarded, distilled.  Ensures: rewritten.  In place (``state.graph``).
Matches: the nodes of every rewritten ``LayerPlan`` (MatMul ``y = x @ W``, x of any
rank [..., M]; Gemm ``y = alpha * op(A) @ W + beta * C``).
Algebra, the same for every target:
  y = cast_back( T( cast(op(A)) ) + (x U) V^T ) * alpha + beta * C
with T the target's layer ``x @ W_hat (+ bias)``, op(A) = A^T for transA (one
Transpose), casts only when the target computes in another float type than the model
(custom op: float32 for fp16 models).  A constant C of N values with alpha = 1 and no
residual is folded into T's bias; otherwise alpha is a Mul and beta * C an Add.
y = W @ x sites (``trans_out``) compute y^T = x^T W^T: one Transpose in, one out.
Nodes inside If/Loop/Scan bodies are rewritten in the body that holds them (the
builder appends there).  The constants of a weight group are created once per graph
holding its nodes and shared by those nodes.
Rotated low-bit layers (``family`` "rotated"): T = target.emit_rotated, and x Q is
emitted once per graph, input tensor x and rotation Q (``target.rotate``) and shared by
every layer reading x with that Q (Q, K, V projections); the rotation's bytes are counted
by the first rewritten layer of its group.
Each plan's note is prefixed with its site's note (folded weight chain, dequantized
weight, planned without calibration), so the report says how the weight was found.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bfc.passes.contract import Contract, GraphPass, PassResult
from bfc.passes.find_sites import BFC_PREFIX
from bfc.passes.graph_builder import GraphBuilder
from bfc.passes.load import default_opset
from bfc.quant.formats import format_of_dtype


def _rewrite_node(b: GraphBuilder, sn, plan, target, tensors, low_rank, rotated=None) -> None:
    node, q = sn.node, plan.weights
    n_out = plan.site.weight.shape[1]
    model_dtype = np.dtype(plan.site.weight.dtype)
    x, y = node.inputs[1 if sn.trans_out else 0], node.outputs[0]
    c = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    node.outputs, node.inputs = [], []
    if y.shape is None and x.shape is not None:      # a graph output keeps a declared shape
        lead = [x.shape[-1]] if sn.trans_a else list(x.shape[:-1])
        y.shape = [n_out] + lead if sn.trans_out else lead + [n_out]
    rank = sn.in_rank
    if sn.trans_a:
        x, rank = b.op("Transpose", [x], {"perm": [1, 0]}, dtype=model_dtype), 2
    if b.dtype != model_dtype:
        x = b.cast(x, b.dtype, format_of_dtype(b.dtype).onnx_type)
    bias = None
    if (isinstance(c, gs.Constant) and sn.alpha == 1.0 and low_rank is None
            and np.asarray(c.values).size == n_out and np.asarray(c.values).ndim <= 2):
        bias = b.const("bias", (np.asarray(c.values, np.float64).reshape(n_out) * sn.beta).astype(b.dtype))
        c = None
    if getattr(q, "family", "ks") == "rotated":
        key = (id(b.graph), x.name, id(q.rotation), rank)

        def shared_xq():
            if key not in rotated:
                rotated[key] = target.rotate(b, x, rank, q.rotation)
            return rotated[key]
        out = target.emit_rotated(b, x, rank, tensors, q, bias, shared_xq)
    else:
        out = target.emit(b, x, rank, tensors, q, bias)
    if low_rank is not None:
        u, vt = low_rank
        out = b.op("Add", [out, b.op("MatMul", [b.op("MatMul", [x, u]), vt])])
    if sn.alpha != 1.0:
        out = b.op("Mul", [out, b.const("alpha", np.array(sn.alpha, b.dtype))])
    if c is not None:
        if isinstance(c, gs.Constant):
            c = b.const("c", (np.asarray(c.values, np.float64) * sn.beta).astype(b.dtype))
        else:
            if b.dtype != model_dtype:
                c = b.cast(c, b.dtype, format_of_dtype(b.dtype).onnx_type)
            if sn.beta != 1.0:
                c = b.op("Mul", [c, b.const("beta", np.array(sn.beta, b.dtype))])
        out = b.op("Add", [out, c])
    if b.dtype != model_dtype:
        out = b.cast(out, model_dtype, format_of_dtype(model_dtype).onnx_type)
    if sn.trans_out:
        out = b.op("Transpose", [out], {"perm": [1, 0]}, dtype=model_dtype)
    b.route(out, y)


def rewrite(graph: gs.Graph, plans, target, opset: int = 21) -> int:
    """Rewrite every planned layer of ``graph`` (and of its subgraphs) with ``target``; returns the
    number of nodes rewritten."""
    done = 0
    rotated: dict = {}          # (graph, input tensor, rotation, rank) -> x Q, shared by the layers reading it
    for li, plan in enumerate(plans):
        if not plan.rewritten:
            continue
        q = plan.weights
        dtype = target.compute_dtype(np.dtype(plan.site.weight.dtype))
        by_graph: dict[int, tuple] = {}
        for sn in plan.site.nodes:
            g = sn.graph if sn.graph is not None else graph
            by_graph.setdefault(id(g), (g, []))[1].append(sn)
        for gi, (g, nodes) in enumerate(by_graph.values()):
            suffix = "" if gi == 0 else f"_g{gi}"       # names stay unique across nested scopes
            b = GraphBuilder(g, f"{BFC_PREFIX}{li}_{plan.site.name.replace('/', '_')}{suffix}", dtype, opset)
            tensors = target.tensors(b, q)
            low_rank = None if q.low_rank is None else (
                b.const("U", q.low_rank[0].astype(dtype)),
                b.const("Vt", np.ascontiguousarray(q.low_rank[1].T).astype(dtype)))
            for sn in nodes:
                _rewrite_node(b, sn, plan, target, tensors, low_rank, rotated)
                done += 1
    graph.cleanup().toposort()
    return done


def _with_site_notes(plans) -> None:
    for p in plans:
        note = getattr(p.site, "note", None)
        if note and (p.note is None or note not in p.note):
            p.note = note if p.note is None else f"{note}; {p.note}"


class Rewrite(GraphPass):
    contract = Contract.of(requires={"plans", "guarded", "distilled"}, ensures={"rewritten"}, in_place=True)

    def run(self, state) -> PassResult:
        _with_site_notes(state.plans)
        from bfc.passes.lowbit_plan import assign_rotation_owners
        assign_rotation_owners(state.plans)       # the guard may have backed off a rotation's first user
        done = rewrite(state.graph, state.plans, state.target, default_opset(state.model))
        return PassResult(changed=done > 0, skipped={p.site.name: p.reason for p in state.plans if not p.rewritten})
