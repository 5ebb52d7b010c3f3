"""The ``ai.bfc`` ONNX operator ``KSMatMul`` (opset 1): specification, builders, numpy reference.

Specification
=============
``KSMatMul`` (domain ``ai.bfc``, version 1) multiplies the last axis of ``X`` by a
chain of Kronecker-sparse (KS) factors ``K_1 ... K_L``::

    Y = (X[..., in_perm] @ K_1 @ K_2 @ ... @ K_L)[..., out_perm] + bias

Inputs
    0 ``X``       float32 ``[..., M]`` (any rank >= 1; leading dims may be 0).
    1 ``bias``    optional float32 ``[N]`` (empty input name = absent).
    2.. variadic, two per factor in chain order (heterogeneous types):
        ``values_l`` shape ``(a, d, b, c)`` (bfc's canonical layout, see
        :mod:`bfc.ks.pattern`), dtype int8, float8e4m3fn, float8e5m2, float16 or float32
        (formats int8, fp8-e4m3, fp8-e5m2, fp16, fp32 of ``bfc.quant.formats.FORMATS``);
        ``scale_l``  float32, 4-D, broadcastable to ``(a, d, b, c)`` with every dim 1 or
        full and dim 2 always 1: ``(1,1,1,1)``, ``(a,d,1,1)``, ``(a,d,1,c)`` (or
        ``(1,1,1,c)`` etc.).  The dequantized factor is ``values * scale``:
        ``K_l[i*b*d + j*d + l, i*c*d + k*d + l] = values[i,l,j,k] * scale[i,l,0,k]``.
        Values and scales must be constant initializers (the native kernel reads and
        prepacks them once, at session creation).
Attributes
    ``patterns`` int64 list of length 4L: ``a, b, c, d`` of each factor in chain order.
    The chain must be valid: ``a_l c_l d_l == a_{l+1} b_{l+1} d_{l+1}``;
    ``M = a_1 b_1 d_1``, ``N = a_L c_L d_L``.
    ``in_perm``  optional int64 list, a permutation of ``0..M-1`` (absent/empty = identity):
    the chain input is ``X[..., in_perm]``.
    ``out_perm`` optional int64 list, a permutation of ``0..N-1`` (absent/empty =
    identity): ``Y = Z[..., out_perm]`` for the chain output ``Z``.
Output
    0 ``Y`` float32 ``[..., N]`` (same leading dims as X).

Relation to :class:`bfc.factorize.result.KSFactorization`: its ``apply`` gathers
``x[..., row_perm]`` and scatters the chain output with ``inverse_perm(col_perm)``, so
``in_perm = row_perm`` and ``out_perm = inverse_perm(col_perm)``
(:func:`perms_from_factorization`).  The low-rank residual is not part of the op.

Numerics (what the native kernel computes, and :func:`ks_matmul_reference` emulates)
    * float32 / float16 factors: float32 products with float32 accumulation.
    * float8 factors: each byte is decoded exactly to float32 (e4m3fn: bias 7, no
      infinities, ``S.1111.111`` is NaN; e5m2: IEEE-like, bias 15), float32
      accumulation, then the scale is applied to the block's output column.  On CPUs
      with AVX512_BF16 (``BFC_KS_ISA`` auto or ``avx512bf16``) factors with b > 4 or
      c > 4 run as bf16 dot products: the decoded weights are exact in bf16 and the
      factor's input activation is rounded to bf16 (round to nearest even, subnormals
      to zero) -- ``fp8_bf16=True`` of :func:`ks_matmul_reference`; ``BFC_KS_ISA=avx512``
      (or a CPU without BF16) keeps the float32 activations.
    * int8 factors: the factor's input activation ``h`` (one row = one batch row) is
      quantized per row, symmetric: ``amax = max|h|``, ``q = rint(clip(h * (127/amax),
      -127, 127))`` in float32 (round half to even; ``q = 0`` when ``amax = 0``),
      ``acc = q @ values`` exactly in int32, and the factor output is
      ``(float(acc) * (amax/127)) * scale``.  Activations between factors are float32.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bfc import runtime
from bfc.errors import ChainError, ConfigError, InvalidInputError
from bfc.factorize.result import inverse_perm
from bfc.ks.chain import Chain
from bfc.ks.pattern import KSPattern
from bfc.ops.common import DEFAULT_IR_VERSION, DOMAIN, opset_imports, quantize_rows
from bfc.quant.formats import FORMATS

OP_TYPE = "KSMatMul"

#: value formats accepted by the op (names of bfc's one format table) -> ONNX element type
VALUE_TYPES = {name: FORMATS[name].onnx_type for name in ("int8", "fp8-e4m3", "fp8-e5m2", "fp16", "fp32")}
#: scale granularity of :func:`quantize_factor` -> scale shape
GRANULARITIES = ("tensor", "block", "column")


def _patterns(patterns) -> Chain:
    if isinstance(patterns, Chain):
        return patterns
    flat = np.asarray(patterns, dtype=np.int64)
    if flat.ndim == 2 and flat.shape[1] == 4:
        flat = flat.reshape(-1)
    if flat.ndim != 1 or flat.size == 0 or flat.size % 4:
        raise ChainError(f"KSMatMul patterns must be 4 integers (a, b, c, d) per factor, got {list(flat)}")
    return Chain([tuple(int(v) for v in flat[i:i + 4]) for i in range(0, flat.size, 4)])


def patterns_attribute(chain) -> list[int]:
    """The flat ``patterns`` attribute for a Chain or a list of (a, b, c, d)."""
    return [int(v) for p in _patterns(chain) for v in (p.a, p.b, p.c, p.d)]


def perms_from_factorization(fact) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(in_perm, out_perm)`` for a KSFactorization: ``row_perm`` and ``inverse_perm(col_perm)``."""
    in_perm = None if fact.row_perm is None else np.asarray(fact.row_perm, dtype=np.int64)
    out_perm = None if fact.col_perm is None else inverse_perm(np.asarray(fact.col_perm, dtype=np.int64))
    return in_perm, out_perm


# ---- quantization of factor values (simple absmax; bfc.quant does the careful version) --
def quantize_factor(values, fmt: str = "int8", granularity: str = "column") -> tuple[np.ndarray, np.ndarray]:
    """Absmax-quantize canonical values ``(a, d, b, c)`` to ``fmt``: returns ``(q, scale)``.

    ``granularity`` picks the scale shape: ``tensor`` (1,1,1,1), ``block`` (a,d,1,1) or
    ``column`` (a,d,1,c).  ``q * scale`` approximates ``values``; ``q`` has the numpy
    dtype that :func:`factor_initializers` turns into the matching ONNX type.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 4:
        raise InvalidInputError(f"factor values must be 4-D (a, d, b, c), got shape {v.shape}")
    if fmt not in VALUE_TYPES:
        raise ConfigError(f"value format {fmt!r} is not one of {sorted(VALUE_TYPES)}")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    f = FORMATS[fmt]
    if fmt in ("fp32", "fp16"):
        return v.astype(f.dtype), np.ones((1, 1, 1, 1), np.float32)
    axes = {"tensor": (0, 1, 2, 3), "block": (2, 3), "column": (2,)}[granularity]
    amax = np.max(np.abs(v), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / f.max, 1.0).astype(np.float32)
    r = np.clip(v / scale, -f.max, f.max)          # clip first: ml_dtypes turns out-of-range fp8 into NaN
    q = np.rint(r).astype(np.int8) if fmt == "int8" else r.astype(f.dtype)
    return q, scale


def dequantize_factor(q, scale) -> np.ndarray:
    return np.asarray(q).astype(np.float32) * np.asarray(scale, dtype=np.float32)


def factor_initializers(prefix: str, values: Sequence, scales: Sequence) -> tuple[list[TensorProto], list[str]]:
    """Initializers ``{prefix}_values_{l}``, ``{prefix}_scale_{l}`` and the node's factor inputs.

    ``values[l]`` must already have its storage dtype (int8, ml_dtypes float8, float16
    or float32); ``scales[l]`` is cast to float32 and reshaped to 4-D if given as a
    scalar.  The returned names are interleaved (values_0, scale_0, values_1, ...).
    """
    if len(values) != len(scales):
        raise InvalidInputError(f"{len(values)} value arrays but {len(scales)} scales")
    inits, names = [], []
    for l, (v, s) in enumerate(zip(values, scales)):
        v = np.asarray(v)
        if v.dtype == np.float64:
            v = v.astype(np.float32)
        s = np.asarray(s, dtype=np.float32)
        if s.ndim == 0:
            s = s.reshape(1, 1, 1, 1)
        vn, sn = f"{prefix}_values_{l}", f"{prefix}_scale_{l}"
        inits += [numpy_helper.from_array(v, vn), numpy_helper.from_array(s, sn)]
        names += [vn, sn]
    return inits, names


def make_ks_matmul_node(x: str, y: str, patterns, factor_inputs: Sequence[str], *, bias: str = "",
                        in_perm=None, out_perm=None, name: str | None = None) -> onnx.NodeProto:
    """One ``ai.bfc.KSMatMul`` node.  ``factor_inputs`` = [values_0, scale_0, values_1, ...]."""
    flat = patterns_attribute(patterns)
    if len(factor_inputs) != len(flat) // 2:
        raise InvalidInputError(f"KSMatMul with {len(flat) // 4} factors needs {len(flat) // 2} factor inputs "
                                f"(values, scale per factor), got {len(factor_inputs)}")
    attrs = {"patterns": flat}
    if in_perm is not None and len(in_perm):
        attrs["in_perm"] = [int(v) for v in in_perm]
    if out_perm is not None and len(out_perm):
        attrs["out_perm"] = [int(v) for v in out_perm]
    return helper.make_node(OP_TYPE, [x, bias or "", *factor_inputs], [y], name=name, domain=DOMAIN, **attrs)


def make_ks_matmul_model(patterns, values: Sequence, scales: Sequence, *, bias=None, in_perm=None,
                         out_perm=None, x_shape=None, onnx_opset: int,
                         ir_version: int = DEFAULT_IR_VERSION) -> onnx.ModelProto:
    """A one-node model ``Y = KSMatMul(X)`` (for tests, benchmarks and examples)."""
    chain = _patterns(patterns)
    M, N = chain.shape
    x_shape = list(x_shape) if x_shape is not None else ["batch", M]
    y_shape = x_shape[:-1] + [N]
    inits, names = factor_initializers("ks", values, scales)
    bias_name = ""
    if bias is not None:
        bias_name = "ks_bias"
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), bias_name))
    node = make_ks_matmul_node("X", "Y", chain, names, bias=bias_name, in_perm=in_perm, out_perm=out_perm,
                               name="ks_matmul")
    graph = helper.make_graph([node], "ks_matmul",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=opset_imports(onnx_opset), ir_version=ir_version,
                             producer_name="bfc")


# ---- numpy reference ------------------------------------------------------------------
def _check_perm(name: str, perm, n: int) -> np.ndarray | None:
    if perm is None or len(perm) == 0:
        return None
    p = np.asarray(perm, dtype=np.int64)
    if p.ndim != 1 or p.size != n or not np.array_equal(np.sort(p), np.arange(n)):
        raise InvalidInputError(f"KSMatMul attribute {name!r} must be a permutation of 0..{n - 1} "
                                f"(length {n}), got length {p.size}")
    return p


def round_bf16(h) -> np.ndarray:
    """float32 -> bfloat16 -> float32 as vcvtneps2bf16: round to nearest even, subnormal inputs to
    (signed) zero, NaN stays NaN, overflow to infinity."""
    h = np.asarray(h, np.float32)
    u = h.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = r.view(np.float32)
    out = np.where(np.isnan(h), h, out)
    tiny = np.abs(h) < np.float32(2.0 ** -126)
    return np.where(tiny, np.copysign(np.float32(0), h), out).astype(np.float32)


def fp8_uses_bf16(p: KSPattern) -> bool:
    """fp8 factors the AVX512_BF16 path runs (the others are small-block kernels in float32)."""
    return not (p.b <= 4 and p.c <= 4)


def _apply_factor(p: KSPattern, values, scale, h: np.ndarray, emulate_int8: bool,
                  fp8_bf16: bool = False) -> np.ndarray:
    a, b, c, d = p.a, p.b, p.c, p.d
    lead = h.shape[:-1]
    values = np.asarray(values)
    scale = np.asarray(scale, dtype=np.float32)
    if values.shape != p.value_shape:
        raise InvalidInputError(f"KSMatMul values for pattern {p} must have shape (a, d, b, c) = "
                                f"{p.value_shape}, got {values.shape}")
    ok = scale.ndim == 4 and all(s in (1, f) for s, f in zip(scale.shape, p.value_shape)) and scale.shape[2] == 1
    if not ok:
        raise InvalidInputError(f"KSMatMul scale for pattern {p} has shape {scale.shape}; it must be 4-D, "
                                f"broadcastable to {p.value_shape}, with dim 2 equal to 1")
    s_acd = np.broadcast_to(scale, (a, d, 1, c))[:, :, 0, :].transpose(0, 2, 1)  # (a, c, d)
    if values.dtype == np.int8 and emulate_int8:
        q, cs = quantize_rows(h)
        acc = np.einsum("...ijl,iljk->...ikl", q.reshape(lead + (a, b, d)), values.astype(np.int64))
        y = (acc.astype(np.float32) * cs[..., None, None]) * s_acd
    else:
        if fp8_bf16 and values.dtype.itemsize == 1 and values.dtype != np.int8 and fp8_uses_bf16(p):
            h = round_bf16(h)
        w = values.astype(np.float64) * scale.astype(np.float64)
        y = np.einsum("...ijl,iljk->...ikl", h.astype(np.float64).reshape(lead + (a, b, d)), w)
    return y.reshape(lead + (a * c * d,)).astype(np.float32)


def ks_matmul_reference(x, bias, factors: Sequence, patterns, in_perm=None, out_perm=None, *,
                        emulate_int8: bool = True, fp8_bf16: bool = False) -> np.ndarray:
    """numpy KSMatMul.  ``factors`` = [values_0, scale_0, values_1, scale_1, ...].

    ``fp8_bf16``: fp8 factors round their input activation to bf16 as the AVX512_BF16 kernels do
    (see Numerics; :func:`fp8_bf16_active` says whether the installed library does).

    With ``emulate_int8`` (default) int8 factors quantize their input activation per
    row exactly as the native kernel does; without it every factor is applied in
    float64 with its dequantized values (the op's ideal, unquantized-activation value).
    """
    chain = _patterns(patterns)
    x = np.asarray(x, dtype=np.float32)
    M, N = chain.shape
    if x.ndim < 1 or x.shape[-1] != M:
        raise InvalidInputError(f"KSMatMul input X has shape {x.shape}; its last dimension must be M = {M}")
    if len(factors) != 2 * len(chain):
        raise InvalidInputError(f"KSMatMul with {len(chain)} factors needs {2 * len(chain)} factor inputs, "
                                f"got {len(factors)}")
    ip, op = _check_perm("in_perm", in_perm, M), _check_perm("out_perm", out_perm, N)
    h = x[..., ip] if ip is not None else x
    for l, p in enumerate(chain):
        h = _apply_factor(p, factors[2 * l], factors[2 * l + 1], h, emulate_int8, fp8_bf16)
    if op is not None:
        h = h[..., op]
    if bias is not None:
        b = np.asarray(bias, dtype=np.float32)
        if b.shape != (N,):
            raise InvalidInputError(f"KSMatMul bias has shape {b.shape}, expected ({N},)")
        h = h + b
    return h.astype(np.float32)


def fp8_bf16_active() -> bool:
    """Whether KSMatMul nodes created now run fp8 factors as bf16 dot products (the library's ISA for
    the current ``BFC_KS_ISA`` is avx512bf16); False without the library."""
    try:
        fn = ctypes.CDLL(str(runtime.library_path())).BfcKsIsa
    except Exception:       # noqa: BLE001 -- no library, or one without the symbol: the float32 numerics
        return False
    fn.restype = ctypes.c_char_p
    return fn() == b"avx512bf16"
