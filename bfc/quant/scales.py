"""Scale granularity, scale rules, and the optimal int8 scale search.

Scales live in the canonical value layout (a, d, b, c) and are always size 1 along
axis 2 (b, the reduction axis of ``x @ K``):

* ``factor``  -> (1, 1, 1, 1)
* ``block``   -> (a, d, 1, 1), one per dense b x c block
* ``channel`` -> (a, d, 1, c), one per column of K (output channel of x @ K)

Float formats get power-of-two scales (they commute with rounding, so the rank-one
search stays exact); int8 gets absmax scales (RTN) or the optimal scale below.

**Optimal int8 scale.**  For a group v the stored pair (s, q) minimises
``||v - s q||``.  For a fixed integer vector q the best s is ``<v, q> / ||q||^2``
and the error is ``||v||^2 - <v, q>^2 / ||q||^2``; the optimal q is ``Q(rho v)``
for some rho > 0 (else rounding v / s would improve it), and ``Q(rho v)`` only
changes at the breakpoints ``rho = (k + 1/2) / |v_i|``, k = 0..126.  Sweeping the
sorted breakpoints finds the global optimum exactly (Algorithm 5.1's argument with
the scale in the role of the unquantized second vector).
"""
from __future__ import annotations

from enum import Enum

import numpy as np

from bfc.errors import ConfigError
from bfc.quant._sweep import first_min, sweep
from bfc.quant.formats import INT8, Format

_CHUNK = 1 << 21          # candidates per vectorized batch


class Granularity(Enum):
    FACTOR = "factor"
    BLOCK = "block"
    CHANNEL = "channel"


def get_granularity(g) -> Granularity:
    if isinstance(g, Granularity):
        return g
    try:
        return Granularity(g)
    except ValueError:
        raise ConfigError(f"unknown scale granularity {g!r}; allowed: "
                          f"{[x.value for x in Granularity]}") from None


def scale_shape(shape, gran: Granularity) -> tuple[int, int, int, int]:
    a, d, b, c = shape
    return {Granularity.FACTOR: (1, 1, 1, 1), Granularity.BLOCK: (a, d, 1, 1),
            Granularity.CHANNEL: (a, d, 1, c)}[gran]


def to_groups(values: np.ndarray, gran: Granularity) -> np.ndarray:
    """(G, m) view: one row per scale group, in the order of the scale array."""
    a, d, b, c = values.shape
    if gran is Granularity.FACTOR:
        return values.reshape(1, -1)
    if gran is Granularity.BLOCK:
        return values.reshape(a * d, b * c)
    return values.transpose(0, 1, 3, 2).reshape(a * d * c, b)


def group_absmax(values: np.ndarray, gran: Granularity) -> np.ndarray:
    return np.abs(to_groups(values, gran)).max(axis=1).reshape(scale_shape(values.shape, gran))


def float_scale(fmt: Format, values: np.ndarray, gran: Granularity) -> np.ndarray:
    """Power-of-two scales leaving one binade of headroom (2 * absmax / s <= max).

    The headroom keeps ``lam * x`` (lam in [1, 2)) inside the range during the rank-one
    search.  fp16 and bf16 keep scale 1 while the values are comfortably in range.
    """
    amax = group_absmax(values, gran)
    with np.errstate(divide="ignore"):
        s = np.exp2(np.ceil(np.log2(2.0 * amax / fmt.max)))
    s = np.where(amax > 0, s, 1.0)
    if fmt.bits >= 16:
        keep = (2.0 * amax <= fmt.max) & (amax >= 2.0 ** (fmt.emin + fmt.t))
        s = np.where(keep | (amax == 0), 1.0, s)
    return s.astype(np.float32)


def absmax_scale(values: np.ndarray, gran: Granularity, fmt: Format = INT8) -> np.ndarray:
    amax = group_absmax(values, gran)
    return np.where(amax > 0, amax / fmt.max, 1.0).astype(np.float32)


def _sq_err(v, s, q):
    return np.sum((v - s[:, None] * q) ** 2, axis=1)


def optimal_int_scale(values: np.ndarray, gran: Granularity, fmt: Format = INT8) -> np.ndarray:
    """fp32 scales minimising ``||v - s * round(v / s)||`` per group (never worse than absmax)."""
    groups = to_groups(np.asarray(values, dtype=np.float64), gran)
    G, m = groups.shape
    K = int(fmt.max)
    out = np.empty(G, dtype=np.float32)
    step = max(1, _CHUNK // (m * K))
    for g0 in range(0, G, step):
        out[g0:g0 + step] = _int_scale_chunk(groups[g0:g0 + step], fmt, K)
    return out.reshape(scale_shape(values.shape, gran))


def _int_scale_chunk(v: np.ndarray, fmt: Format, K: int) -> np.ndarray:
    G, m = v.shape
    a = np.abs(v)
    k = np.arange(K, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lam = np.where(a[:, :, None] > 0, (k + 0.5) / a[:, :, None], np.inf).reshape(G, m * K)
    ddot = np.broadcast_to(a[:, :, None], (G, m, K)).reshape(G, m * K)
    dnx = np.broadcast_to(2 * k + 1, (G, m, K)).reshape(G, m * K)
    zeros = np.zeros(G)
    lam_eval, dot, nx, valid = sweep(lam, ddot, dnx, zeros, zeros, np.full(G, np.inf))
    vv = np.sum(a * a, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(valid & (nx > 0), vv[:, None] - dot * dot / nx, np.inf)
    pick = first_min(err, vv)
    rho = lam_eval[np.arange(G), pick]
    q = np.clip(np.rint(rho[:, None] * a), 0, fmt.max) * np.sign(v)
    qq = np.sum(q * q, axis=1)
    s = np.where(qq > 0, np.sum(v * q, axis=1) / np.where(qq > 0, qq, 1), 0)
    s32 = s.astype(np.float32).astype(np.float64)
    # absmax fallback: keep whichever is better after the fp32 rounding of s
    s_abs = (a.max(axis=1) / fmt.max).astype(np.float32).astype(np.float64)
    ok = s32 > 0
    s32 = np.where(ok, s32, 1.0)
    e_opt = _sq_err(v, s32, np.clip(np.rint(v / s32[:, None]), -fmt.max, fmt.max))
    s_abs1 = np.where(s_abs > 0, s_abs, 1.0)
    e_abs = _sq_err(v, s_abs1, np.clip(np.rint(v / s_abs1[:, None]), -fmt.max, fmt.max))
    s_out = np.where(ok & (e_opt <= e_abs), s32, s_abs1)
    return s_out.astype(np.float32)
