"""Optimal quantization of rank-one pieces x y^T (Gribonval, Mary, Riccietti 2023, Alg. 5.1).

Vectorized over P independent pieces: x is (P, m), y is (P, n); each entry carries
its own (fixed) scale, so ``x_hat = sx * Q(lam * x / sx)``.

* For fixed x_hat the best y_hat is ``Q(mu * y)`` with ``mu = <x, x_hat> / ||x_hat||^2``
  and the error splits orthogonally:
  ``||x y^T - x_hat y_hat^T||^2 = ||y||^2 ||x - mu x_hat||^2 + ||x_hat||^2 ||mu y - y_hat||^2``.
* Float formats with power-of-two scales: rounding commutes with 2^k, so lam in [1, 2)
  suffices (exponent range aside: rounding here is the real one, with subnormals and
  saturation, so every candidate is evaluated exactly).  The breakpoints are where an
  entry of ``lam * u`` (u = |x| / sx) hits a rounding midpoint: at most 2^(t-1) + 1 per
  entry, with t counting the implicit bit.  int8: lam in (0, inf), 127 per entry.
* The first term needs only ``<|x|, |x_hat|>`` and ``||x_hat||^2``, swept over the sorted
  breakpoints (``_sweep``).  It lower-bounds the joint error, so the second term (which
  rounds y) is evaluated only on candidates whose bound beats the best full error of the
  few best-bounded ones: exact, and usually a small fraction of the candidates.
* Candidate 0 is lam = 1 (round to nearest), so the result is never worse than RTN;
  ties go to the smallest lam (deterministic).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.quant._sweep import first_min, sweep
from bfc.quant.formats import Format
from bfc.quant.rounding import round_nearest

_CHUNK = 1 << 20          # candidates per vectorized batch
_TOL = 1e-12              # relative tie tolerance
_TOPK = 4


@dataclass(frozen=True)
class RankOneResult:
    x_hat: np.ndarray             # (P, m) dequantized, fp64
    y_hat: np.ndarray | None      # (P, n) dequantized, None when y stays unquantized
    mu: np.ndarray                # (P,) <x, x_hat> / ||x_hat||^2 (1 where x_hat == 0)
    lam: np.ndarray               # (P,) the chosen scaling (evaluation point inside its piece)
    err: np.ndarray               # (P,) squared error: joint, or ||x - mu x_hat||^2 without y
    n_candidates: int             # candidates per piece (incl. lam = 1)


def _q(fmt, v, s):
    return s * round_nearest(fmt, v / s)


def _breakpoints(fmt: Format, u: np.ndarray):
    """Breakpoints (P, m, K) of Q(lam * u), the grid values left/right of each, and the
    grid value of every entry just after the start of the search interval."""
    jmax = fmt.max_index
    if fmt.is_float:
        K = fmt.half + 1
        idx = fmt.grid_index(u)
        j0 = np.floor(idx - 0.5) + 1
        j = j0[..., None] + np.arange(K)
        ok = (j + 0.5 < fmt.grid_index(2 * u)[..., None]) & (j + 1 <= jmax)
        q0 = fmt.grid_value(np.minimum(j0, jmax))
    else:
        K = jmax
        j = np.broadcast_to(np.arange(K, dtype=np.float64), u.shape + (K,))
        ok = np.ones(j.shape, bool)
        q0 = np.zeros_like(u)
    ok &= (u > 0)[..., None]
    q0 = np.where(u > 0, q0, 0.0)
    g0, g1 = fmt.grid_value(j), fmt.grid_value(j + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(ok, fmt.grid_value(j + 0.5) / u[..., None], np.inf)
    return lam, g0, g1, q0


def optimal_rank_one(x, y, fmt: Format, sx=1.0, sy=1.0, quantize_y: bool = True) -> RankOneResult:
    """Best ``(x_hat, y_hat)`` over ``x_hat = Q(lam x)``, ``y_hat = Q(mu y)``; see module doc.

    x: (P, m); y: (P, n) (only its norm matters when ``quantize_y`` is False; may be None
    then).  sx, sy: scales broadcastable to x, y (powers of two for float formats).
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    P, m = x.shape
    sx = np.broadcast_to(np.asarray(sx, dtype=np.float64), x.shape)
    if quantize_y:
        y = np.atleast_2d(np.asarray(y, dtype=np.float64))
        sy = np.broadcast_to(np.asarray(sy, dtype=np.float64), y.shape)
    K = fmt.half + 1 if fmt.is_float else fmt.max_index
    step = max(1, _CHUNK // (m * K + 2))
    parts = []
    for p0 in range(0, P, step):
        sl = slice(p0, p0 + step)
        parts.append(_solve(x[sl], y[sl] if quantize_y else None, fmt, sx[sl],
                            sy[sl] if quantize_y else None))
    cat = lambda i: np.concatenate([p[i] for p in parts])          # noqa: E731
    y_hat = cat(1) if quantize_y else None
    return RankOneResult(cat(0), y_hat, cat(2), cat(3), cat(4), m * K + 2)


def _solve(x, y, fmt, sx, sy):
    P, m = x.shape
    ax = np.abs(x)
    u = ax / sx
    lam, g0, g1, q0 = _breakpoints(fmt, u)
    K = lam.shape[-1]
    sx3 = sx[..., None]
    ddot = (ax[..., None] * sx3 * (g1 - g0)).reshape(P, m * K)
    dnx = (sx3 * sx3 * (g1 * g1 - g0 * g0)).reshape(P, m * K)
    dot0 = np.sum(ax * sx * q0, axis=1)
    nx0 = np.sum((sx * q0) ** 2, axis=1)
    lo, hi = (1.0, 2.0) if fmt.is_float else (0.0, np.inf)
    lam = lam.reshape(P, m * K)
    lam_eval, dot, nx, valid = sweep(lam, ddot, dnx, dot0, nx0, np.full(P, hi))
    # candidate 0: lam = 1 (RTN); candidate 1: the piece before the first breakpoint
    xr = _q(fmt, x, sx)
    first = lam.min(axis=1)
    lam_init = np.where(np.isfinite(first), 0.5 * (lo + first), 1.5 if fmt.is_float else 1.0)
    L = np.concatenate([np.ones((P, 1)), lam_init[:, None], lam_eval], axis=1)
    D = np.concatenate([np.sum(np.abs(x * xr), axis=1)[:, None], dot0[:, None], dot], axis=1)
    N = np.concatenate([np.sum(xr * xr, axis=1)[:, None], nx0[:, None], nx], axis=1)
    V = np.concatenate([np.ones((P, 1), bool), (nx0 > 0)[:, None], valid], axis=1)
    xx = np.sum(x * x, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        T1 = np.where(N > 0, np.maximum(xx[:, None] - D * D / N, 0.0), xx[:, None])
        mu_c = np.where(N > 0, D / N, 1.0)
    T1 = np.where(V, T1, np.inf)
    if y is None:
        pick = first_min(T1, _TOL * xx + 1e-300)
    else:
        yy = np.sum(y * y, axis=1)
        E1 = yy[:, None] * T1
        tol = _TOL * xx * yy + 1e-300

        def full(rows, cols):
            mu = mu_c[rows, cols][:, None]
            yh = _q(fmt, mu * y[rows], sy[rows])
            return E1[rows, cols] + N[rows, cols] * np.sum((mu * y[rows] - yh) ** 2, axis=1)

        k = min(_TOPK, L.shape[1])
        top = np.argpartition(E1, k - 1, axis=1)[:, :k]
        top = np.concatenate([np.zeros((P, 1), np.int64), top], axis=1)
        rows = np.repeat(np.arange(P), top.shape[1])
        bound = full(rows, top.ravel()).reshape(top.shape).min(axis=1)
        rows, cols = np.nonzero(E1 <= (bound + tol)[:, None])
        E = np.full(E1.shape, np.inf)
        E[rows, cols] = full(rows, cols)
        pick = first_min(E, tol)
    lam_p = L[np.arange(P), pick]
    x_hat = _q(fmt, lam_p[:, None] * x, sx)
    nh = np.sum(x_hat * x_hat, axis=1)
    mu = np.where(nh > 0, np.sum(x * x_hat, axis=1) / np.where(nh > 0, nh, 1.0), 1.0)
    if y is None:
        err = np.sum((x - mu[:, None] * x_hat) ** 2, axis=1)
        return x_hat, None, mu, lam_p, err
    y_hat = _q(fmt, mu[:, None] * y, sy)
    err = _joint_err(x, y, x_hat, y_hat)
    # guard: plain RTN of both vectors (never expected to win; keeps optimal <= RTN exact)
    yr = _q(fmt, y, sy)
    err_r = _joint_err(x, y, xr, yr)
    worse = err_r < err
    if np.any(worse):
        x_hat[worse], y_hat[worse], err[worse] = xr[worse], yr[worse], err_r[worse]
        mu[worse], lam_p[worse] = 1.0, 1.0
    return x_hat, y_hat, mu, lam_p, err


def _joint_err(x, y, xh, yh):
    """||x y^T - xh yh^T||_F^2 per piece, without cancellation: with mu = <x, xh>/||xh||^2
    the two terms of x y^T - xh yh^T = (x - mu xh) y^T + xh (mu y - yh)^T are orthogonal."""
    nh = np.sum(xh * xh, axis=1)
    safe = np.where(nh > 0, nh, 1.0)
    mu = (np.sum(x * xh, axis=1) / safe)[:, None]
    e = np.sum(y * y, axis=1) * np.sum((x - mu * xh) ** 2, axis=1) \
        + nh * np.sum((mu * y - yh) ** 2, axis=1)
    return np.where(nh > 0, e, np.sum(x * x, axis=1) * np.sum(y * y, axis=1))


def rank_one_rtn(x, y, fmt: Format, sx=1.0, sy=1.0):
    """Round-to-nearest of both vectors and the squared error (the baseline)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    xr, yr = _q(fmt, x, sx), _q(fmt, y, sy)
    return xr, yr, _joint_err(x, y, xr, yr)
