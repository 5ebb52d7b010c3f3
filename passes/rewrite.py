"""Rewrite: every planned layer's nodes are replaced by what the target emits.

``rewrite_model(loaded, plan, target, fix_batch)`` (the pipeline's rewrite stage) imports a fresh
graph of the input, rewrites the planned layers in it and exports it (``bfc.passes.export``):
a RewrittenModel; the input model is never changed.  The guard and the latency check build
their trial models the same way (``rewritten``).
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
T is the emitter the target registered for the plan's form (``bfc.passes.targets``).  A form
with a rotation (rotated low-bit) gets x Q emitted once per graph, input tensor x and rotation
Q (``target.rotate``) and shared by every layer reading x with that Q (Q, K, V projections); the
rotation's bytes are counted by the first rewritten layer of its group.
Each plan's note is prefixed with its site's note (folded weight chain, dequantized
weight, planned without calibration), so the report says how the weight was found.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from bfc.passes.export import export, pin_batch
from bfc.passes.find_sites import BFC_PREFIX, find_sites
from bfc.passes.graph_builder import GraphBuilder
from bfc.passes.lowbit_plan import assign_rotation_owners
from bfc.passes.model_io.stream import import_graph, model_size
from bfc.passes.products import LoadedModel, Plan, RewrittenModel
from bfc.quant.embedding import QuantizedEmbedding
from bfc.quant.formats import format_of_dtype


def _rewrite_node(b: GraphBuilder, sn, plan, target, emitter, tensors, low_rank, rotated) -> None:
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
    key = (id(b.graph), x.name, id(getattr(q, "rotation", None)), rank)

    def shared_xq():
        if key not in rotated:
            rotated[key] = target.rotate(b, x, rank, q.rotation)
        return rotated[key]
    out = emitter.emit(b, x, rank, tensors, q, bias, shared_xq)
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


def _rewrite_gather(b: GraphBuilder, sn, form, emitter, tensors) -> None:
    """y = T[indices] -> the form's dequantized rows (the output tensor keeps its name)."""
    node = sn.node
    indices, y = node.inputs[1], node.outputs[0]
    node.inputs, node.outputs = [], []
    if y.dtype is None:
        y.dtype = b.dtype
    b.route(emitter.emit(b, indices, None, tensors, form, None, None), y)


def rewrite(graph: gs.Graph, plans, target, opset: int) -> int:
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
            emitter = target.emitter(q)
            tensors = emitter.tensors(b, q)
            if isinstance(q, QuantizedEmbedding):
                for sn in nodes:
                    _rewrite_gather(b, sn, q, emitter, tensors)
                    done += 1
                continue
            low_rank = None if q.low_rank is None else (
                b.const("U", q.low_rank[0].astype(dtype)),
                b.const("Vt", np.ascontiguousarray(q.low_rank[1].T).astype(dtype)))
            for sn in nodes:
                _rewrite_node(b, sn, plan, target, emitter, tensors, low_rank, rotated)
                done += 1
    graph.cleanup().toposort()
    return done


def rewritten(model, plans, target, opset: int, base=None, updates=None):
    """``model`` with ``plans`` rewritten by ``target``: a fresh import (``model`` is untouched; a
    skeleton's untouched weights stay references relative to ``base``); ``updates``: new values of
    graph tensors by name (e.g. distilled LayerNorm scales)."""
    graph = import_graph(model, base)
    fresh = {s.weight_name: s for s in find_sites(graph)}
    moved = [replace(p, site=fresh[p.site.weight_name]) for p in plans]
    rewrite(graph, moved, target, opset)
    tensors = graph.tensors()
    for name, value in (updates or {}).items():
        t = tensors.get(name)
        if t is not None and hasattr(t, "values"):
            t.values = value.astype(np.asarray(t.values).dtype)
    return export(graph, model, [p.site.name for p in moved if p.rewritten], base)


def rewrite_model(loaded: LoadedModel, plan: Plan, target, fix_batch: int | None) -> RewrittenModel:
    """The rewrite stage (see the module doc); nothing rewritten and no batch to pin: the input as it is."""
    if not plan.rewritten and fix_batch is None:
        return RewrittenModel(loaded.model, loaded.base, model_size(loaded.model, loaded.base), changed=False)
    layers = assign_rotation_owners(list(plan.layers))       # the guard may have backed off a rotation's first user
    out = rewritten(loaded.model, layers, target, loaded.opset, loaded.base, plan.tensor_updates)
    if fix_batch is not None:
        out = pin_batch(out, fix_batch, loaded.base)
    return RewrittenModel(out, loaded.base, model_size(out, loaded.base),
                          changed=bool(plan.rewritten) or fix_batch is not None)


def never_larger(loaded: LoadedModel, plan: Plan, rewritten: RewrittenModel, target,
                 fix_batch: int | None) -> tuple[Plan, RewrittenModel]:
    """The input, unchanged, where the rewrite would be larger than it (``RewrittenModel.nbytes`` against
    the input's files, or its bytes in memory): the layers' savings were smaller than what their forms add
    (rotations, scales, graph nodes) -- seen on models of a few small layers with fixed structures, and on
    inputs whose weights are already stored as int8 or float16.
    Every layer is then reported dense with that reason; a pinned batch (``fix_batch``) is kept."""
    before = loaded.input_bytes
    if not plan.rewritten or rewritten.nbytes <= before:
        return plan, rewritten
    why = (f"not written: the rewritten model ({rewritten.nbytes} bytes) would be larger than the input "
           f"({before} bytes): the chosen forms add more (rotations, scales, nodes) than they save, or the input "
           "already stores its weights compactly")
    plan = replace(plan, layers=tuple(p.kept_dense(why) if p.rewritten else p for p in plan.layers),
                   notes=plan.notes + (why,))
    return plan, rewrite_model(loaded, plan, target, fix_batch)

