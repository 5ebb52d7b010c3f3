"""Activation-weighted (calibration-aware) refinement.

For activations X (n x M) the layer's output error is ||X (W - W_hat)||_F, i.e. the
Frobenius error weighted by C = X^T X.  Starting from a plain factorization, each
factor K_l in turn minimizes the (convex, quadratic) objective

    f(K_l) = || R (W - A K_l B) ||_F^2,    R^T R = C,  A = K_1..K_(l-1),  B = K_(l+1)..K_L

over its support with a few conjugate-gradient steps (warm-started, so f never
increases).  The Hessian acts as  K -> mask(A^T C A K B B^T).
"""
from __future__ import annotations

import numpy as np

from bfc.ks import Chain


def activation_gram(x: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """C = X^T X / n plus a small ridge relative to its trace (keeps CG well posed)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    c = x.T @ x / max(x.shape[0], 1)
    return c + ridge * np.trace(c) / c.shape[0] * np.eye(c.shape[0])


def weighted_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
    """||X (W - W_hat)||_F / ||X W||_F computed from C = X^T X."""
    e = w - w_hat
    num = float(np.vdot(e, gram @ e))
    den = float(np.vdot(w, gram @ w))
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
