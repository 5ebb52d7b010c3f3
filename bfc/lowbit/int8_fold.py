"""Storage and compute formats that differ: int8 integer MatMul of a (possibly low-bit stored) weight.

The compute format is exactly onnxruntime ``quantize_dynamic``'s (``passes/int8_emit.py`` emits it)::

    x_u8, x_scale, x_zp = DynamicQuantizeLinear(x)                 uint8, asymmetric, per tensor
    acc  = MatMulInteger(x_u8, W_s8, x_zp)                         int32, exact
    y    = Cast(acc, float) * (x_scale * col_scale)                 float32

with ``W_s8`` (K, N) int8 symmetric per output column (``col_scale`` (N,) float32).  The weight is
either stored as int8 (``quantize_columns``) or stored as packed 2/3/4-bit group codes and turned
into ``W_s8`` by a constant subgraph that onnxruntime folds at session creation (``fold_codes``
is what that subgraph computes).  The functions below are the planner's scoring functions: they
reproduce onnxruntime's float32 arithmetic operation by operation (same operations, same order,
round half to even), so they match its outputs to float rounding and its integers exactly.

Caveat (machine-dependent, not modelled): onnxruntime's u8s8 GEMM on x86 CPUs with AVX2 but
without VNNI sums pairs of u8*s8 products in saturating int16 (vpmaddubsw), so for |w| > 64 the
int32 accumulator can differ there; machines with AVX-VNNI / AVX512-VNNI / AMX (and ARM) are
exact.  ``quantize_dynamic``'s ``reduce_range`` exists for those machines.

numpy only (no onnx).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
QMAX = 127                               # symmetric int8: [-127, 127], -128 unused
TINY = np.finfo(np.float32).tiny         # floor of a column scale (an all-zero column gets q = 0)


def quantize_columns(w) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-column int8 of W (K, N), in float32 arithmetic:

        s_n = max(max_k |W[k, n]| / 127, TINY)          (float32 division, correctly rounded)
        q   = clip(rint(W / s_n), -127, 127)              (float32 division, round half to even)

    Returns ``(w_s8 int8 (K, N), col_scale float32 (N,))``; ``W ~= w_s8 * col_scale``.  W is
    first cast to float32 (as the graph holds it).  ``TINY`` (float32's smallest normal) only
    matters for all-zero columns (q = 0 there, so y = 0 whatever the scale).
    """
    w = np.asarray(w, dtype=F32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (K, N), got shape {w.shape}")
    amax = np.max(np.abs(w), axis=0) if w.shape[0] else np.zeros(w.shape[1], F32)
    s = np.maximum(amax / F32(QMAX), F32(TINY)).astype(F32)
    q = np.clip(np.rint(w / s), -QMAX, QMAX)
    return q.astype(np.int8), s


def dequantize_codes(codes, scales, bits: int, group_size: int, zero_points=None) -> np.ndarray:
    """deq (K, N) float32 of unsigned group codes u (K, N) as the emitted subgraph computes it:
    ``float32(u - z) * float32(scale of the row's group)``, z = 2^(b-1) (symmetric, implicit) or the
    group's zero point.  Equals ``GroupQuantized.dequantize()`` cast to float32 (the product of an
    fp16 scale and an integer below 2^4 is exact in float32; an fp32 scale's product is rounded
    once, identically)."""
    u = np.asarray(codes)
    k, _n = u.shape
    rows = np.arange(k) // int(group_size)
    z = np.float32(1 << (bits - 1)) if zero_points is None else np.asarray(zero_points, F32)[rows]
    return ((u.astype(F32) - z) * np.asarray(scales).astype(F32)[rows]).astype(F32)


def fold_codes(codes_dequantized) -> tuple[np.ndarray, np.ndarray]:
    """Per-column int8 of a dequantized low-bit weight: the weight the folded subgraph produces.

    Algebra.  A rotated low-bit layer stores W_r = Q^T W (K, N) as b-bit group codes u with fp16
    group scales s_g (groups of g rows of one column): ``W_hat[k, n] = s_{g(k), n} (u[k, n] - 2^(b-1))``,
    and computes ``y = (x Q) W_hat``.  For an integer MatMul the weight is rounded a second time,
    per output column, to int8 (``quantize_columns``):

        c_n = max_k |W_hat[k, n]| / 127,   q8 = rint(W_hat / c_n),   W8 = c_n q8
        y   = DQ(x Q) W8 = x_scale c_n * sum_k (xq_k - x_zp) q8[k, n]

    Pass ``codes_dequantized = dequantize_codes(...)`` (or ``GroupQuantized.dequantize()``); it
    is cast to float32 first, as the graph computes it.  The arithmetic is float32, identical
    to the emitted subgraph, so the folded weight equals this function's result bit for bit.

    Expected extra error.  The second rounding adds ``e2 = W_hat - W8``, |e2| <= c_n / 2, about
    uniform: E e2^2 ~= c_n^2 / 12 per entry, against the low-bit rounding's ~s_g^2 / 12.  Since
    ``c_n = 2^(b-1) max_g s_g / 127`` (the extreme level of the largest group), the ratio of the
    added to the low-bit error variance is ``(2^(b-1) / 127)^2 (s_max / s_g)^2``: for groups of
    equal scale 0.025% (2-bit), 0.1% (3-bit), 0.4% (4-bit) -- relative RMS error x1.0001 / x1.0005
    / x1.002 -- growing as (s_max / s_g)^2 for groups much flatter than the column's largest
    (s_g = s_max / 10 at 3 bits: +10% variance, x1.05 RMS).  After a rotation the group scales of
    a column are nearly equal, so the double rounding is near free; the activation's dynamic
    uint8 rounding (shared with ``quantize_dynamic``) is usually the larger extra term.  The
    planner should score ``int8_matmul(x Q, *fold_codes(W_hat))`` (the function computed), not
    ``(x Q) W_hat``.
    """
    return quantize_columns(np.asarray(codes_dequantized, dtype=F32))


def dynamic_quantize(x) -> tuple[np.ndarray, np.float32, np.uint8]:
    """onnxruntime's DynamicQuantizeLinear (uint8), in float32:

        lo = min(0, min x),  hi = max(0, max x)
        scale = 1 if hi == lo else (hi - lo) / 255
        zp = uint8(rint(clip(0 - lo / scale, 0, 255)))
        y  = clip(rint(x / scale) + zp, 0, 255)          (round half to even; x / scale a true division)

    One scale and zero point for the whole tensor (all rows).  Returns ``(y uint8, scale, zp)``.
    """
    x = np.asarray(x, dtype=F32)
    lo = min(F32(0), x.min()) if x.size else F32(0)
    hi = max(F32(0), x.max()) if x.size else F32(0)
    scale = F32(1) if hi == lo else F32((hi - lo) / F32(255))
    izp = F32(F32(0) - F32(lo / scale))
    zp = np.uint8(np.rint(np.clip(izp, F32(0), F32(255))))
    y = np.clip(np.rint(x / scale) + F32(zp), 0, 255).astype(np.uint8)
    return y, scale, zp


def int8_matmul(x, w_s8, col_scale) -> np.ndarray:
    """The emitted subgraph's function: ``y = float32(acc) * float32(x_scale * col_scale)`` with
    ``acc = (x_u8 - x_zp) @ W_s8`` exact in int32 (computed here in float64, exact since
    |acc| <= 255 * 127 * K < 2^53), x (..., K) of any rank.  Returns float32 (..., N)."""
    x = np.asarray(x, dtype=F32)
    w = np.asarray(w_s8)
    if w.dtype != np.int8 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"expected x (..., K) and int8 W (K, N), got {x.shape} and {w.dtype} {w.shape}")
    xq, xs, xzp = dynamic_quantize(x)
    acc = (xq.astype(np.float64) - float(xzp)) @ w.astype(np.float64)
    mult = (xs * np.asarray(col_scale, F32).reshape(-1)).astype(F32)
    return (acc.astype(np.int32).astype(F32) * mult).astype(F32)


def int8_nbytes(k: int, n: int) -> int:
    """Resident bytes of the folded weight: K*N int8 plus N float32 column scales."""
    return int(k) * int(n) + 4 * int(n)
