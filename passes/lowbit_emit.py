"""Graph emission of rotated low-bit layers, shared by the portable and ort targets.

Algebra, for ``layer = RotatedLayer(Q, deq(W_r), C)`` and x of shape [..., K]:
  x2 = Reshape(x, [-1, K])                              (skipped for 2-D x)
  xr = x2 Q                                             the rotation (``rotate``: m x m blocks and butterfly
                                                        stages from fp16 angles, no index tensors); one per
                                                        input tensor and Q (the rewrite shares it)
  y2 = low-bit matmul(xr)                               target-specific (``unpacked_weight`` + MatMul, or
                                                        com.microsoft.MatMulNBits)
     + MatMul(MatMul(x2, DQ(U)), DQ(V)^T)               int8 correction (per-column scales), if any
     + bias
  y  = Reshape(y2, Shape(x)[:-1] ++ [N])
Unpacking (portable, opset >= 18): the codes of W_r padded to whole groups (Kp = n_groups * g
rows, pad = the zero level), flattened row-major and packed LSB first (``bfc.lowbit.packing``)
are one uint8 initializer; in the graph, code t of a word is ``(word >> t*bits) & mask``
(BitShift, BitwiseAnd) with word = one byte (2/4 bits) or three bytes as a uint32 (3 bits);
then ``(code - 2^(b-1))`` in float, times the group scales broadcast over (n_groups, g, N).
The custom-op target emits the same packed stream (``bfc.ops.lowbit_codes_stream``) as the
``codes`` input of one ``ai.bfc.LowBitMatMul`` node (rotation fused, unpacked in its kernel) and
uses ``finish`` and ``correction_tensors`` below.
Every input of the unpacking is constant, so runtimes fold it once at load; the file holds
b bits per weight (plus scales), which is what the report counts.
"""
from __future__ import annotations

from math import lcm

import numpy as np

from bfc.factorize.result import KSFactorization
from bfc.lowbit.kron_rotation import KroneckerRotation
from bfc.lowbit.rotation import split_size
from bfc.ops import lowbit_codes_stream
from bfc.passes.ks_emit import emit_chain, factor_tensors
from bfc.passes.rotation_emit import emit_rotation
from bfc.quant import cast
from bfc.quant.formats import format_of_dtype

UNPACK_OPSET = 18     # BitwiseAnd


def rotation_factorization(rotation):
    """Q as a QuantizedFactorization of float values in the rotation's storage type (fp16/fp32)."""
    fmt = "fp16" if np.dtype(rotation.storage) == np.float16 else "fp32"
    return cast(KSFactorization(rotation.chain, tuple(rotation.values)), fmt)


def _const_f(b, v: np.ndarray, storage):
    t = b.const("rot", np.asarray(v, storage))
    return t if np.dtype(storage) == b.dtype else b.cast(t, b.dtype, format_of_dtype(b.dtype).onnx_type)


def rotate(b, x, rank, rotation):
    """x Q (rows, K).  With angle parameters (``ButterflyRotation.params``), row-major and without index
    tensors (the file holds only the m x m blocks and the angles, as the report counts):
      factor 0 (1, m, m, d):  h[r, j, l] = sum_k x[r, k, l] V[k, j, l]   Reshape, Mul, ReduceSum
      stage (a, 2, 2, d'):    h viewed (rows, a, 2, d'); with c = cos t, s = sin t of shape (a, 1, d'),
                              y_0 = c x_0 + s x_1,  y_1 = s x_0 - c x_1           Slice, Mul, Add/Sub, Concat
    (the canonical values of these patterns, ``bfc.lowbit.rotation``); Cos/Sin of the constant angles are
    folded by the runtime at load.  Without parameters: the portable target's KS chain code."""
    k_dim = rotation.size
    if isinstance(rotation, KroneckerRotation):         # two batched MatMuls (bfc.passes.rotation_emit); its
        return emit_rotation(b, x, rotation, rank)      # first Reshape reads x in any rank
    x2 = b.reshape(x, [-1, k_dim]) if rank != 2 else x
    if rotation.params is None:
        q = rotation_factorization(rotation)
        return emit_chain(b, x2, q, factor_tensors(b, q))
    m, k = split_size(k_dim)
    d = 2 ** k
    v0 = rotation.values[0][0]                                     # (d, m_in, m_out)
    if m == 1:
        h = b.op("Mul", [x2, _const_f(b, v0[:, 0, 0], rotation.storage)])
    else:
        h = b.reshape(x2, [-1, m, 1, d])
        h = b.op("Mul", [h, _const_f(b, v0.transpose(1, 2, 0), rotation.storage)])     # (rows, m, m, d)
        h = b.op("ReduceSum", [h, b.const("axes", np.array([1], np.int64))], {"keepdims": 0})
    ax = b.const("axes", np.array([2], np.int64))
    cut = [b.const("at", np.array([i], np.int64)) for i in range(3)]
    for t in rotation.params.angles:
        a, dd = t.shape
        h = b.reshape(h, [-1, a, 2, dd])
        x0 = b.op("Slice", [h, cut[0], cut[1], ax])
        x1 = b.op("Slice", [h, cut[1], cut[2], ax])
        ang = b.reshape(_const_f(b, t.reshape(-1), rotation.storage), [a, 1, dd])
        c, s = b.op("Cos", [ang]), b.op("Sin", [ang])
        y0 = b.op("Add", [b.op("Mul", [c, x0]), b.op("Mul", [s, x1])])
        y1 = b.op("Sub", [b.op("Mul", [s, x0]), b.op("Mul", [c, x1])])
        h = b.op("Concat", [y0, y1], {"axis": 2})
    return b.reshape(h, [-1, k_dim])


def _scales(b, s: np.ndarray, shape):
    t = b.const("scales", np.ascontiguousarray(s).reshape(shape))
    if s.dtype != b.dtype:
        t = b.cast(t, b.dtype, format_of_dtype(b.dtype).onnx_type)
    return t


def unpacked_weight(b, gq):
    """deq(W_r) (K, N) in the builder's float type from packed codes (see the module doc)."""
    k, n = gq.shape
    g, ng, bits = gq.group_size, gq.n_groups, gq.bits
    kp = ng * g
    count = kp * n
    stream = lowbit_codes_stream(gq.codes(), g, bits)
    per = lcm(bits, 8) // bits
    if bits == 3:
        bytes3 = b.op("Reshape", [b.const("codes", stream), b.const("shape", np.array([-1, 3], np.int64))],
                      dtype=np.uint8)
        words = b.cast(bytes3, np.uint32, 12)                                           # TensorProto.UINT32
        cols = [b.op("Gather", [words, b.const("col", np.array(j, np.int64))], {"axis": 1}, dtype=np.uint32)
                for j in range(3)]
        word = cols[0]
        for j in (1, 2):
            sh = b.op("BitShift", [cols[j], b.const("shift", np.array(8 * j, np.uint32))], {"direction": "LEFT"},
                      dtype=np.uint32)
            word = b.op("Add", [word, sh], dtype=np.uint32)
        wdt = np.uint32
    else:
        word, wdt = b.const("codes", stream), np.uint8
    mask = b.const("mask", np.array((1 << bits) - 1, wdt))
    parts = []
    for t in range(per):
        v = word if t == 0 else b.op("BitShift", [word, b.const("shift", np.array(t * bits, wdt))],
                                     {"direction": "RIGHT"}, dtype=wdt)
        v = b.op("BitwiseAnd", [v, mask], dtype=wdt)
        parts.append(b.op("Reshape", [v, b.const("shape", np.array([-1, 1], np.int64))], dtype=wdt))
    u = b.op("Concat", parts, {"axis": 1}, dtype=wdt) if per > 1 else parts[0]
    u = b.op("Reshape", [u, b.const("shape", np.array([-1], np.int64))], dtype=wdt)
    if stream.size * 8 // bits > count:
        u = b.op("Slice", [u, b.const("start", np.array([0], np.int64)), b.const("end", np.array([count], np.int64))],
                 dtype=wdt)
    f = b.cast(u, b.dtype, format_of_dtype(b.dtype).onnx_type)
    f = b.op("Sub", [f, b.const("zero", np.array(1 << (bits - 1), b.dtype))])
    f = b.reshape(f, [ng, g, n])
    f = b.op("Mul", [f, _scales(b, gq.scales, (ng, 1, n))])
    f = b.reshape(f, [kp, n])
    if kp > k:
        f = b.op("Slice", [f, b.const("start", np.array([0], np.int64)), b.const("end", np.array([k], np.int64))])
    return f


def correction_tensors(b, corr):
    """(U (K, r), V^T (r, N)) in the builder's float type: int8 in the file, Cast and Mul by the per-component
    scales (not DequantizeLinear: onnxruntime fuses DequantizeLinear + MatMul into an int8-activation
    kernel, which is not the float function the planner scored)."""
    if corr is None:
        return None
    onnx_type = format_of_dtype(b.dtype).onnx_type
    u = b.op("Mul", [b.cast(b.const("U", corr.u), b.dtype, onnx_type),
                     b.const("u_scale", corr.u_scale.astype(b.dtype).reshape(1, -1))])
    vt = b.op("Mul", [b.cast(b.const("Vt", np.ascontiguousarray(corr.v.T)), b.dtype, onnx_type),
                      b.const("v_scale", corr.v_scale.astype(b.dtype).reshape(-1, 1))])
    return u, vt


def finish(b, x, rank, layer, y2, correction, bias):
    """y2 (rows, N) + correction + bias, reshaped to [..., N] (see the module doc)."""
    k, n = layer.shape
    if correction is not None:
        x2 = b.reshape(x, [-1, k]) if rank != 2 else x
        y2 = b.op("Add", [y2, b.op("MatMul", [b.op("MatMul", [x2, correction[0]]), correction[1]])])
    if bias is not None:
        y2 = b.op("Add", [y2, bias])
    if rank == 2:
        return y2
    shape = b.op("Shape", [x], dtype=np.int64)
    lead = b.op("Slice", [shape, b.const("start", np.array([0], np.int64)),
                          b.const("end", np.array([-1], np.int64))], dtype=np.int64)
    tgt = b.op("Concat", [lead, b.const("n", np.array([n], np.int64))], {"axis": 0}, dtype=np.int64)
    return b.op("Reshape", [y2, tgt])
