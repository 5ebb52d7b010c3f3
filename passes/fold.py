"""Fold: the constant value of a weight computed by a chain of constant ops (used by ``find_sites``).

Weight chains (``fold_weight``, called by ``find_sites`` on the graphsurgeon graph):
a MatMul/Gemm weight input produced by a chain of
  Identity | Transpose | Cast | Reshape | Flatten | Unsqueeze | Squeeze |
  DequantizeLinear (per tensor, per axis, blocked; with zero point) | Mul | Div
whose every input is constant (an initializer, a ``Constant`` node or another such
chain) is evaluated once in numpy with ONNX semantics (dtypes included: a Cast to
float32 of an fp16 weight gives a float32 site weight).  The graph itself is not
changed: the rewrite replaces the MatMul node and its input edge, after which graph
cleanup removes the chain unless another node still reads it.  (Not rewiring also
means a site that stays dense leaves the model byte-identical: no float copy of an
int8 DequantizeLinear weight is ever added.)
Weights read as references (``bfc.passes.model_io.stream``) stay on disk: a plain initializer's
value is a ``FileArray``; a chain over one is evaluated once (for its shape and type) and
kept as a ``ComputedArray`` that re-reads its sources and re-evaluates the chain when used.
A folded weight's group key is the chain itself (op types, attributes, source tensor
names; small constants such as Reshape shapes by value), so several copies of one
chain over one source weight (e.g. one Transpose per consumer) are factorized once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bfc.passes.model_io.stream import ComputedArray, LazyArray, lazy_value

FOLDABLE = ("Identity", "Transpose", "Cast", "Reshape", "Flatten", "Unsqueeze", "Squeeze",
            "DequantizeLinear", "Mul", "Div")
MAX_CHAIN = 16        # nodes followed back from a weight input
SMALL = 64            # constants of at most this many values are keyed by value (shapes, axes, scales)


@dataclass(frozen=True)
class Folded:
    value: np.ndarray          # or a LazyArray (bfc.passes.model_io.stream) when a source weight is still on disk
    key: tuple                 # hashable description of the chain (group key)
    ops: tuple[str, ...]       # op types of the chain, source first ("" for a plain constant)
    sources: tuple[str, ...]   # names of the large source constants
    dequantized: bool          # a DequantizeLinear is on the chain


def _leaf(t):
    """A constant's value: an ndarray, or a LazyArray while the weight is still in its file."""
    if isinstance(t, gs.Constant):
        lazy = lazy_value(t)
        if lazy is not None:
            return lazy if lazy.size > SMALL else lazy.read()
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
    return None


def _attr_key(attrs) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in attrs.items() if not isinstance(v, gs.Graph)))


def fold_weight(t, depth: int = 0) -> Folded | None:
    """The constant value of tensor ``t`` with the chain that computes it, or None when ``t`` is not
    a constant or a foldable chain of constants (see the module doc)."""
    v = _leaf(t)
    if v is not None:
        key = ("const", v.dtype.str, v.shape, v.tobytes()) if v.size <= SMALL else ("tensor", t.name, id(t))
        return Folded(v, key, (), () if v.size <= SMALL else (t.name,), False)
    if depth >= MAX_CHAIN or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op not in FOLDABLE or (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    ins = []
    for i in node.inputs:
        if not i.name:                       # an omitted optional input
            ins.append(None)
            continue
        f = fold_weight(i, depth + 1)
        if f is None:
            return None
        ins.append(f)
    vals = [None if f is None else f.value for f in ins]
    try:
        value = _evaluate(node, [v.read() if isinstance(v, LazyArray) else v for v in vals])
    except (ValueError, TypeError, IndexError, KeyError):
        return None                          # not valid ONNX for these values: leave it to the runtime
    if value is None:
        return None
    if any(isinstance(v, LazyArray) for v in vals):   # a weight still on disk: recomputed when used
        value = np.asarray(value)
        value = ComputedArray(lambda: _evaluate(node, [v.read() if isinstance(v, LazyArray) else v for v in vals]),
                              value.shape, value.dtype)
    key = (node.op, _attr_key(node.attrs), tuple(None if f is None else f.key for f in ins))
    srcs = tuple(s for f in ins if f is not None for s in f.sources)
    ops = max((f.ops for f in ins if f is not None), key=len) + (node.op,)
    return Folded(value if isinstance(value, LazyArray) else np.asarray(value), key, ops, srcs,
                  node.op == "DequantizeLinear" or any(f is not None and f.dequantized for f in ins))


def _axes(node, vals) -> list[int] | None:
    if len(vals) > 1 and vals[1] is not None:
        return [int(a) for a in np.asarray(vals[1]).reshape(-1)]
    a = node.attrs.get("axes")
    return None if a is None else [int(x) for x in a]


def _evaluate(node, vals):
    """numpy value of one foldable node with constant inputs ``vals`` (ONNX semantics)."""
    op, a, x = node.op, node.attrs, vals[0]
    if op == "Identity":
        return x
    if op == "Transpose":
        perm = a.get("perm")
        return np.transpose(x, None if perm is None else [int(p) for p in perm])
    if op == "Cast":
        to = onnx.helper.tensor_dtype_to_np_dtype(int(a["to"]))
        return x.astype(to)
    if op == "Reshape":
        shape = [int(s) for s in np.asarray(vals[1]).reshape(-1)]
        if not int(a.get("allowzero", 0)):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Flatten":
        ax = int(a.get("axis", 1))
        ax = ax + x.ndim if ax < 0 else ax
        return x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)
    if op == "Unsqueeze":
        axes = _axes(node, vals)
        out_rank = x.ndim + len(axes)
        for ax in sorted(ax + out_rank if ax < 0 else ax for ax in axes):
            x = np.expand_dims(x, ax)
        return x
    if op == "Squeeze":
        axes = _axes(node, vals)
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(ax + x.ndim if ax < 0 else ax for ax in axes))
    if op == "DequantizeLinear":
        scale = vals[1]
        zp = vals[2] if len(vals) > 2 and vals[2] is not None else np.zeros((), x.dtype)
        xi = x.astype(np.float32) - zp.astype(np.float32).reshape(-1)[0] if zp.size == 1 else x.astype(np.float32)
        if scale.size == 1:                  # per tensor
            out = xi * scale.astype(np.float32).reshape(())
        else:
            axis = int(a.get("axis", 1))
            axis = axis + x.ndim if axis < 0 else axis
            block = int(a.get("block_size", 0))
            s, z = scale.astype(np.float32), np.asarray(zp, np.float32)
            if block > 0:                    # blocked (opset 21): scale has x's rank, ceil(dim/block) on axis
                s = np.repeat(s, block, axis=axis).take(range(x.shape[axis]), axis=axis)
                if z.ndim:
                    z = np.repeat(z, block, axis=axis).take(range(x.shape[axis]), axis=axis)
                out = (x.astype(np.float32) - z) * s
            else:
                shape = [1] * x.ndim
                shape[axis] = -1
                if z.ndim:
                    xi = x.astype(np.float32) - z.reshape(shape)
                out = xi * s.reshape(shape)
        out_type = a.get("output_dtype", 0)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(int(out_type)) if out_type else scale.dtype
        return out.astype(dtype)
    if op in ("Mul", "Div"):
        y = vals[1]
        if x.dtype != y.dtype:
            return None
        return (np.multiply if op == "Mul" else np.divide)(x, y).astype(x.dtype)
    return None
