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
from bfc.quant._sweep import argsort_rows, first_min_after
from bfc.quant.formats import INT8, Format

_CHUNK = 1 << 18          # candidates per vectorized batch (arrays of ~2 MB stay in cache)


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


def _rho_range(a: np.ndarray, qmax: float, upper: np.ndarray):
    """Interval [rho_lo, rho_hi] holding every rho with F(rho) <= ``upper``, where

        F(rho) = ||a - Q(rho a) / rho||^2,   Q(u) = min(rint(u), qmax)  (a >= 0).

    Why it suffices: at the optimum (s*, q*) the integer vector is self-consistent,
    q* = Q(a / s*) (else rounding a / s* would do better), so the optimum of the scale
    search equals F(1 / s*) <= upper and rho* = 1 / s* lies in the interval; the piece
    of rho -> Q(rho a) that holds rho* is swept.  Two monotone lower bounds of F:
      * entries with rho a_i < 1/2 round to 0:  F >= sum_{a_i < 1/(2 rho)} a_i^2
        (decreasing in rho; its crossing of ``upper`` gives rho_lo);
      * entries with rho a_i >= qmax + 1/2 saturate:  F >= sum (a_i - c)_+^2 with
        c = (qmax + 1/2) / rho (increasing in rho; its crossing gives rho_hi).
    """
    G, m = a.shape
    srt = np.sort(a, axis=1)
    cs = np.cumsum(srt * srt, axis=1)
    over = cs > upper[:, None]
    j = np.argmax(over, axis=1)
    with np.errstate(divide="ignore"):
        rho_lo = np.where(over.any(axis=1) & (srt[np.arange(G), j] > 0),
                          0.5 / np.where(srt[np.arange(G), j] > 0, srt[np.arange(G), j], 1.0), 0.0)
    # sum_{a_i > c} (a_i - c)^2 <= upper: on [desc[k], desc[k-1]] the active set is the k
    # largest entries, a quadratic n c^2 - 2 c S1 + S2 - upper; its smaller root in range
    desc = srt[:, ::-1]
    n = np.arange(1, m + 1, dtype=np.float64)
    s1, s2 = np.cumsum(desc, axis=1), np.cumsum(desc * desc, axis=1)
    disc = s1 * s1 - n * (s2 - upper[:, None])
    c = (s1 - np.sqrt(np.maximum(disc, 0.0))) / n
    nxt = np.concatenate([desc[:, 1:], np.zeros((G, 1))], axis=1)
    ok = (disc >= 0) & (c <= desc) & (c >= nxt)
    c_min = np.where(ok, c, np.inf).min(axis=1)
    with np.errstate(divide="ignore"):
        rho_hi = np.where(c_min > 0, (qmax + 0.5) / c_min, np.inf)
    rho_lo, rho_hi = _shrink(a, qmax, upper, rho_lo, np.minimum(rho_hi, 1e300))
    return rho_lo * (1 - 1e-9), rho_hi * (1 + 1e-9)


def _interval_bound(a, qmax, r0, r1):
    """Lower bound of F over rho in [r0, r1] (per group): every term is at least the
    squared distance from a_i to the values k / rho reachable there, the union of
    [k / r1, k / r0] over k = 0..qmax (nearest rounding picks the closest of them)."""
    lo, hi = a * r0[:, None], a * r1[:, None]
    k1 = np.minimum(np.floor(lo), qmax)
    k2 = np.ceil(hi)
    inside = np.ceil(lo) <= np.minimum(np.floor(hi), qmax)
    d = a - k1 / r0[:, None]
    with np.errstate(invalid="ignore"):
        d = np.where(k2 <= qmax, np.minimum(d, k2 / r1[:, None] - a), d)
    d = np.where(inside, 0.0, d)
    return np.sum(d * d, axis=1)


def _shrink(a, qmax, upper, rho_lo, rho_hi, iters: int = 12):
    """Move both ends inwards past sub-intervals whose ``_interval_bound`` exceeds
    ``upper`` (exponential search on the log-width of the step, per group)."""
    active = (rho_lo > 0) & (rho_hi > rho_lo)
    step = np.where(active, np.log(np.where(active, rho_hi / np.where(rho_lo > 0, rho_lo, 1.0), 2.0)) / 8, 0.0)
    for end in (0, 1):
        t = step.copy()
        for _ in range(iters):
            if end == 0:
                r0, r1 = rho_lo, np.minimum(rho_lo * np.exp(t), rho_hi)
            else:
                r0, r1 = np.maximum(rho_hi * np.exp(-t), rho_lo), rho_hi
            cut = active & (t > 0) & (_interval_bound(a, qmax, np.where(active, r0, 1.0),
                                                      np.where(active, r1, 1.0)) > upper)
            if end == 0:
                rho_lo = np.where(cut, r1, rho_lo)
            else:
                rho_hi = np.where(cut, r0, rho_hi)
            t = np.where(cut, 2 * t, t / 2)
    return rho_lo, rho_hi


def _int_err(a, rho, qmax, vv):
    """Optimal-scale error vv - <a, q>^2 / ||q||^2 of q = Q(rho a), per group."""
    q = np.minimum(np.rint(rho[:, None] * a), qmax)
    dot, nx = np.sum(a * q, axis=1), np.sum(q * q, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nx > 0, vv - dot * dot / np.where(nx > 0, nx, 1.0), vv)


def _parallel_pieces(a: np.ndarray, q: np.ndarray, K: int):
    """The exact ties of q: ``E(q) = ||a||^2 sin^2(a, q)`` depends on the direction of q
    only, so every multiple j * p of the primitive vector p = q / gcd(q) that is itself a
    piece of rho -> Q(rho a) (the rounding intervals [(j p_i - 1/2) / a_i, (j p_i + 1/2) / a_i)
    intersect; open above at K) has the same error.  Returns (rows, j) of every such
    multiple with j >= 1, for the rows where p has more than one realizable multiple."""
    g = np.gcd.reduce(q, axis=1)
    g = np.where(g > 0, g, 1)
    p = q // g[:, None]
    top = np.max(p, axis=1)
    jmax = np.where(top > 0, K // np.maximum(top, 1), 1)
    rows_out, j_out = [], []
    pos = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(1, int(jmax.max()) + 1):
            sel = np.flatnonzero(jmax >= j)
            if sel.size == 0:
                break
            qc = p[sel] * j
            aa, pp = a[sel], pos[sel]
            lo = np.where(pp & (qc > 0), (qc - 0.5) / np.where(pp, aa, 1.0), 0.0).max(axis=1)
            hi = np.where(pp & (qc < K), (qc + 0.5) / np.where(pp, aa, 1.0), np.inf).min(axis=1)
            ok = lo < hi
            rows_out.append(sel[ok])
            j_out.append(np.full(int(ok.sum()), j))
    return p, np.concatenate(rows_out), np.concatenate(j_out)


def _final_scale(v: np.ndarray, q: np.ndarray, fmt: Format):
    """fp32 scale <v, q> / ||q||^2 of the signed integer vector q, and its error after
    re-rounding v / s (what is stored); 0 and inf where q = 0."""
    qq = np.sum(q * q, axis=1)
    s = np.where(qq > 0, np.sum(v * q, axis=1) / np.where(qq > 0, qq, 1), 0)
    s32 = s.astype(np.float32).astype(np.float64)
    ok = s32 > 0
    s1 = np.where(ok, s32, 1.0)
    e = np.where(ok, _sq_err(v, s1, np.clip(np.rint(v / s1[:, None]), -fmt.max, fmt.max)), np.inf)
    return s32, e


def _int_scale_chunk(v: np.ndarray, fmt: Format, K: int) -> np.ndarray:
    """Exact sweep of rho -> Q(rho |v|) restricted to ``_rho_range`` (see module doc).

    The upper bound is the best optimal-scale error at a few probes around absmax; the
    breakpoints (k + 1/2) / a_i inside [rho_lo, rho_hi] are swept from the state just
    before rho_lo (q_i = number of breakpoints of entry i below it), and the next
    breakpoint above rho_hi closes the last piece.  The minimum and its tie-breaking
    (smallest rho) are those of the full sweep over all m * K breakpoints.
    """
    G, m = v.shape
    a = np.abs(v)
    qmax = float(K)
    vv = np.sum(a * a, axis=1)
    amax = a.max(axis=1)
    rho0 = np.where(amax > 0, qmax / np.where(amax > 0, amax, 1.0), 0.0)
    upper = np.min([_int_err(a, rho0 * f, qmax, vv) for f in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)], axis=0)
    rho_lo, rho_hi = _rho_range(a, qmax, upper * (1 + 1e-9) + 1e-30 * vv)
    with np.errstate(invalid="ignore"):
        k_lo = np.clip(np.ceil(rho_lo[:, None] * a - 0.5), 0, K).astype(np.int64)
        k_hi = np.clip(np.floor(np.minimum(rho_hi[:, None] * a, 2.0 * K) - 0.5), -1, K - 1).astype(np.int64)
    k_lo = np.where(a > 0, k_lo, 0)
    cnt = np.where(a > 0, np.maximum(k_hi - k_lo + 1, 0), 0)
    per_group = cnt.sum(axis=1)
    width = max(1, int(per_group.max()))
    flat_cnt = cnt.ravel()
    total = int(flat_cnt.sum())
    ent = np.repeat(np.arange(G * m), flat_cnt)
    first = np.cumsum(flat_cnt) - flat_cnt
    idx = np.arange(total)
    k = k_lo.ravel()[ent] + (idx - first[ent])
    gstart = np.cumsum(per_group) - per_group
    af = a.ravel()[ent]
    # one scatter of the breakpoints (group g's are contiguous: ids gstart[g] + column); the
    # sorted columns give the ids, hence the increments
    flat = idx + np.repeat(np.arange(G) * width - gstart, per_group)
    lam = np.full(G * width, np.inf)
    lam[flat] = (k + 0.5) / af
    lam = lam.reshape(G, width)
    order, lam_s = argsort_rows(lam)
    ids = np.where(order < per_group[:, None], order + gstart[:, None], total)
    ddot = np.append(af, 0.0)[ids]
    dnx = np.append(2.0 * k + 1.0, 0.0)[ids]
    q0 = k_lo.astype(np.float64)
    dot0, nx0 = np.sum(a * q0, axis=1), np.sum(q0 * q0, axis=1)
    with np.errstate(divide="ignore"):       # first breakpoint above the swept range
        above = np.where((a > 0) & (k_hi + 1 < K), (k_hi + 1.5) / np.where(a > 0, a, 1.0), np.inf)
    hi = above.min(axis=1)
    # sweep (as ``_sweep.sweep``): state after each sorted breakpoint, valid where the
    # piece is non-empty; column 0 is the piece holding rho_lo, before the first one
    dot = np.cumsum(ddot, axis=1)
    dot += dot0[:, None]
    nx = np.cumsum(dnx, axis=1)
    nx += nx0[:, None]
    nxt = np.empty_like(lam_s)
    nxt[:, :-1] = lam_s[:, 1:]
    nxt[:, -1] = hi
    np.minimum(nxt, hi[:, None], out=nxt)
    start = np.minimum(lam_s[:, 0], hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = dot * dot                      # vv - dot^2 / nx where the piece is real, inf elsewhere (in place)
        err /= nx
        np.subtract(vv[:, None], err, out=err)
        err[~((lam_s < nxt) & (nx > 0))] = np.inf
        err0 = np.where((rho_lo < start) & (nx0 > 0), vv - dot0 * dot0 / nx0, np.inf)
    pick = first_min_after(err0, err, vv)
    rows = np.arange(G)
    j = np.maximum(pick - 1, 0)
    ls, nt = lam_s[rows, j], nxt[rows, j]
    with np.errstate(invalid="ignore"):
        rho = np.where(np.isfinite(nt), 0.5 * (ls + nt), 2.0 * ls)
    lam0 = np.where(np.isfinite(start), 0.5 * (rho_lo + start),
                    np.where(np.isfinite(rho_lo), rho_lo + 1, 1.0))
    rho = np.where(pick == 0, lam0, rho)
    qa = np.minimum(np.rint(rho[:, None] * a), K).astype(np.int64)
    sg = np.sign(v)
    s32, e_opt = _final_scale(v, qa * sg, fmt)
    # exact ties (multiples of one direction, common for short groups): keep the one
    # whose fp32 scale stores best, the smallest multiple among equals
    p, rows_t, j_t = _parallel_pieces(a, qa, K)
    if rows_t.size:
        st, et = _final_scale(v[rows_t], p[rows_t] * j_t[:, None] * sg[rows_t], fmt)
        order = np.lexsort((j_t, et, rows_t))
        rows_t, st, et = rows_t[order], st[order], et[order]
        first = np.r_[True, rows_t[1:] != rows_t[:-1]]
        r1, s1, e1 = rows_t[first], st[first], et[first]
        better = e1 < e_opt[r1]
        s32[r1[better]], e_opt[r1[better]] = s1[better], e1[better]
    # absmax fallback: keep whichever is better after the fp32 rounding of s
    s_abs = (a.max(axis=1) / fmt.max).astype(np.float32).astype(np.float64)
    ok = s32 > 0
    s_abs1 = np.where(s_abs > 0, s_abs, 1.0)
    e_abs = _sq_err(v, s_abs1, np.clip(np.rint(v / s_abs1[:, None]), -fmt.max, fmt.max))
    s_out = np.where(ok & (e_opt <= e_abs), s32, s_abs1)
    return s_out.astype(np.float32)
