"""Head rotations folded into the attention's value projection: the output projection's rotation for free.

For a fused ``com.microsoft.MultiHeadAttention`` (``bfc.passes.fuse``) with H heads of width d whose value
input is ``v = x W_v (+ b_v)`` and whose output feeds the output projection ``o = ctx W_o`` (constant
float32 weights, each read by that node only), take the per-head rotation

    Q = I_H (x) P,    P a d x d randomized Hadamard-like block (``KroneckerRotation.block_diagonal(H d, d)``).

Attention mixes positions within a head and never features across heads, so per head
``softmax(.) (v_h P) = (softmax(.) v_h) P``, i.e. ``MHA(q, k, v Q) = MHA(q, k, v) Q``; with

    W_v' = W_v Q,   b_v' = b_v Q,   W_o' = Q^T W_o

the model computes the same function (float32 rounding of the new weights aside: ~1e-7 relative).
The output projection's input then arrives rotated: its low-bit codes quantize ``W_o'`` with no
rotation at run time (``LoadedModel.prerotated`` names that input tensor; the allocator gives its
sites no rotation of their own).  Q costs no node and no byte: it lives in the weights.
The value projection's own input (shared with Q and K) keeps its rotation; only the
allocator (``--structure auto``) on the fused graph uses this stage.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from bfc.lowbit.kron_rotation import KroneckerRotation
from bfc.passes.model_io.stream import file_array
from bfc.passes.products import LoadedModel

MS_DOMAIN = "com.microsoft"


def _value(t: onnx.TensorProto, base) -> np.ndarray:
    """An initializer's values (read from the input's files for a skeleton's reference)."""
    on_disk = file_array(t, base)
    return numpy_helper.to_array(t) if on_disk is None else on_disk.read()


def _foldable(g: onnx.GraphProto) -> list[tuple]:
    """(MHA node, V MatMul, V bias Add or None, O MatMul) for each attention the fold applies to."""
    prod = {o: n for n in g.node for o in n.output if o}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}

    def weight(name, ndim):
        t = inits.get(name)
        ok = t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == ndim
        return ok and len(cons.get(name, ())) == 1

    out = []
    for n in g.node:
        if n.domain != MS_DOMAIN or n.op_type != "MultiHeadAttention" or len(n.input) < 3:
            continue
        if len(n.input) > 3 and n.input[3]:                  # packed Q/K/V bias: it would need Q too
            continue
        add, mm = None, prod.get(n.input[2])
        if mm is not None and mm.op_type == "Add" and len(cons.get(mm.output[0], ())) == 1:
            add = mm
            ins = list(add.input)
            bias = next((i for i in ins if weight(i, 1)), None)
            mm = prod.get(ins[1 - ins.index(bias)]) if bias is not None else None
        if mm is None or mm.op_type != "MatMul" or not weight(mm.input[1], 2) or \
                len(cons.get(mm.output[0], ())) != 1:
            continue
        users = cons.get(n.output[0], ())
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != n.output[0] or \
                not weight(users[0].input[1], 2):
            continue
        width = inits[mm.input[1]].dims[1]
        heads = next((a.i for a in n.attribute if a.name == "num_heads"), 0)
        if heads < 1 or width % heads or inits[users[0].input[1]].dims[0] != width:
            continue
        out.append((n, mm, add, users[0], int(width), int(heads)))
    return out


def fold_head_rotations(loaded: LoadedModel, enabled: bool, seed: int) -> LoadedModel:
    """The stage (module doc): a copy of the model with every foldable attention's value and output
    projections rotated, ``prerotated`` naming the output projections' inputs; the input as it is
    when ``enabled`` is false or nothing folds."""
    if not enabled:
        return loaded
    found = _foldable(loaded.model.graph)
    if not found:
        return loaded
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    inits = {t.name: t for t in model.graph.initializer}

    def put(name, value):
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))

    prerotated = set(loaded.prerotated)
    for mha, mm, add, out, width, heads in found:
        q = KroneckerRotation.block_diagonal(width, width // heads, seed)
        wv = _value(inits[mm.input[1]], loaded.base).astype(np.float64)
        put(mm.input[1], q.apply(wv))                                       # W_v Q
        if add is not None:
            bias = next(i for i in add.input if i in inits)
            put(bias, q.apply(_value(inits[bias], loaded.base).astype(np.float64)))   # b_v Q
        put(out.input[1], q.rotate_weight(_value(inits[out.input[1]], loaded.base)))   # Q^T W_o
        prerotated.add(out.input[0])
    note = (f"head rotations: {len(found)} attention output projection(s) read a per-head rotation folded into "
            "the value projection (no rotation node for them)")
    return replace(loaded, model=model, upgraded=True, prerotated=frozenset(prerotated),
                   notes=loaded.notes + (note,))
