"""The ``ai.bfc`` ONNX operator ``LowBitMatMul`` (domain ``ai.bfc``, version 1): a rotated low-bit layer in one op::

    Y = quant_rows(X Q) @ (s * (u - 2^(b-1))) + bias

Inputs
    0 ``X``       float32 ``[..., K]``.
    1 ``bias``    optional float32 ``[N]``.
    2 ``codes``   uint8 1-D: the b-bit codes u (K x N, row-major, rows padded to whole
        groups with the zero level 2^(b-1)) packed LSB first (``bfc.lowbit.packing``).
    3 ``scales``  float16 or float32 ``(n_groups, N)``, n_groups = ceil(K / group_size).
    4.. optional rotation Q, one of two forms:
        ``rot_patterns``: ``values_l``, ``scale_l`` per factor, as KSMatMul's factors
        (float32/float16 values; a chain K -> K);
        ``rot_angles = 1`` (the butterfly rotation of ``bfc.lowbit.rotation`` as stored,
        K = m 2^k, m odd): ``block`` (1, 2^k, m, m) = factor 0's values, then ``angles_l``
        (m 2^(l-1), 2^(k-l)) for l = 1..k, float16/float32; stage l is the factor
        (m 2^(l-1), 2, 2, 2^(k-l)) with blocks [[cos t, sin t], [sin t, -cos t]], cos and
        sin evaluated in float64 and rounded to float32 once.
Attributes ``K``, ``N``, ``bits`` (2, 3, 4), ``group_size`` (1..K) int64;
    ``rot_patterns`` int64 list (4 per rotation factor) or ``rot_angles`` int (0/1);
    neither = no rotation.
Numerics (native kernel = :func:`lowbit_matmul_reference`)
    ``xr = X Q`` in float32 (KSMatMul's float chain; float rounding may differ from the
    reference in the last bits), then per row ``amax = max|xr|``, ``q = rint(clip(xr *
    (127/amax), -127, 127))`` (KSMatMul's int8 scheme), per group ``isum = sum_k q (u - z)``
    exactly in int32, ``acc = 0; acc = acc + float32(isum) * s[group]`` in float32 over
    the groups in order (two roundings, no FMA), ``Y = acc * (amax/127) (+ bias)``.  Without
    a rotation the whole op is integer math up to that float epilogue: the kernel (every ISA)
    equals the reference bit for bit.
Prequantized form (attribute ``prequantized = 1``): inputs ``X`` = q int8 ``[..., K]``, ``bias``,
    ``codes``, ``scales``, ``x_scale`` float32 ``[..., 1]`` (no rotation inputs or attributes): the
    GEMM and epilogue above with ``q`` and ``amax/127 = x_scale`` given, i.e. the outputs of
    ai.bfc.RotateQuantize.  ``LowBitMatMul(RotateQuantize(X; Q), bias, codes, scales; prequantized=1)
    = LowBitMatMul(X, bias, codes, scales, Q)`` bit for bit (the same kernels compute both halves).

``RotateQuantize`` (domain ``ai.bfc``, version 1): the first half of LowBitMatMul alone, computed once
per input tensor and shared by the layers that read it (Q, K and V read the same LayerNorm output):
    inputs ``X`` float32 ``[..., K]``, then the rotation inputs (LowBitMatMul's inputs 4.., same
    attributes ``rot_patterns`` / ``rot_angles``; a rotation is required); attribute ``K``.
    outputs ``Q`` int8 ``[..., K]`` = ``q`` and ``S`` float32 ``[..., 1]`` = ``amax/127`` of
    ``xr = X Q`` as above (:func:`rotate_quantize_reference`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bfc.errors import InvalidInputError
from bfc.lowbit.packing import pack_bits, unpack_bits
from bfc.lowbit.rotation import split_size
from bfc.ops.common import DEFAULT_IR_VERSION, DOMAIN, opset_imports, quantize_rows
from bfc.ops.ks_matmul import factor_initializers, ks_matmul_reference, patterns_attribute

LOWBIT_OP_TYPE = "LowBitMatMul"
ROTATE_QUANTIZE_OP_TYPE = "RotateQuantize"
LOWBIT_BITS = (2, 3, 4)


def lowbit_codes_stream(codes: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """The ``codes`` input: u (K, N) padded to whole groups with 2^(b-1), packed (``pack_bits``)."""
    k, n = codes.shape
    ng = -(-k // group_size)
    full = np.full((ng * group_size, n), 1 << (bits - 1), np.uint8)
    full[:k] = codes
    return pack_bits(full, bits)


def angle_rotation_factors(k_dim: int, block, angles: Sequence) -> tuple[list, list]:
    """(KSMatMul factor inputs [values, scale, ...], patterns) of the ``rot_angles`` form (module doc)."""
    m, k = split_size(int(k_dim))
    pats = [(1, m, m, 2 ** k)] + [(m * 2 ** (l - 1), 2, 2, 2 ** (k - l)) for l in range(1, k + 1)]
    if len(angles) != k or np.shape(block) != (1, 2 ** k, m, m):
        raise InvalidInputError(f"LowBitMatMul rot_angles: K={k_dim} needs a (1, {2 ** k}, {m}, {m}) block and {k} "
                                f"angle tensors, got {np.shape(block)} and {len(angles)}")
    one = np.ones((1, 1, 1, 1), np.float32)
    vals = [np.asarray(block).astype(np.float32)]
    for (a, _, _, d), t in zip(pats[1:], angles):
        t = np.asarray(t).astype(np.float64)
        if t.shape != (a, d):
            raise InvalidInputError(f"LowBitMatMul rot_angles: angles of shape {t.shape}, expected {(a, d)}")
        c, s = np.cos(t).astype(np.float32), np.sin(t).astype(np.float32)
        vals.append(np.stack([np.stack([c, s], -1), np.stack([s, -c], -1)], -2))
    return [t for v in vals for t in (v, one)], pats


def rotate_quantize_reference(x, *, K: int, rot_factors: Sequence = (), rot_patterns=None,
                              rot_angles: bool = False, op: str = "RotateQuantize") -> tuple[np.ndarray, np.ndarray]:
    """numpy RotateQuantize (module doc): ``(q int8 [..., K], amax/127 float32 [..., 1])`` of ``xr = x Q``
    per row; no rotation when neither ``rot_patterns`` nor ``rot_angles``."""
    if rot_angles:
        rot_factors, rot_patterns = angle_rotation_factors(K, rot_factors[0], list(rot_factors[1:]))
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != K:
        raise InvalidInputError(f"{op} input X has shape {x.shape}; its last dimension must be K = {K}")
    h = x.reshape(-1, K)
    if rot_patterns is not None and len(rot_patterns):
        h = ks_matmul_reference(h, None, rot_factors, rot_patterns)
    q, cs = quantize_rows(h)
    return q.astype(np.int8).reshape(x.shape), cs.reshape(x.shape[:-1] + (1,))


def lowbit_matmul_reference(x, bias, codes, scales, *, K: int, N: int, bits: int, group_size: int,
                            rot_factors: Sequence = (), rot_patterns=None, rot_angles: bool = False,
                            x_scale=None) -> np.ndarray:
    """numpy LowBitMatMul (module doc).  ``codes``: the packed stream; ``scales`` (n_groups, N);
    ``rot_factors``: the rotation inputs (values/scale pairs with ``rot_patterns``, or block + angles
    with ``rot_angles``).  ``x_scale`` given: the prequantized form, ``x`` the int8 rows q and
    ``x_scale`` their scales ``[..., 1]`` (RotateQuantize's outputs)."""
    if bits not in LOWBIT_BITS or not 1 <= group_size <= K:
        raise InvalidInputError(f"LowBitMatMul: bits={bits} (allowed {LOWBIT_BITS}), group_size={group_size} "
                                f"must lie in [1, K={K}]")
    ng = -(-K // group_size)
    s = np.asarray(scales).astype(np.float32)
    if s.shape != (ng, N):
        raise InvalidInputError(f"LowBitMatMul scales have shape {s.shape}, expected ({ng}, {N})")
    if x_scale is None:
        q, cs = rotate_quantize_reference(x, K=K, rot_factors=rot_factors, rot_patterns=rot_patterns,
                                          rot_angles=rot_angles, op="LowBitMatMul")
    else:
        q, cs = np.asarray(x), np.asarray(x_scale, np.float32)
        if q.dtype != np.int8 or q.ndim < 1 or q.shape[-1] != K or cs.shape != q.shape[:-1] + (1,):
            raise InvalidInputError(f"LowBitMatMul prequantized input X {q.dtype} {q.shape} / x_scale {cs.shape}: "
                                    f"X must be int8 [..., K = {K}] and x_scale float32 X.shape[:-1] + (1,)")
    lead = q.shape[:-1]
    q, cs = q.reshape(-1, K).astype(np.int64), cs.reshape(-1, 1)
    u = unpack_bits(codes, bits, ng * group_size * N).reshape(ng * group_size, N)[:K]
    w = u.astype(np.int64) - (1 << (bits - 1))
    acc = np.zeros((q.shape[0], N), np.float32)
    for g in range(ng):
        k0, k1 = g * group_size, min(K, (g + 1) * group_size)
        isum = q[:, k0:k1] @ w[k0:k1]
        acc = acc + isum.astype(np.float32) * s[g]
    y = acc * cs
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(N)
    return y.astype(np.float32).reshape(lead + (N,))


def make_lowbit_matmul_model(codes_u: np.ndarray, scales: np.ndarray, *, bits: int, group_size: int,
                             rot_values: Sequence = (), rot_patterns=None, rot_angles=None, bias=None,
                             x_shape=None, onnx_opset: int,
                             ir_version: int = DEFAULT_IR_VERSION) -> onnx.ModelProto:
    """A one-node model ``Y = LowBitMatMul(X)`` from unpacked codes u (K, N) and scales (n_groups, N);
    ``rot_values`` the rotation chain's (a, d, b, c) values (float32/float16, scale 1) with
    ``rot_patterns``, or ``rot_angles = (block, [angles_1, ...])``."""
    k, n = codes_u.shape
    x_shape = list(x_shape) if x_shape is not None else ["batch", k]
    inits = [numpy_helper.from_array(lowbit_codes_stream(codes_u, group_size, bits), "lb_codes"),
             numpy_helper.from_array(np.asarray(scales), "lb_scales")]
    names = ["lb_codes", "lb_scales"]
    if rot_angles is not None:
        block, angles = rot_angles
        for i, t in enumerate([block, *angles]):
            inits.append(numpy_helper.from_array(np.asarray(t), f"lb_rot_{i}"))
            names.append(f"lb_rot_{i}")
    elif rot_patterns is not None and len(rot_patterns):
        ri, rn = factor_initializers("lb_rot", list(rot_values), [np.ones((1, 1, 1, 1), np.float32)] * len(rot_values))
        inits += ri
        names += rn
    bias_name = ""
    if bias is not None:
        bias_name = "lb_bias"
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), bias_name))
    attrs = {"K": k, "N": n, "bits": bits, "group_size": group_size}
    if rot_angles is not None:
        attrs["rot_angles"] = 1
    elif rot_patterns is not None and len(rot_patterns):
        attrs["rot_patterns"] = patterns_attribute(rot_patterns)
    node = helper.make_node(LOWBIT_OP_TYPE, ["X", bias_name, *names], ["Y"], name="lowbit", domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "lowbit_matmul",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, x_shape[:-1] + [n])], inits)
    return helper.make_model(graph, opset_imports=opset_imports(onnx_opset), ir_version=ir_version,
                             producer_name="bfc")
