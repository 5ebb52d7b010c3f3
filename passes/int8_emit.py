"""Integer-MatMul emission: a layer stored compactly, computed as onnxruntime ``quantize_dynamic`` computes.

Compute (``emit_int8_matmul``), x of any rank [..., K] (MatMulInteger takes N-D A and 2-D B)::

    x_u8, x_scale, x_zp = DynamicQuantizeLinear(x)            (Cast to float32 first for an fp16 builder)
    acc = MatMulInteger(x_u8, W_s8, x_zp)                     int32 [..., N]
    y   = Mul(Cast(acc, float), Mul(x_scale, col_scale))      (+ Add(bias))

onnxruntime (graph optimization level >= extended, the default) fuses these nodes into one
``com.microsoft.DynamicQuantizeMatMul`` (per-column scale allowed), exactly as it does for
``quantize_dynamic``'s own graphs; the numerics are ``bfc.lowbit.int8_fold.int8_matmul``.

Storage (``emit_folded_codes``): the weight as packed b-bit group codes (``bfc.ops.lowbit_codes_stream``:
the (Kp, N) codes, Kp = n_groups * g rows padded with the zero level 2^(b-1), flattened row-major, packed
LSB first, ``bfc.lowbit.packing``; the same bytes ``lowbit_emit.unpacked_weight`` reads) and fp16/fp32
group scales (n_groups, N).  A subgraph of standard ops whose inputs are all constants turns them into
W_s8 (K, N) int8 and col_scale (N,) float32::

    v     = BitwiseXor(stream, packed zero level)          top bit of every code flipped: two's complement
    v     = the code moved to the top bits of a byte       BitShift on uint8 (2/4 bits: >> t*b, << 8-b;
                                                           3 bits: two Gathers, >>, <<, BitwiseOr, << 5)
    lev   = Cast(Cast(v, int8), float32)                   = (u - 2^(b-1)) * 2^(8-b), exact
    deq   = lev * (Cast(scales, float32) * 2^-(8-b))       (n_groups, g, N) = (u - 2^(b-1)) * scale, exact
    c     = Max(Max(ReduceMax(deq), -ReduceMin(deq)) / 127, tiny)       over the K rows, (N,)
    W_s8  = QuantizeLinear(deq, c, 0 int8, axis=2)          = rint(deq / c), reshaped (Kp, N), sliced to K

(``bfc.lowbit.int8_fold.fold_codes`` in numpy, bit for bit).  onnxruntime's constant folding runs it once
at session creation, so the session holds one int8 initializer of K*N bytes (as ``quantize_dynamic``'s
model does) while the file holds b bits per weight plus the scales.  The subgraph computes in float32
whatever the builder's dtype.

What onnxruntime 1.32 folds (default session options, measured): BitwiseXor/Or, BitShift on uint8, Gather,
Cast (uint8 -> int8 wraps, as used), Mul, Reduce*, Div, QuantizeLinear (per axis) -- all of it.  It does
NOT fold DequantizeLinear (per-axis or blocked; kept for its QDQ fusions), hence Cast + Mul instead.
Constant folding keeps every folded intermediate alive until the end of its pass, so the transient peak
at load is the sum of the intermediates of all folded layers: the formulation keeps them few and mostly
uint8/int8 (about 8 bytes of uint8/int8 + 8 bytes of float32 per weight, ~20 B/weight measured at
4096x4096) -- the previous unpack-to-float formulation (per-code Reshape/Concat, uint32 codes, Abs,
Div, Round, Clip, Cast) peaked near 58 B/weight.  Needs opset >= 18 (bitwise ops; ReduceMax axes input).
"""
from __future__ import annotations

from math import lcm

import numpy as np
import onnx_graphsurgeon as gs

from bfc.lowbit.int8_fold import QMAX, TINY
from bfc.lowbit.packing import pack_bits, packed_nbytes

FOLD_OPSET = 18          # BitwiseXor / BitwiseOr (opset 18), ReduceMax axes as an input
_FLOAT, _INT8, _FLOAT16 = 1, 3, 10     # onnx.TensorProto element types
F32 = np.float32


def _tensor(b, what, v, dtype=None):
    """A graph tensor: gs tensors pass through, arrays become constants (cast to ``dtype`` if given)."""
    if isinstance(v, gs.Tensor):
        return v
    v = np.asarray(v)
    return b.const(what, v if dtype is None else v.astype(dtype))


def emit_int8_matmul(b, x, w_s8, col_scale, bias=None):
    """y = DQ(x) W_s8 (see the module doc).  ``w_s8``: an int8 (K, N) tensor (a constant, or the output of
    ``emit_folded_codes``) or array; ``col_scale``: (N,) float32 tensor or array (scalar allowed);
    ``bias``: optional (N,) tensor or array, added after the scale (onnxruntime fuses it too).
    Returns y [..., N] in the builder's dtype (float32 compute; fp16 x is cast in and out)."""
    f32 = np.dtype(b.dtype) == np.float32
    xf = x if f32 else b.cast(x, F32, _FLOAT)
    w = _tensor(b, "W_s8", w_s8, np.int8)
    cs = _tensor(b, "col_scale", col_scale, F32)
    xq = gs.Variable(b.name("x_u8"), dtype=np.uint8)
    xs = gs.Variable(b.name("x_scale"), dtype=F32)
    xz = gs.Variable(b.name("x_zp"), dtype=np.uint8)
    b.graph.nodes.append(gs.Node("DynamicQuantizeLinear", name=b.name("DynamicQuantizeLinear"),
                                 inputs=[xf], outputs=[xq, xs, xz]))
    acc = b.op("MatMulInteger", [xq, w, xz], dtype=np.int32)
    scale = b.op("Mul", [xs, cs], dtype=F32)
    y = b.op("Mul", [b.cast(acc, F32, _FLOAT), scale], dtype=F32)
    if bias is not None:
        y = b.op("Add", [y, _tensor(b, "bias", bias, F32)], dtype=F32)
    return y if f32 else b.cast(y, b.dtype, _FLOAT16 if np.dtype(b.dtype) == np.float16 else _FLOAT)


def _signed_codes(b, stream, bits: int, kp: int, n: int):
    """int8 (kp, n) levels ``(u - 2^(b-1)) * 2^(8-b)`` from the packed stream, with uint8 ops only.

    XOR with the packed zero level flips each code's top bit (offset binary -> two's complement); the
    code is then brought to the top bits of a byte, where the uint8 -> int8 Cast reads it signed:
      2/4 bits: byte >> (t*b) << (8-b)                                  (t = the code's place in its byte)
      3 bits:   ((lo >> r) | (hi << (8-r))) << 5, lo/hi the two bytes of a 3-byte chunk holding
                bits [3t, 3t+3), r = 3t mod 8 (shifts past 7 give 0 in onnxruntime, as in numpy's uint8)
    With n % codes-per-chunk == 0 the stream is viewed (kp, n/per, chunk bytes), so no float reshape follows."""
    per, nb = lcm(bits, 8) // bits, lcm(bits, 8) // 8
    count = kp * n
    rowwise = n % per == 0
    view = [kp, n // per, nb] if rowwise else [-1, nb]
    if isinstance(stream, np.ndarray):
        x = b.const("codes", stream.reshape(view))
    else:
        x = b.op("Reshape", [stream, b.const("shape", np.array(view, np.int64))], dtype=np.uint8)
    x = b.op("BitwiseXor", [x, b.const("zero_bits", pack_bits(np.full(per, 1 << (bits - 1)), bits))],
             dtype=np.uint8)
    u8 = np.uint8
    if nb == 1:
        v = x if per == 1 else b.op("BitShift", [x, b.const("shift", (np.arange(per) * bits).astype(u8))],
                                    {"direction": "RIGHT"}, dtype=u8)                       # (..., per)
        if bits < 8:
            v = b.op("BitShift", [v, b.const("shift", np.array(8 - bits, u8))], {"direction": "LEFT"}, dtype=u8)
    else:                                                                                   # 3 bits
        t = np.arange(per)
        lo, r = (3 * t) // 8, (3 * t) % 8
        hi = np.minimum(lo + 1, nb - 1)
        glo = b.op("Gather", [x, b.const("lo", lo.astype(np.int64))], {"axis": len(view) - 1}, dtype=u8)
        ghi = b.op("Gather", [x, b.const("hi", hi.astype(np.int64))], {"axis": len(view) - 1}, dtype=u8)
        v = b.op("BitwiseOr", [b.op("BitShift", [glo, b.const("shift", r.astype(u8))], {"direction": "RIGHT"}, dtype=u8),
                               b.op("BitShift", [ghi, b.const("shift", (8 - r).astype(u8))], {"direction": "LEFT"},
                                    dtype=u8)], dtype=u8)
        v = b.op("BitShift", [v, b.const("shift", np.array(8 - bits, u8))], {"direction": "LEFT"}, dtype=u8)
    if not rowwise:
        v = b.op("Reshape", [v, b.const("shape", np.array([-1], np.int64))], dtype=u8)
        if (-(-count // per)) * per > count:
            v = b.op("Slice", [v, b.const("start", np.array([0], np.int64)),
                               b.const("end", np.array([count], np.int64))], dtype=u8)
    return b.cast(v, np.int8, _INT8)                                                        # (..) viewed as kp*n


def _reduce(b, op, t, axes):
    """ReduceMax/ReduceMin without keepdims (axes an input from opset 18, an attribute before)."""
    if b.opset >= 18:
        return b.op(op, [t, b.const("axes", np.array(axes, np.int64))], {"keepdims": 0}, dtype=F32)
    return b.op(op, [t], {"axes": list(axes), "keepdims": 0}, dtype=F32)


def emit_folded_codes(b, packed_codes, group_scales, bits: int, group_size: int, K: int, N: int):
    """(W_s8 (K, N) int8 tensor, col_scale (N,) float32 tensor) from packed symmetric b-bit codes (see the
    module doc).  ``packed_codes``: the uint8 stream of ``bfc.ops.lowbit_codes_stream(codes, group_size,
    bits)`` (array, stored with a shape that lets the graph skip reshapes, same bytes; or a uint8 tensor);
    ``group_scales``: (n_groups, N) fp16/fp32 (array or tensor).  Every input is constant: onnxruntime
    folds the whole subgraph at session creation (``bfc.lowbit.int8_fold.fold_codes`` bit for bit)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r}: allowed 2, 3, 4, 8")
    if b.opset < FOLD_OPSET:
        raise ValueError(f"the folded-codes subgraph needs opset >= {FOLD_OPSET} (bitwise ops), the model has {b.opset}")
    K, N, g = int(K), int(N), int(group_size)
    ng = -(-K // g)
    kp = ng * g
    if isinstance(packed_codes, np.ndarray):
        need = packed_nbytes(kp * N, bits)
        if packed_codes.dtype != np.uint8 or packed_codes.size != need:
            raise ValueError(f"expected the uint8 stream of {kp}x{N} codes of {bits} bits ({need} bytes), got "
                             f"{packed_codes.dtype} of {packed_codes.size}")
        packed_codes = packed_codes.reshape(-1)
    q = _signed_codes(b, packed_codes, bits, kp, N)
    q = b.op("Reshape", [q, b.const("shape", np.array([ng, g, N], np.int64))], dtype=np.int8)
    if isinstance(group_scales, np.ndarray):
        s = b.const("scales", np.ascontiguousarray(group_scales).reshape(ng, 1, N))
        sdt = group_scales.dtype
    else:
        s = b.op("Reshape", [group_scales, b.const("shape", np.array([ng, 1, N], np.int64))],
                 dtype=group_scales.dtype)
        sdt = group_scales.dtype
    if sdt is None or np.dtype(sdt) != np.float32:
        s = b.cast(s, F32, _FLOAT)
    s = b.op("Mul", [s, b.const("unshift", np.array(2.0 ** -(8 - bits), F32))], dtype=F32)  # exact (power of 2)
    deq = b.op("Mul", [b.cast(q, F32, _FLOAT), s], dtype=F32)                 # (ng, g, N) = (u - z) * scale, exact
    amax = b.op("Max", [_reduce(b, "ReduceMax", deq, [0, 1]),
                        b.op("Neg", [_reduce(b, "ReduceMin", deq, [0, 1])], dtype=F32)], dtype=F32)
    col_scale = b.op("Max", [b.op("Div", [amax, b.const("qmax", np.array(QMAX, F32))], dtype=F32),
                             b.const("tiny", np.array(TINY, F32))], dtype=F32)                # (N,)
    w = b.op("QuantizeLinear", [deq, col_scale, b.const("zp", np.zeros(N, np.int8))], {"axis": 2},
             dtype=np.int8)                                                                   # rint(deq / c)
    w = b.op("Reshape", [w, b.const("shape", np.array([kp, N], np.int64))], dtype=np.int8)
    if kp > K:
        w = b.op("Slice", [w, b.const("start", np.array([0], np.int64)), b.const("end", np.array([K], np.int64))],
                 dtype=np.int8)
    return w, col_scale
