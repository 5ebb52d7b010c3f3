"""Rounding onto a format's grid, in fp64, with ONNX saturation.

Everything here works in *scaled units* (the stored number, before the scale is
applied) and returns float64 values that are exactly representable in the format.
Out-of-range values saturate to +-max (ONNX ``Cast``/``QuantizeLinear`` with
``saturate=1``; for int8 the symmetric range [-127, 127]).  Inputs must be finite.
"""
from __future__ import annotations

from enum import Enum

import numpy as np

from bfc.errors import ConfigError
from bfc.quant.formats import FP16, Format


class Rounding(Enum):
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


def get_rounding(rounding) -> Rounding:
    if isinstance(rounding, Rounding):
        return rounding
    try:
        return Rounding(rounding)
    except ValueError:
        raise ConfigError(f"unknown rounding {rounding!r}; allowed: "
                          f"{[r.value for r in Rounding]}") from None


def round_nearest(fmt: Format, v) -> np.ndarray:
    """Round to nearest, ties to even, saturating at +-fmt.max."""
    v = np.clip(np.asarray(v, dtype=np.float64), -fmt.max, fmt.max)
    if not fmt.is_float:
        return np.rint(v)
    if fmt is FP16:                 # numpy's double -> half cast is correctly rounded (RNE)
        return v.astype(np.float16).astype(np.float64)
    return np.copysign(_round_magnitude(fmt, np.abs(v)), v)


def _round_magnitude(fmt: Format, a: np.ndarray) -> np.ndarray:
    """RNE of ``0 <= a <= fmt.max`` to ``fmt.t`` significant bits, on the bits of fp64.

    Normal range (a >= 2^emin): with s = 53 - t dropped mantissa bits, adding
    ``2^(s-1) - 1 + (bit s)`` and clearing the low s bits is round-half-to-even of the
    significand; a carry out of the mantissa bumps the exponent, which is exactly the
    next binade's first value.  Subnormal range: ``(a + C) - C`` with C = 2^(52 + k)
    rounds to the multiple of 2^k = 2^(emin + 1 - t) (the subnormal spacing), RNE by
    IEEE addition.  Equal to ``grid_value(rint(grid_index(a)))`` (tested), 3-4x faster.
    """
    a = np.ascontiguousarray(a, dtype=np.float64)
    shift = 53 - fmt.t
    b = a.view(np.uint64)
    out = (b + np.uint64((1 << (shift - 1)) - 1) + ((b >> np.uint64(shift)) & np.uint64(1)))
    out &= ~np.uint64((1 << shift) - 1)
    out = out.view(np.float64)
    sub = a < 2.0 ** fmt.emin
    if sub.any():
        c = 2.0 ** (52 + fmt.emin + 1 - fmt.t)
        out = np.where(sub, (a + c) - c, out)
    return out


def round_stochastic(fmt: Format, v, rng: np.random.Generator) -> np.ndarray:
    """Round up or down with probability proportional to proximity (unbiased inside the range)."""
    v = np.clip(np.asarray(v, dtype=np.float64), -fmt.max, fmt.max)
    a = np.abs(v)
    j = fmt.grid_index(a)
    lo = np.floor(j)
    lo_v, hi_v = fmt.grid_value(lo), fmt.grid_value(np.minimum(lo + 1, fmt.grid_index(fmt.max)))
    width = hi_v - lo_v
    p = np.divide(a - lo_v, width, out=np.zeros_like(a), where=width > 0)
    up = rng.random(a.shape) < p
    return np.copysign(np.where(up, hi_v, lo_v), v)


def round_to(fmt: Format, v, rounding: Rounding = Rounding.NEAREST, rng=None) -> np.ndarray:
    if rounding is Rounding.STOCHASTIC:
        return round_stochastic(fmt, v, np.random.default_rng(rng) if not isinstance(
            rng, np.random.Generator) else rng)
    return round_nearest(fmt, v)


def quantize_scaled(fmt: Format, v, scale, rounding: Rounding = Rounding.NEAREST, rng=None):
    """``(q, scale * q)``: grid values q of ``v / scale`` and their dequantized fp64 values."""
    scale = np.asarray(scale, dtype=np.float64)
    q = round_to(fmt, np.asarray(v, dtype=np.float64) / scale, rounding, rng)
    return q, q * scale


def to_storage(fmt: Format, q: np.ndarray) -> np.ndarray:
    """Cast grid values (exactly representable) to the stored dtype; exact by construction."""
    out = np.asarray(q, dtype=np.float64).astype(fmt.dtype)
    return out
