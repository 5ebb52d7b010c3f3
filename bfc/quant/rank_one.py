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
* General m (``_solve``): the first term needs only ``<|x|, |x_hat|>`` and
  ``||x_hat||^2``, swept over the sorted breakpoints (``_sweep``).  It lower-bounds the
  joint error, so the second term (which rounds y) is evaluated only where that bound
  beats the best full error found so far; since the cumulative sums carry ~1e-13
  relative noise, a shortlist of the best ``_SHORT`` candidates is re-evaluated directly.
* m = 2 (square-dyadic butterflies, ``_solve2``): enumerate the grid values of the
  larger entry instead (about 2^(t-1) per piece, see its docstring); exact, and the
  path that makes whole-factor searches cheap.
* Candidate 0 is lam = 1 (round to nearest), so the result is never worse than RTN;
  ties (within 1e-9 relative or fp64 noise) go to the smallest lam (deterministic).
* Errors of candidates are computed directly in fp64 (cross products / the orthogonal
  split above), never as ``||x||^2 ||y||^2 - ...`` differences.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bfc.quant._sweep import first_min, sweep
from bfc.quant.formats import Format
from bfc.quant.rounding import round_nearest

_CHUNK = 1 << 18          # candidates (and shortlist entries) per vectorized batch: ~2 MB arrays
_NOISE = 1e-11            # relative noise of the swept statistics (cumulative sums)
_SHORT = 16               # sweep candidates re-evaluated exactly
_EVAL = 1 << 18           # y entries per batch of full-error evaluations (bounded temporaries)


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
    tab = fmt.table()
    if fmt.is_float:
        K = fmt.half + 1
        j0 = (np.floor(fmt.grid_index(u) - 0.5) + 1).astype(np.int64)
        j = j0[..., None] + np.arange(K)
        ok = (j + 1 <= jmax)
        j = np.minimum(j, jmax)
        ok &= (tab[j] + tab[j + 1]) * 0.5 < 2 * u[..., None]
        q0 = tab[np.minimum(j0, jmax)]
    else:
        K = jmax
        j = np.broadcast_to(np.arange(K), u.shape + (K,))
        ok = np.ones(j.shape, bool)
        q0 = np.zeros_like(u)
    ok &= (u > 0)[..., None]
    q0 = np.where(u > 0, q0, 0.0)
    g0, g1 = tab[j], tab[j + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(ok, (g0 + g1) * 0.5 / u[..., None], np.inf)
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
    n = y.shape[1] if quantize_y else 0
    step = max(1, _CHUNK // (m * K + 2 + _SHORT * (m + n)))
    parts = []
    for p0 in range(0, P, step):
        sl = slice(p0, p0 + step)
        parts.append(_dispatch(x[sl], y[sl] if quantize_y else None, fmt, sx[sl],
                               sy[sl] if quantize_y else None))
    cat = lambda i: np.concatenate([p[i] for p in parts])          # noqa: E731
    y_hat = cat(1) if quantize_y else None
    return RankOneResult(cat(0), y_hat, cat(2), cat(3), cat(4), m * K + 2)


def _dispatch(x, y, fmt, sx, sy):
    """Two-entry float pieces (square-dyadic butterflies) take the anchor path."""
    if not (fmt.is_float and x.shape[1] == 2):
        return _solve(x, y, fmt, sx, sy)
    two = np.all(x != 0, axis=1)
    if np.all(two):
        return _solve2(x, y, fmt, sx, sy)
    out = [np.empty(x.shape), None if y is None else np.empty(y.shape),
           np.empty(x.shape[0]), np.empty(x.shape[0]), np.empty(x.shape[0])]
    for sel, fn in ((two, _solve2), (~two, _solve)):
        if np.any(sel):
            res = fn(x[sel], None if y is None else y[sel], fmt, sx[sel],
                     None if y is None else sy[sel])
            for o, r in zip(out, res):
                if o is not None:
                    o[sel] = r
    return tuple(out)


def _solve2(x, y, fmt, sx, sy):
    """m = 2, both entries nonzero (square-dyadic butterflies).

    Enumerate the grid values g of the larger scaled entry (the anchor) reachable for
    lam in [1, 2): about 2^(t-1) lam-intervals instead of 2^t breakpoints.  On the
    interval where the anchor rounds to g, the other entry reaches at most 4 grid values
    (computed from the interval ends), and the angle between x and x_hat, hence
    ``||x - mu x_hat||^2``, is smallest at a grid neighbour of g * u_o / u_a.  The
    nearest one gives a cheap estimate A of each interval's best error; the two
    neighbours differ in angle by a relative O(2^(1-t)), so ``A * (1 - 2^(5-t))`` is a
    lower bound.  Intervals whose bound beats the best exact error of the few best
    estimates get every reachable other value evaluated exactly (and, for the joint
    problem, y rounded): the result is the exact optimum over lam.
    """
    P = x.shape[0]
    pr = np.arange(P)
    ax = np.abs(x)
    u = ax / sx
    ia = np.argmax(u, axis=1)
    io = 1 - ia
    ua, uo, sa, so = u[pr, ia], u[pr, io], sx[pr, ia], sx[pr, io]
    xa, xo = ax[pr, ia], ax[pr, io]
    tab, jmax = fmt.table(), fmt.max_index
    qidx = fmt.round_index
    jlo = qidx(ua)
    jhi = np.minimum(np.ceil(fmt.grid_index(np.minimum(2 * ua, 2 * fmt.max)) - 0.5),
                     jmax).astype(np.int64)
    joR = qidx(uo)
    K = fmt.half + 2
    xx = xa * xa + xo * xo
    yy = np.ones(P) if y is None else np.sum(y * y, axis=1)
    floor = 1e-30 * xx * yy

    def exact(rows, ga_, go_):
        va, vo = sa[rows] * ga_, so[rows] * go_
        nx = va * va + vo * vo
        cr = xa[rows] * vo - xo[rows] * va
        e = yy[rows] * cr * cr / nx
        if y is not None:
            mu = ((xa[rows] * va + xo[rows] * vo) / nx)[:, None]
            muy = mu * y[rows]
            e = e + nx * np.sum((muy - _q(fmt, muy, sy[rows])) ** 2, axis=1)
        return e

    def expand(rows, cols):
        """Every (anchor, other) grid pair reachable on the given intervals (col 0: RTN)."""
        rtn = cols == 0
        J = np.minimum(jlo[rows] + cols - 1, jmax)
        ga_ = np.where(rtn, tab[jlo[rows]], tab[J])
        mid_lo = 0.5 * (tab[np.maximum(J - 1, 0)] + tab[J])
        mid_hi = np.where(J < jmax, 0.5 * (tab[J] + tab[J + 1]), np.inf)
        at_one = mid_lo <= ua[rows]
        r = uo[rows] / ua[rows]
        jo_lo = np.where(at_one | rtn, joR[rows], qidx(mid_lo * r * (1 + 2.0 ** -40)))
        hi_v = np.minimum(mid_hi * (1 - 2.0 ** -40), 2 * ua[rows] * (1 - 2.0 ** -45)) * r
        jo_hi = np.where(rtn, jo_lo, np.maximum(qidx(hi_v), jo_lo))
        jo = jo_lo[:, None] + np.arange(4)
        ok = jo <= jo_hi[:, None]
        rr = np.broadcast_to(rows[:, None], jo.shape)[ok]
        slot = (cols[:, None] * 4 + np.arange(4))[ok]
        return rr, slot, np.broadcast_to(ga_[:, None], jo.shape)[ok], tab[np.minimum(jo, jmax)][ok]

    # Cheap estimate per interval, other entry = nearest grid value to g * r (r = u_o / u_a).
    # With q = g_o / g_a the exact one-sided error is (c1 q - c2)^2 / (sa^2 + so^2 q^2);
    # q = r (1 +- 2^-(t-1)), so the row constant w = 1 / (sa^2 + so^2 r^2) is within the
    # slack.  Invalid intervals (beyond the lam range) are masked with inf.
    r = uo / ua
    ptab = _padded_table(fmt, K)
    ga = ptab[jlo[:, None] + np.arange(K)]
    if fmt.dtype == np.float16 and 2 * float(np.max(u)) <= fmt.max:
        go = (ga * r[:, None]).astype(np.float16).astype(np.float64)     # RNE, no saturation
    else:
        go = round_nearest(fmt, ga * r[:, None])
    q = go / ga
    c1, c2 = (xa * so)[:, None], (xo * sa)[:, None]
    A = c1 * q
    A -= c2
    A *= A
    A[np.arange(K) > (jhi - jlo)[:, None]] = np.inf
    w = yy / (sa * sa + so * so * r * r)                   # A * w estimates the error
    if y is None:
        best = np.argmin(A, axis=1)
    else:                        # rank by the estimated full error at the nearest other value
        D = sa * sa + so * so * r * r
        mu = (xa * sa)[:, None] + (xo * so)[:, None] * q
        mu /= ga * D[:, None]
        d2 = 0.0
        for j in range(y.shape[1]):
            muy = mu * y[:, j:j + 1]
            d2 = d2 + (muy - _q(fmt, muy, sy[:, j:j + 1])) ** 2
        est = A * w[:, None] + d2 * (ga * ga * D[:, None])
        best = np.argmin(est, axis=1)
    top = np.stack([np.zeros(P, np.int64), best + 1], axis=1)          # RTN + best estimate
    rows = np.repeat(pr, 2)
    rr, slot, ga_s, go_s = expand(rows, top.ravel())
    bound = np.full(P, np.inf)
    np.minimum.at(bound, rr, exact(rr, ga_s, go_s))
    slack = max(0.0, 1.0 - 2.0 ** (5 - fmt.t))
    thr = ((bound * (1 + 1e-9) + floor) / (w * slack) if slack > 0
           else np.full(P, np.finfo(np.float64).max))          # finite: excludes masked
    rows, cols = np.nonzero(A <= thr[:, None])
    rows = np.concatenate([pr, rows])
    cols = np.concatenate([np.zeros(P, np.int64), cols + 1])
    order = np.argsort(rows, kind="stable")                  # RTN first, then lam order
    rows, cols = rows[order], cols[order]
    rr, slot, ga_s, go_s = expand(rows, cols)       # sorted by row, then lam
    e = exact(rr, ga_s, go_s)
    pick = _first_min_sparse(rr, e, xx * yy, P)
    ga_p, go_p, pick = ga_s[pick], go_s[pick], slot[pick]
    lam_p = np.where(pick < 4, 1.0, np.clip(ga_p / ua, 1.0, 2.0))
    sg = np.sign(x)
    x_hat = np.empty_like(x)
    x_hat[pr, ia] = sg[pr, ia] * sa * ga_p
    x_hat[pr, io] = sg[pr, io] * so * go_p
    nh = np.sum(x_hat * x_hat, axis=1)
    mu = np.where(nh > 0, np.sum(x * x_hat, axis=1) / np.where(nh > 0, nh, 1.0), 1.0)
    if y is None:
        return x_hat, None, mu, lam_p, np.sum((x - mu[:, None] * x_hat) ** 2, axis=1)
    y_hat = _q(fmt, mu[:, None] * y, sy)
    return x_hat, y_hat, mu, lam_p, _joint_err(x, y, x_hat, y_hat)


@lru_cache(maxsize=None)
def _padded_table(fmt: Format, K: int) -> np.ndarray:
    """Grid table followed by K copies of max (index clipping without a pass)."""
    tab = fmt.table()
    return np.concatenate([tab[:-1], np.full(K + 1, tab[fmt.max_index])])


def _first_min_sparse(rows, err, scale, P):
    """``first_min`` for candidates listed row by row (rows sorted, every row present)."""
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    best = np.minimum.reduceat(err, starts)
    with np.errstate(invalid="ignore"):
        thr = best * (1 + 1e-9) + 1e-15 * np.sqrt(np.abs(best) * scale) + 1e-30 * scale
    hit = np.flatnonzero(err <= thr[rows])
    first = hit[np.r_[True, rows[hit][1:] != rows[hit][:-1]]]
    return first


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
        approx = T1
    else:
        yy = np.sum(y * y, axis=1)
        E1 = yy[:, None] * T1
        noise = _NOISE * xx * yy + 1e-300

        def full(rows, cols):
            mu = mu_c[rows, cols][:, None]
            yh = _q(fmt, mu * y[rows], sy[rows])
            return E1[rows, cols] + N[rows, cols] * np.sum((mu * y[rows] - yh) ** 2, axis=1)

        approx = _evaluate_below(E1, full, noise, y.shape[1])
    # the swept statistics carry cancellation noise: re-evaluate a shortlist exactly
    k = min(_SHORT, L.shape[1])
    sl = np.sort(np.argpartition(approx, k - 1, axis=1)[:, :k], axis=1)     # lam order
    R = np.arange(P)[:, None]
    lam_s = L[R, sl]
    xh = _q(fmt, lam_s[..., None] * x[:, None, :], sx[:, None, :])           # (P, k, m)
    nh = np.sum(xh * xh, axis=2)
    mu_s = np.where(nh > 0, np.einsum("pm,pkm->pk", x, xh) / np.where(nh > 0, nh, 1.0), 1.0)
    ex = np.sum((x[:, None, :] - mu_s[..., None] * xh) ** 2, axis=2)
    if y is None:
        tol = xx
    else:
        muy = mu_s[..., None] * y[:, None, :]
        ex = yy[:, None] * ex + nh * np.sum((muy - _q(fmt, muy, sy[:, None, :])) ** 2, axis=2)
        tol = xx * yy
    ex = np.where(np.isfinite(approx[R, sl]), ex, np.inf)
    pick = first_min(ex, tol)
    lam_p = lam_s[np.arange(P), pick]
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


def _evaluate_below(E1, full, noise, n):
    """Full errors of every candidate that can still win, in bounded batches.

    ``E1`` (P, C) lower-bounds each candidate's full error (the y term is >= 0).  The
    candidates of every row are visited in increasing ``E1``; a row stops at the first
    candidate with ``E1 > best + margin`` (``best``: smallest full error evaluated so
    far; ``margin`` = 2 * noise + 1e-8 * best covers the sweep noise and the tie
    tolerance of ``first_min``), since all later ones are larger still.  Each batch
    evaluates at most ``_EVAL`` y entries, so the temporaries stay O(_EVAL) whatever the
    number of surviving candidates.  Returns (P, C): the full error where evaluated,
    inf elsewhere; every candidate within ``margin`` of the row optimum is evaluated.
    """
    P, C = E1.shape
    order = np.argsort(E1, axis=1, kind="stable")
    e_sorted = np.take_along_axis(E1, order, 1)
    approx = np.full((P, C), np.inf)
    best = np.full(P, np.inf)
    nxt = np.zeros(P, np.int64)                      # next rank to visit, per row
    # rank 0 also takes candidate 0 (RTN), which bounds every row from the start
    rows = np.arange(P)
    e0 = full(rows, np.zeros(P, np.int64))
    approx[rows, 0] = e0
    best = np.minimum(best, e0)
    while True:
        live = np.flatnonzero(nxt < C)
        if live.size == 0:
            break
        lim = best[live] + 2 * noise[live] + 1e-8 * best[live]
        go = e_sorted[live, nxt[live]] <= lim
        nxt[live[~go]] = C                               # the rest of those rows cannot win
        live = live[go]
        if live.size == 0:
            break
        depth = max(1, min(C, _EVAL // max(1, live.size * n)))
        r = np.repeat(live, depth)
        j = (nxt[live][:, None] + np.arange(depth)).ravel()
        keep = j < C
        r, j = r[keep], j[keep]
        ok = e_sorted[r, j] <= (best[r] + 2 * noise[r] + 1e-8 * best[r])
        r, j = r[ok], j[ok]
        c = order[r, j]
        todo = approx[r, c] == np.inf                    # candidate 0 is already done
        e = np.full(r.size, np.inf)
        if todo.any():
            e[todo] = full(r[todo], c[todo])
            approx[r[todo], c[todo]] = e[todo]
        np.minimum.at(best, r, e)
        nxt[live] += depth
    return approx


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
