"""Standard-op emission of a KS factor chain (used by the portable target and for rotations stored as chains).

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
  [..., M] inputs    Reshape to (N, M) and back to [..., N_out] via Shape/Slice/Concat
                     (valid for unnamed dynamic dims: only the last axis is fixed).
Cost: L MatMuls + at most L+1 row Gathers + 2 transposes; a Gather moves rows of N
contiguous values, which is far cheaper in onnxruntime than a 4-D/6-D Transpose.
Values: int8/fp8/int4 stay in the file behind a per-axis DequantizeLinear on axis 0 (per-tensor
and (a, d, 1, 1) scales on the (a*d, c, b) view, (a, d, 1, c) scales on the (a*d*c, b)
view then a Reshape): the same numbers as opset 21's blocked form over (a*d, c, b) with
block_size b, but onnxruntime runs it ~7x faster and it needs only opset 13 (fp8: 19; int4: 21,
stored as ONNX INT4, two values per byte);
fp16 values are Cast to the model's float type; fp32 values are plain initializers.
Numerics: the float product of the dequantized factors (``q.apply``), in the model's type.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from bfc.factorize import inverse_perm
from bfc.quant.formats import format_of_dtype


def _values_const(b, q, what: str, v: np.ndarray):
    """Initializer of stored values; int4 (held as int8 in memory) becomes an ONNX INT4 tensor,
    packed two per byte (DequantizeLinear-21 reads it)."""
    if q.fmt != "int4":
        return b.const(what, v)
    name = b.name(what)
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(v).astype(ml_dtypes.int4), name)))


def _factor_weight(b, q, l: int):
    """Graph tensor holding factor l transposed per block, (a*d, c, b), in the model's float type."""
    p = q.chain[l]
    ad, bb, cc = p.a * p.d, p.b, p.c
    v = np.ascontiguousarray(q.values[l].reshape(ad, bb, cc).transpose(0, 2, 1))
    s = q.scales[l]
    if not q.format.is_float or q.format.bits == 8:
        # per-axis DequantizeLinear on axis 0 only: onnxruntime runs it ~7x faster than the blocked
        # form on the last axis.  (a, d, 1, c) scales become one scale per row of the (a*d*c, b) view.
        # Scales of another float type than float32 need DequantizeLinear-19: below, float32 scales
        # and one Cast of the dequantized factor to the model's type.
        sdt = b.dtype if b.dtype == np.float32 or getattr(b, "opset", 21) >= 19 else np.dtype(np.float32)
        sd = np.broadcast_to(s.astype(sdt), (p.a, p.d, 1, cc)).reshape(ad * cc)
        per_tensor_row = bool(np.all(sd == sd[0]) or s.shape[3] == 1)
        if per_tensor_row:
            w = b.op("DequantizeLinear", [_values_const(b, q, "q", v), b.const("scale", sd.reshape(ad, cc)[:, 0])],
                     {"axis": 0}, dtype=sdt)
        else:
            w = b.op("DequantizeLinear", [_values_const(b, q, "q", v.reshape(ad * cc, bb)), b.const("scale", sd)],
                     {"axis": 0}, dtype=sdt)
        if sdt != b.dtype:
            w = b.cast(w, b.dtype, format_of_dtype(b.dtype).onnx_type)
        return w if per_tensor_row else b.reshape(w, [ad, cc, bb])
    if np.any(s != 1):
        full = q.values[l].astype(np.float32) * s
        v = np.ascontiguousarray(full.reshape(ad, bb, cc).transpose(0, 2, 1)).astype(v.dtype)
    if v.dtype == b.dtype or q.fmt == "fp32":
        return b.const("w", v.astype(b.dtype))
    return b.cast(b.const("w", v), b.dtype, format_of_dtype(b.dtype).onnx_type)


def _in_feature(p) -> np.ndarray:
    """Feature index held by each row of the (a*d, b) input layout of pattern p."""
    return p.row_index()[..., 0].reshape(-1)


def _out_position(p) -> np.ndarray:
    """Row (in the (a*d, c) output layout) that holds each output feature of pattern p."""
    feat = p.col_index()[:, :, 0, :].reshape(-1)
    pos = np.empty_like(feat)
    pos[feat] = np.arange(feat.size)
    return pos


def _gather_rows(b, h, idx: np.ndarray, rows: int):
    """h viewed (rows, N), rows reordered by idx (skipped when idx is the identity)."""
    h = b.reshape(h, [rows, -1])
    if np.array_equal(idx, np.arange(idx.size)):
        return h
    return b.op("Gather", [h, b.const("idx", idx.astype(np.int32))], {"axis": 0})


def factor_tensors(b, q):
    """Graph tensors of every factor of ``q`` (see ``_factor_weight``)."""
    return [_factor_weight(b, q, l) for l in range(len(q.chain))]


def emit_chain(b, x2, q, weights):
    """x2 (N, M) -> (x2 P_row^T) K_1 ... K_L P_col as (N, N_out), feature-major (see module doc)."""
    pats = list(q.chain)
    h = b.op("Transpose", [x2], {"perm": [1, 0]})                    # (M, N)
    idx = _in_feature(pats[0])
    if q.row_perm is not None:
        idx = np.asarray(q.row_perm)[idx]
    h = _gather_rows(b, h, idx, pats[0].shape[0])
    for l, (p, w) in enumerate(zip(pats, weights)):
        h = b.reshape(h, [p.a * p.d, p.b, -1])
        h = b.op("MatMul", [w, h])                                    # (a*d, c, N)
        pos = _out_position(p)
        if l + 1 < len(pats):
            idx = pos[_in_feature(pats[l + 1])]
        else:
            idx = pos if q.col_perm is None else pos[inverse_perm(np.asarray(q.col_perm))]
        h = _gather_rows(b, h, idx, p.shape[1])
    return b.op("Transpose", [h], {"perm": [1, 0]})                  # (N, N_out)
