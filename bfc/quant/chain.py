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
from bfc.quant.scales import Granularity, absmax_scale, float_scale, optimal_int_scale


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
    return _joint_many(fmt, [(v1, v2)], gran)[0]


def _joint_many(fmt, pairs, gran):
    """Alg. 7.1 on independent pairs, solved in one vectorized call per piece shape."""
    prep = []
    for v1, v2 in pairs:
        X, Y = cols(v1), rows(v2)
        mx, my = np.abs(X).max(axis=1), np.abs(Y).max(axis=1)
        alpha = np.where((mx > 0) & (my > 0), np.sqrt(my / np.where(mx > 0, mx, 1)), 1.0)
        X, Y = X * alpha[:, None], Y / alpha[:, None]
        s1 = float_scale(fmt, from_cols(X, v1.shape), gran)
        s2 = float_scale(fmt, from_rows(Y, v2.shape), gran)
        swap = X.shape[1] > Y.shape[1]          # shorter vector in the x role (fewer candidates)
        a = (X, cols(_bcast(s1, v1.shape)))
        b = (Y, rows(_bcast(s2, v2.shape)))
        prep.append((swap, *(b + a if swap else a + b), s1, s2))
    groups: dict = {}
    for i, (swap, x, sx, y, sy, _, _) in enumerate(prep):
        groups.setdefault((x.shape[1], y.shape[1]), []).append(i)
    out = [None] * len(pairs)
    for members in groups.values():
        cat = [np.concatenate([prep[i][k] for i in members]) for k in (1, 2, 3, 4)]
        r = optimal_rank_one(cat[0], cat[2], fmt, cat[1], cat[3])
        ends = np.cumsum([prep[i][1].shape[0] for i in members])[:-1]
        for i, xh, yh in zip(members, np.split(r.x_hat, ends), np.split(r.y_hat, ends)):
            swap, s1, s2 = prep[i][0], prep[i][5], prep[i][6]
            if swap:
                xh, yh = yh, xh
            v1, v2 = pairs[i]
            out[i] = (_finish(from_cols(xh, v1.shape), s1), _finish(from_rows(yh, v2.shape), s2))
    return out


def _one_sided_many(fmt, jobs, gran):
    """Quantize the columns (side 'cols') or rows of independent factors with the best
    lam each, one vectorized call per piece length; returns (grid values, scale, mu)
    per job, mu to push into the neighbour."""
    prep = []
    for v, side in jobs:
        s = float_scale(fmt, v, gran)
        get = cols if side == "cols" else rows
        prep.append((get(v), get(_bcast(s, v.shape)), s))
    groups: dict = {}
    for i, (x, _, _) in enumerate(prep):
        groups.setdefault(x.shape[1], []).append(i)
    out = [None] * len(jobs)
    for members in groups.values():
        x = np.concatenate([prep[i][0] for i in members])
        sx = np.concatenate([prep[i][1] for i in members])
        r = optimal_rank_one(x, None, fmt, sx, quantize_y=False)
        ends = np.cumsum([prep[i][0].shape[0] for i in members])[:-1]
        for i, xh, mu in zip(members, np.split(r.x_hat, ends), np.split(r.mu, ends)):
            (v, side), s = jobs[i], prep[i][2]
            put = from_cols if side == "cols" else from_rows
            out[i] = (*_finish(put(xh, v.shape), s), mu)
    return out


def _push(B, k, side, mu):
    """Fold the exact mu of factor k's columns (rows) into the rows of k+1 (columns of k-1)."""
    if side == "cols":
        B[k + 1] = from_rows(rows(B[k + 1]) * mu[:, None], B[k + 1].shape)
    else:
        B[k - 1] = from_cols(cols(B[k - 1]) * mu[:, None], B[k - 1].shape)


def _sweep_in(fmt, B, out, left, right, gran):
    """Left factors go left to right (columns), right factors right to left (rows); step i
    of both runs is independent, so they share one vectorized call."""
    for i in range(max(len(left), len(right))):
        jobs = ([(left[i], "cols")] if i < len(left) else []) + \
               ([(right[i], "rows")] if i < len(right) else [])
        res = _one_sided_many(fmt, [(B[k], side) for k, side in jobs], gran)
        for (k, side), (q, s, mu) in zip(jobs, res):
            out[k] = (q, s)
            _push(B, k, side, mu)


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
        ks = list(range(0, p - 1, 2))
        for k, res in zip(ks, _joint_many(fmt, [(B[k], B[k + 1]) for k in ks], gran)):
            out[k], out[k + 1] = res
        if p % 2:
            out[-1] = quantize_factor(fmt, B[-1], gran)
        return out
    if method is Method.L2R:
        _sweep_in(fmt, B, out, list(range(0, p - 2)), [], gran)
        out[p - 2], out[p - 1] = _joint(fmt, B[p - 2], B[p - 1], gran)
        return out
    if method is Method.BALANCED:
        h = p // 2                                   # middle pair (h-1, h)
        _sweep_in(fmt, B, out, list(range(0, h - 1)), list(range(p - 1, h, -1)), gran)
        out[h - 1], out[h] = _joint(fmt, B[h - 1], B[h], gran)
        return out
    raise ValueError(f"quantize_chain got {method}")      # AUTO is resolved by the caller


def round_grid(fmt: Format, q):
    """Snap values that are grid values up to fp64 noise (pushes divide by powers of two)."""
    return round_nearest(fmt, q)
