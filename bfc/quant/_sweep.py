"""Breakpoint sweep shared by the rank-one search and the int8 scale search.

The quantized vector ``q(lam) = Q(lam * x)`` is piecewise constant in ``lam``; it
changes only at breakpoints, where one entry steps to the next grid value.  Sorting
the breakpoints of all entries and accumulating the changes of ``<|x|, |q|>`` and
``||q||^2`` gives both statistics on every piece in O(C log C) instead of O(C m).
"""
from __future__ import annotations

import numpy as np


def sweep(lam, ddot, dnx, dot0, nx0, hi):
    """Statistics on every piece after each breakpoint.

    lam, ddot, dnx: (G, C) breakpoints (``inf`` = none) and the increments of ``dot``
    and ``nx`` when crossing them; dot0, nx0: (G,) the state before the first one;
    hi: (G,) end of the search interval (``inf`` allowed).  Returns
    ``(lam_eval, dot, nx, valid)`` of shape (G, C): a point strictly inside the piece
    that starts at the k-th sorted breakpoint, the statistics there, and whether that
    piece is real (finite breakpoint and not tied with the next one: for coincident
    breakpoints only the last state is a piece).
    """
    order, lam_s = argsort_rows(lam)
    dot = dot0[:, None] + np.cumsum(np.take_along_axis(ddot, order, 1), axis=1)
    nx = nx0[:, None] + np.cumsum(np.take_along_axis(dnx, order, 1), axis=1)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), lam.shape[:1])[:, None]
    nxt = np.concatenate([lam_s[:, 1:], np.broadcast_to(hi, (lam.shape[0], 1))], axis=1)
    nxt = np.minimum(nxt, hi)
    valid = np.isfinite(lam_s) & (lam_s < nxt)
    with np.errstate(invalid="ignore"):
        lam_eval = np.where(np.isfinite(nxt), 0.5 * (lam_s + nxt), 2.0 * lam_s)
    return lam_eval, dot, nx, valid


def argsort_rows(lam):
    """``(order, sorted)`` of every row of ``lam`` (non-negative, ``inf`` allowed), equal
    to a stable argsort.

    Sorting keys instead of indices: the low ``bits`` bits of every value's IEEE pattern
    (monotone in the value for non-negative floats) are replaced by its column, and the
    uint64 keys go through numpy's vectorized sort (2-3x faster than ``argsort``).  Equal
    values come out by column, as in a stable sort; two different values that agree on
    all other bits (relative gap < 2^(bits-52)) may come out swapped, which shows as a
    decrease of the exact values, and those rows are re-sorted with ``argsort``.
    """
    G, C = lam.shape
    if C < 2:
        return np.zeros((G, C), np.int64), lam.copy()
    bits = int(C - 1).bit_length()
    mask = np.uint64((1 << bits) - 1)
    keys = np.ascontiguousarray(lam, dtype=np.float64).view(np.uint64) & ~mask
    keys |= np.arange(C, dtype=np.uint64)
    keys.sort(axis=1)
    order = (keys & mask).astype(np.int64)
    lam_s = np.take_along_axis(lam, order, 1)
    bad = np.flatnonzero((lam_s[:, 1:] < lam_s[:, :-1]).any(axis=1))
    if bad.size:
        order[bad] = np.argsort(lam[bad], axis=1, kind="stable")
        lam_s[bad] = np.take_along_axis(lam[bad], order[bad], 1)
    return order, lam_s


def first_min(err, scale, rel=1e-9):
    """Index of the first entry (smallest lam) that ties with the row minimum.

    Ties: within ``rel`` of the minimum, or within the fp64 noise of a directly
    computed squared error (~1e-15 * sqrt(err * scale), scale = ||x||^2 ||y||^2),
    which matters for (near) exact pieces such as Hadamard factors."""
    thr = _tie_threshold(np.min(err, axis=1), scale, rel)
    return np.argmax(err <= thr[:, None], axis=1)


def _tie_threshold(best, scale, rel):
    scale = np.asarray(scale, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return best * (1 + rel) + 1e-15 * np.sqrt(np.abs(best) * scale) + 1e-30 * scale


def first_min_after(head, err, scale, rel=1e-9):
    """``first_min`` of the rows ``[head_i, err_i...]`` without forming them (no (G, C + 1) copy)."""
    thr = _tie_threshold(np.minimum(head, np.min(err, axis=1)), scale, rel)
    hit = err <= thr[:, None]
    return np.where(head <= thr, 0, np.where(hit.any(axis=1), np.argmax(hit, axis=1) + 1, 0))
