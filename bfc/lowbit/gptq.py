"""GPTQ rounding with error feedback (Frantar et al., arXiv 2210.17323) for ``y = x @ W``.

Objective: ``min ||X (W - W_hat)||_F^2 = tr(E^T H E)`` over W_hat on the group-wise
low-bit grid, E = W - W_hat (K, N), H = X^T X (K, K).  Rows of W (input features) are
rounded one at a time, in order k = 0 .. K-1; after row k is fixed, the rows not yet
rounded, F = {k+1 .. K-1}, absorb its error optimally.

Algebra.  With rows < k fixed, the remaining error is a quadratic in W_F.  Fixing row k at
w_hat_k (error delta = w_k - w_hat_k, a row vector over the N columns) and re-minimizing
over F gives the update (the Optimal Brain Surgeon step, independently per column)

    W_F  <-  W_F - H_{k..}^{-1}[F, k] / H_{k..}^{-1}[k, k] * delta,

where H_{k..}^{-1} is the inverse of H restricted to rows/columns k..K-1.  These
restricted inverses are the successive Schur complements of H^{-1}, whose rows are
exactly the rows of the upper Cholesky factor U of H^{-1} (H^{-1} = U^T U):
``U[k, k:] = H_{k..}^{-1}[k, k:] / sqrt(H_{k..}^{-1}[k, k])``.  Hence

    e_k = (w_k - w_hat_k) / U[k, k],      W[k+1:] -= U[k, k+1:]^T e_k,

and the error of this greedy pass is ``sum_k U[k,k]^-2 ||w_k - w_hat_k||^2`` in the
updated weights.  The updates are applied lazily per block of B rows (one matmul
``W[end:] -= U[block, end:]^T E_block`` per block).  B is a multiple of the group size so
every group's scale is fitted (``groups.fit_scales``, weighted by diag H) on its rows
*after* all earlier groups' errors have been pushed into them, as GPTQ does.

Damping: H + damp * mean(diag H) * I (default 0.01); rows with H_kk = 0 (dead inputs) get
H_kk = 1 and cannot affect the objective.
"""
from __future__ import annotations

import numpy as np

from bfc.errors import InvalidInputError
from bfc.lowbit.groups import (
    DEFAULT_RATIOS,
    GroupQuantized,
    LowBitFormat,
    fit_scales,
    round_codes,
)


def damped_gram(h, damp: float = 0.01) -> np.ndarray:
    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.isfinite(h).all():
        raise InvalidInputError(f"the Gram matrix must be a finite square (K, K) array, got {h.shape}")
    h = 0.5 * (h + h.T)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    return h


def gptq_factor(gram, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(U, diag(H)) for ``gptq_quantize``: H = damped_gram(gram), U upper with H^-1 = U^T U.  It depends
    on the Gram only: compute it once for every format tried on one weight."""
    h = damped_gram(gram, damp)
    return np.linalg.cholesky(np.linalg.inv(h)).T, np.diag(h).copy()


def gptq_quantize(w, gram, fmt: LowBitFormat | None = None, damp: float = 0.01, block: int = 128,
                  method: str = "search", ratios=DEFAULT_RATIOS, factor=None, **fmt_kwargs) -> GroupQuantized:
    """Group-wise quantization of W (K, N) by GPTQ with the calibration Gram ``gram`` (K, K) (or its
    precomputed ``factor = gptq_factor(gram, damp)``; ``gram`` is then not read)."""
    fmt = fmt or LowBitFormat(**fmt_kwargs)
    w = np.array(w, dtype=np.float64)
    if w.ndim != 2:
        raise InvalidInputError(f"expected a 2-D weight (K, N), got shape {w.shape}")
    k_dim, n = w.shape
    u, hd = factor if factor is not None else gptq_factor(gram, damp)
    if u.shape != (k_dim, k_dim):
        raise InvalidInputError(f"Gram of shape {u.shape} does not match a weight with K={k_dim} rows")
    g = fmt.group(k_dim)
    bsz = max(1, -(-block // g)) * g
    n_groups = -(-k_dim // g)
    q = np.empty((k_dim, n))
    scales = np.empty((n_groups, n))
    zps = None if fmt.symmetric else np.empty((n_groups, n))
    s = z = None
    for b0 in range(0, k_dim, bsz):
        b1 = min(b0 + bsz, k_dim)
        err = np.empty((b1 - b0, n))
        for kk in range(b0, b1):
            if (kk - b0) % g == 0:
                j = kk // g
                rows = slice(kk, min(kk + g, k_dim))
                s, z = fit_scales(w[rows][None], fmt, hd[rows][None, :, None], method, ratios)
                s, z = s[0, 0], None if z is None else z[0, 0]
                scales[j] = s
                if zps is not None:
                    zps[j] = z
            q[kk] = round_codes(w[kk], s, z, fmt)
            deq = s * (q[kk] - (0 if z is None else z))
            e = (w[kk] - deq) / u[kk, kk]
            err[kk - b0] = e
            w[kk + 1:b1] -= np.outer(u[kk, kk + 1:b1], e)
        if b1 < k_dim:
            w[b1:] -= u[b0:b1, b1:].T @ err
    return GroupQuantized(values=q.astype(np.int8 if fmt.symmetric else np.uint8),
                          scales=scales.astype(fmt.dtype),
                          zero_points=None if zps is None else zps.astype(np.uint8),
                          bits=fmt.bits, group_size=g, symmetric=fmt.symmetric)
