"""Quantizing a whole chain W = K_1 ... K_L (float64 values in, grid values + scales out).

The product is invariant to ``K_l D, D^-1 K_(l+1)`` for any invertible diagonal D.
Column i of K_l and row i of K_(l+1) form the rank-one piece ``x_i y_i^T``; in the
canonical layout column i of K_l is one output channel (b entries) and row i of
K_(l+1) has c entries.  For square-dyadic chains the pieces of a pair have disjoint
supports, so the pair error is the sum of the piece errors (Alg. 7.1).

Orders:
* ``rtn``       every factor rounded on its own (per-group scale, see ``scales``).
* ``pairwise``  (K1,K2), (K3,K4), ... jointly (Alg. 7.2); an odd last factor gets RTN.
* ``l2r``       left to right (Alg. 7.3): quantize the columns of K_l with the best
                lam (y = rest of the chain, unquantized), push the exact mu into the
                rows of K_(l+1); the last pair jointly.
* ``balanced``  meet in the middle (bfc's design): the left half goes left to right,
                the right half right to left (rows of K_l, mu pushed into the columns
                of K_(l-1)), and the middle pair is quantized jointly.  Every rescaling
                travels at most L/2 factors and both ends are treated alike.

Block rank r > 1 (general chainable chains): the r pieces meeting in one block overlap,
so their errors are not additive; bfc still optimizes each piece on its own (the sum of
the piece errors bounds the block error up to a factor r by Cauchy-Schwarz) and the
measured error of the product decides (``auto``).

int8: with per-channel scales a column piece owns its scale, so lam is absorbed into
the scale and mu = 1 at the optimum: every non-RTN order reduces to the optimal
per-group scale search (``scales.optimal_int_scale``) on each factor.
"""
from __future__ import annotations

from enum import Enum

import numpy as np

from bfc.quant.formats import Format
from bfc.quant.rank_one import optimal_rank_one
from bfc.quant.rounding import Rounding, round_nearest, round_to
from bfc.quant.scales import (Granularity, absmax_scale, float_scale, optimal_int_scale)


class Method(Enum):
    RTN = "rtn"
    PAIRWISE = "pairwise"
    L2R = "l2r"
    BALANCED = "balanced"
    AUTO = "auto"


# ---- piece views of the canonical layout (a, d, b, c) -------------------------------
def cols(v):
    """(N, b): row i = column i of K."""
    a, d, b, c = v.shape
    return v.transpose(0, 3, 1, 2).reshape(a * c * d, b)


def from_cols(arr, shape):
    a, d, b, c = shape
    return arr.reshape(a, c, d, b).transpose(0, 2, 3, 1)


def rows(v):
    """(M, c): row i = row i of K."""
    a, d, b, c = v.shape
    return v.transpose(0, 2, 1, 3).reshape(a * b * d, c)


def from_rows(arr, shape):
    a, d, b, c = shape
    return arr.reshape(a, b, d, c).transpose(0, 2, 1, 3)


def _bcast(s, shape):
    return np.broadcast_to(np.asarray(s, dtype=np.float64), shape)


# ---- single factors -------------------------------------------------------------------
def _scale(fmt: Format, v, gran: Granularity, optimal: bool):
    if fmt.is_float:
        return float_scale(fmt, v, gran)
    return optimal_int_scale(v, gran, fmt) if optimal else absmax_scale(v, gran, fmt)


def quantize_factor(fmt, v, gran, rounding=Rounding.NEAREST, rng=None, optimal=False):
    """(grid values, fp32 scale) of one factor rounded on its own."""
    s = _scale(fmt, v, gran, optimal)
    return round_to(fmt, v / s.astype(np.float64), rounding, rng), s


def _finish(v_hat, s):
    """Grid values of an already-quantized (dequantized fp64) factor."""
    return v_hat / s.astype(np.float64), s


# ---- pair and one-sided steps ---------------------------------------------------------
def _joint(fmt, v1, v2, gran):
    """Alg. 7.1 on (K_l, K_(l+1)); returns two (grid values, scale)."""
    X, Y = cols(v1), rows(v2)
    mx, my = np.abs(X).max(axis=1), np.abs(Y).max(axis=1)
    alpha = np.where((mx > 0) & (my > 0), np.sqrt(my / np.where(mx > 0, mx, 1)), 1.0)
    X, Y = X * alpha[:, None], Y / alpha[:, None]
    v1b, v2b = from_cols(X, v1.shape), from_rows(Y, v2.shape)
    s1, s2 = float_scale(fmt, v1b, gran), float_scale(fmt, v2b, gran)
    SX, SY = cols(_bcast(s1, v1.shape)), rows(_bcast(s2, v2.shape))
    if X.shape[1] <= Y.shape[1]:
        r = optimal_rank_one(X, Y, fmt, SX, SY)
        xh, yh = r.x_hat, r.y_hat
    else:                                   # shorter vector in the x role (fewer candidates)
        r = optimal_rank_one(Y, X, fmt, SY, SX)
        xh, yh = r.y_hat, r.x_hat
    return _finish(from_cols(xh, v1.shape), s1), _finish(from_rows(yh, v2.shape), s2)


def _one_sided(fmt, v, gran, side):
    """Quantize the columns (side='cols') or rows of one factor with the best lam each;
    returns (grid values, scale, mu) with mu to push into the neighbour."""
    s = float_scale(fmt, v, gran)
    get, put = (cols, from_cols) if side == "cols" else (rows, from_rows)
    r = optimal_rank_one(get(v), None, fmt, get(_bcast(s, v.shape)), quantize_y=False)
    q, s = _finish(put(r.x_hat, v.shape), s)
    return q, s, r.mu


def _l2r_run(fmt, B, out, order, gran):
    """Quantize factors ``order`` one-sided, pushing mu towards the chain's middle."""
    for k in order:
        nxt = k + 1 if order.step > 0 else k - 1
        side = "cols" if order.step > 0 else "rows"
        q, s, mu = _one_sided(fmt, B[k], gran, side)
        out[k] = (q, s)
        if side == "cols":
            B[nxt] = from_rows(rows(B[nxt]) * mu[:, None], B[nxt].shape)
        else:
            B[nxt] = from_cols(cols(B[nxt]) * mu[:, None], B[nxt].shape)


def quantize_chain(fmt: Format, values, method: Method, gran: Granularity,
                   rounding: Rounding = Rounding.NEAREST, rng=None):
    """List of (grid values (a,d,b,c) fp64, fp32 scale) for every factor."""
    B = [np.array(v, dtype=np.float64) for v in values]
    p = len(B)
    if method is Method.RTN:
        return [quantize_factor(fmt, v, gran, rounding, rng) for v in B]
    if not fmt.is_float:
        return [quantize_factor(fmt, v, gran, optimal=True) for v in B]
    if p == 1:
        return [quantize_factor(fmt, B[0], gran)]
    out = [None] * p
    if method is Method.PAIRWISE:
        for k in range(0, p - 1, 2):
            out[k], out[k + 1] = _joint(fmt, B[k], B[k + 1], gran)
        if p % 2:
            out[-1] = quantize_factor(fmt, B[-1], gran)
        return out
    if method is Method.L2R:
        _l2r_run(fmt, B, out, range(0, p - 2), gran)
        out[p - 2], out[p - 1] = _joint(fmt, B[p - 2], B[p - 1], gran)
        return out
    if method is Method.BALANCED:
        h = p // 2                                   # middle pair (h-1, h)
        _l2r_run(fmt, B, out, range(0, h - 1), gran)
        _l2r_run(fmt, B, out, range(p - 1, h, -1), gran)
        out[h - 1], out[h] = _joint(fmt, B[h - 1], B[h], gran)
        return out
    raise ValueError(f"quantize_chain got {method}")      # AUTO is resolved by the caller


def round_grid(fmt: Format, q):
    """Snap values that are grid values up to fp64 noise (pushes divide by powers of two)."""
    return round_nearest(fmt, q)
