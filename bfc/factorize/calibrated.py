"""Activation-weighted (calibration-aware) refinement.

For activations X (n x M) the layer's output error is ||X (W - W_hat)||_F, i.e. the
Frobenius error weighted by C = X^T X.  Starting from a plain factorization, each
factor K_l in turn minimizes the (convex, quadratic) objective

    f(K_l) = || R (W - A K_l B) ||_F^2,    R^T R = C,  A = K_1..K_(l-1),  B = K_(l+1)..K_L

over its support with a few conjugate-gradient steps (warm-started, so f never
increases).  The Hessian acts as  K -> mask(A^T C A K B B^T).

Bounded memory.  A dense Gram matrix is M x M, and the refinement above works with dense
A (M x m_in), A^T C A (m_in x m_in), B B^T (m_out x m_out) and the dense factor
(m_in x m_out).  Two caps keep every layer's memory proportional to its weight:

* ``GRAM_MAX_DIM``: for inputs wider than this (M^2 fp64 > 64 MB) ``activation_gram``
  keeps only the diagonal g_i = sum_n x_ni^2 / n.  The objective becomes the row-weighted
  error  sum_i g_i ||e_i||^2 = ||diag(sqrt g) (W - W_hat)||_F^2, i.e. the approximation
  C ~ diag(C) that ignores correlations between input features.  For it the diagonal
  pre-whitening of ``factorize`` is already the whole method (factorize diag(sqrt g) W,
  undo the scaling on the first factor's rows, which keeps the support); no CG runs.
* ``DENSE_CAP``: the refinement runs only when all of its dense temporaries fit in
  ``DENSE_CAP`` entries (``refine_fits``); otherwise the pre-whitened factorization is
  returned and ``info["calibration"]`` says so.
"""
from __future__ import annotations

import numpy as np

from bfc.ks import Chain

GRAM_MAX_DIM = 2896            # 2896^2 fp64 ~ 64 MB: wider inputs keep diag(X^T X) only
DENSE_CAP = 8 << 20            # entries (64 MB fp64) per dense temporary of the refinement


def activation_gram(x: np.ndarray, ridge: float = 1e-6, max_dim: int = GRAM_MAX_DIM) -> np.ndarray:
    """C = X^T X / n plus a small ridge relative to its trace (keeps CG well posed).

    For M > ``max_dim`` only the diagonal is formed and returned as a 1-D array of
    length M (see the module doc for what that approximation means)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    n, m = x.shape
    if m > max_dim:
        g = np.einsum("ij,ij->j", x, x) / max(n, 1)
        return g + ridge * g.sum() / m
    c = x.T @ x / max(n, 1)
    return c + ridge * np.trace(c) / m * np.eye(m)


def gram_diagonal(gram: np.ndarray) -> np.ndarray:
    """diag(C) of a dense Gram matrix, or the 1-D diagonal form itself."""
    return gram if gram.ndim == 1 else np.diag(gram).real


def refine_fits(chain: Chain, cap: int = DENSE_CAP) -> bool:
    """Whether every dense temporary of ``refine_weighted`` has at most ``cap`` entries."""
    m, n = chain.shape
    if m * m > cap:
        return False
    for p in chain:
        r, c = p.shape
        if max(m * r, r * r, c * c, r * c, c * n) > cap:
            return False
    return True


def relative_error(ref, got) -> float:
    """||got - ref||_F / ||ref||_F in float64 or complex128 (the absolute ||got - ref||_F when ref = 0).

    The one relative-error formula of the project: ``weighted_error`` with C = I for any two
    arrays of one shape (layer outputs, model outputs, weights)."""
    ref, got = np.asarray(ref), np.asarray(got)
    dtype = np.result_type(ref.dtype, got.dtype, np.float64)        # float64, or complex128
    ref = ref.astype(dtype, copy=False)
    diff = float(np.linalg.norm(got.astype(dtype, copy=False) - ref))
    norm = float(np.linalg.norm(ref))
    return diff / norm if norm > 0 else diff


def weighted_error(w: np.ndarray, w_hat, gram: np.ndarray | None = None) -> float:
    """||X (W - W_hat)||_F / ||X W||_F computed from C = X^T X (or its 1-D diagonal form,
    then sum_i C_ii ||e_i||^2; None: the plain ||W - W_hat||_F / ||W||_F).

    ``w_hat`` is a dense matrix or an iterable of ``(cols, W_hat[:, cols])`` column blocks
    (``KSFactorization.iter_columns``): both sums are separable over columns,
    ||X E||^2 = sum_c ||X E[:, c]||^2, so no dense M x N temporary is needed."""
    w = np.asarray(w, dtype=np.float64)
    gram = None if gram is None else np.asarray(gram, dtype=np.float64)
    blocks = [(slice(None), np.asarray(w_hat, np.float64))] if isinstance(w_hat, np.ndarray) else w_hat
    num = den = 0.0
    for cols, block in blocks:
        wc = w[:, cols]
        e = wc - block
        if gram is None:
            num += float(np.vdot(e, e).real)
            den += float(np.vdot(wc, wc).real)
        elif gram.ndim == 1:
            num += float(np.sum(gram * np.sum(np.abs(e) ** 2, axis=1)))
            den += float(np.sum(gram * np.sum(np.abs(wc) ** 2, axis=1)))
        else:
            num += float(np.vdot(e, gram @ e).real)
            den += float(np.vdot(wc, gram @ wc).real)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else float(np.sqrt(max(num, 0.0)))


def _dense_run(chain: Chain, values, lo: int, hi: int, size: int) -> np.ndarray:
    if lo > hi:
        return np.eye(size)
    return Chain(chain.patterns[lo:hi + 1]).to_dense(values[lo:hi + 1])


def refine_weighted(target: np.ndarray, chain: Chain, values: list[np.ndarray], gram: np.ndarray,
                    sweeps: int = 3, cg_steps: int = 10) -> list[np.ndarray]:
    """Block-coordinate CG on every factor; returns new values (never worse in weighted error)."""
    values = [v.copy() for v in values]
    L = len(chain)
    for _ in range(sweeps):
        for l in range(L):
            p = chain[l]
            m_in, m_out = p.shape
            a = _dense_run(chain, values, 0, l - 1, target.shape[0])
            b = _dense_run(chain, values, l + 1, L - 1, m_out)
            aca = a.T @ gram @ a
            bbt = b @ b.T
            rhs = p.from_dense(a.T @ gram @ target @ b.T)

            def hess(v, p=p, aca=aca, bbt=bbt):
                return p.from_dense(aca @ p.to_dense(v) @ bbt)

            x = values[l]
            r = rhs - hess(x)
            d = r.copy()
            rr = float(np.vdot(r, r))
            for _ in range(cg_steps):
                if rr <= 1e-30 * max(float(np.vdot(rhs, rhs)), 1e-300):
                    break
                hd = hess(d)
                dhd = float(np.vdot(d, hd))
                if dhd <= 0:
                    break
                alpha = rr / dhd
                x = x + alpha * d
                r = r - alpha * hd
                rr_new = float(np.vdot(r, r))
                d = r + (rr_new / rr) * d
                rr = rr_new
            values[l] = x
    return values
