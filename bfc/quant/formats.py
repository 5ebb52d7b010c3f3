"""Number formats the quantizer targets, with their real ranges.

A float format is described by ``t`` (significand bits *counting the implicit bit*:
fp16 11, bf16 8, e4m3 4, e5m2 3), ``emin`` (exponent of the smallest normal number)
and ``max`` (largest finite value; 448 for e4m3fn, which has no infinities).
Subnormals fill ``[0, 2**emin)`` with the spacing of the first normal binade.

This module is bfc's one table of number formats: the config's ``precision`` values,
the quantizer, the graph targets (ONNX element types) and the custom op's value
inputs all use ``FORMATS`` (name, bits, max, numpy/ml_dtypes dtype, ONNX type).

The *grid index* maps the non-negative representable numbers onto 0, 1, 2, ... in
order (piecewise linear in between), so rounding to nearest-even is ``rint`` on the
index and the rounding midpoints are the half-integers.  This gives exact fp64
rounding that does not depend on how a library casts (ml_dtypes casts float64 to
bf16/fp8 through float32 and double-rounds values just above a midpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import ml_dtypes
import numpy as np

from bfc.errors import ConfigError


class Kind(Enum):
    INT = "int"
    FLOAT = "float"


@dataclass(frozen=True)
class Format:
    name: str
    kind: Kind
    dtype: np.dtype
    bits: int
    max: float                  # largest finite magnitude (saturation value)
    t: int | None = None        # significand bits incl. the implicit bit (floats)
    emin: int | None = None     # exponent of the smallest normal (floats)
    onnx_type: int = 0          # onnx.TensorProto element type of stored values

    @property
    def is_float(self) -> bool:
        return self.kind is Kind.FLOAT

    @property
    def half(self) -> int:
        """Grid points per binade (``2**(t-1)``)."""
        return 1 << (self.t - 1)

    @property
    def max_index(self) -> int:
        """Grid index of ``max``."""
        return int(self.grid_index(np.float64(self.max)))

    def grid_index(self, v: np.ndarray) -> np.ndarray:
        """Position of ``v >= 0`` on the grid (integer on representable values)."""
        v = np.asarray(v, dtype=np.float64)
        if not self.is_float:
            return v
        _, ex = np.frexp(v)                       # v = f * 2**ex, f in [0.5, 1)
        e = np.maximum(ex - 1, self.emin)         # binade exponent, subnormals share emin's spacing
        normal = (e - self.emin) * self.half      # index of 2**e (0 for the subnormal binade)
        sub = v < 2.0 ** self.emin
        return np.where(sub, np.ldexp(v, self.t - 1 - self.emin),
                        normal + np.ldexp(v, self.t - 1 - e))

    def grid_value(self, j: np.ndarray) -> np.ndarray:
        """Inverse of ``grid_index`` (``j >= 0``, real)."""
        j = np.asarray(j, dtype=np.float64)
        if not self.is_float:
            return j
        k = np.floor(j / self.half)               # 0: subnormal binade, k >= 1: binade emin + k - 1
        e = self.emin + np.maximum(k - 1, 0)
        base = np.maximum(k - 1, 0) * self.half
        return np.ldexp(j - base, (e + 1 - self.t).astype(np.int64))

    def round_index(self, v) -> np.ndarray:
        """Grid index (int64) of round-to-nearest-even of ``0 <= v``, saturating at max."""
        v = np.minimum(v, self.max)
        if self.dtype == np.float16:          # numpy's cast is correctly rounded; for
            return v.astype(np.float16).view(np.uint16).astype(np.int64)   # v >= 0 bits == index
        return np.rint(self.grid_index(v)).astype(np.int64)

    def floor_index(self, v) -> np.ndarray:
        """Index of the largest grid value <= ``0 <= v`` (saturating at max)."""
        j = self.round_index(v)
        return j - (self.table()[j] > np.minimum(v, self.max))

    def table(self) -> np.ndarray:
        """Grid values for indices 0 .. max_index + 1 (the last one is a sentinel)."""
        return _table(self)

    def __str__(self) -> str:
        return self.name


@lru_cache(maxsize=None)
def _table(fmt: Format) -> np.ndarray:
    j = np.arange(fmt.max_index + 2, dtype=np.float64)
    t = fmt.grid_value(j)
    t.setflags(write=False)
    return t


# onnx.TensorProto element types (plain ints: importing onnx here would make bfc.quant heavy;
# tests/test_quant_formats.py checks them against onnx.TensorProto)
_FLOAT, _INT8, _FLOAT16, _BFLOAT16, _FLOAT8E4M3FN, _FLOAT8E5M2, _INT4 = 1, 3, 10, 16, 17, 19, 22

INT8 = Format("int8", Kind.INT, np.dtype(np.int8), 8, 127.0, onnx_type=_INT8)   # symmetric: -128 unused
# int4: symmetric [-7, 7] (-8 unused); held in memory as an int8 array, stored packed two per byte
# (ONNX INT4, ``nbytes``: ceil(size / 2)); graphs read it through DequantizeLinear-21
INT4 = Format("int4", Kind.INT, np.dtype(np.int8), 4, 7.0, onnx_type=_INT4)
FP8_E4M3 = Format("fp8-e4m3", Kind.FLOAT, np.dtype(ml_dtypes.float8_e4m3fn), 8, 448.0, t=4, emin=-6,
                  onnx_type=_FLOAT8E4M3FN)
FP8_E5M2 = Format("fp8-e5m2", Kind.FLOAT, np.dtype(ml_dtypes.float8_e5m2), 8, 57344.0, t=3, emin=-14,
                  onnx_type=_FLOAT8E5M2)
FP16 = Format("fp16", Kind.FLOAT, np.dtype(np.float16), 16, 65504.0, t=11, emin=-14, onnx_type=_FLOAT16)
BF16 = Format("bf16", Kind.FLOAT, np.dtype(ml_dtypes.bfloat16), 16,
              float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), t=8, emin=-126, onnx_type=_BFLOAT16)
FP32 = Format("fp32", Kind.FLOAT, np.dtype(np.float32), 32, float(np.finfo(np.float32).max), t=24, emin=-126,
              onnx_type=_FLOAT)

#: every format bfc stores; fp32 is only ever a plain cast (``bfc.quant.cast``), never a scale search
FORMATS: dict[str, Format] = {f.name: f for f in (INT8, INT4, FP8_E4M3, FP8_E5M2, FP16, BF16, FP32)}


def format_of_dtype(dtype) -> Format:
    """The Format whose storage dtype is ``dtype`` (int8, float8 e4m3fn/e5m2, float16, bfloat16, float32);
    an int8 array is int8 (int4 values share the in-memory dtype: use the factorization's ``fmt``)."""
    dtype = np.dtype(dtype)
    for f in FORMATS.values():
        if f.dtype == dtype:
            return f
    raise ConfigError(f"no bfc number format stores {dtype}; allowed: {sorted(FORMATS)}")


def packed_nbytes(fmt: Format, size: int) -> int:
    """Stored bytes of ``size`` values of ``fmt``: sub-byte formats pack (int4: two per byte, rounded up)."""
    return (int(size) * fmt.bits + 7) // 8


def get_format(fmt) -> Format:
    """A Format from a Format or its name; ConfigError naming the allowed set otherwise."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    raise ConfigError(f"unknown quantization format {fmt!r}; allowed: {sorted(FORMATS)}")
