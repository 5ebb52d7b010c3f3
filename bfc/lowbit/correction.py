"""Low-rank correction of a quantized weight, fitted in the activation-weighted norm.

W ~= W_base + U V^T, with W_base the (rotated, low-bit) approximation, U (K, r), V (N, r),
and ``x @ W ~= x @ W_base + (x @ U) @ V^T`` at run time (LQER / CALDERA style).

Fit.  With R = W - W_base and the damped Gram G = X^T X + delta I (delta = damp *
mean(diag G)), minimize ||X (R - U V^T)||_F^2 = ||S (R - U V^T)||_F^2, S = G^(1/2) =
E diag(lam)^(1/2) E^T from the eigendecomposition G = E diag(lam) E^T.  The substitution
M = S U V^T makes this an unweighted rank-r problem: by Eckart-Young, with the SVD
S R = P Sigma T^T,

    U = S^-1 P_r Sigma_r^(1/2),   V = T_r Sigma_r^(1/2)

(the square-root split balances the factors' ranges for int8).  Without a Gram, S = I.

Storage: U and V in int8, one fp32 scale per rank component (absmax per column).  After U
is rounded, V is refitted in closed form to the rounded U_hat,
``V^T = (U_hat^T G U_hat)^-1 U_hat^T G R``, then rounded; so the rounding of U is
compensated before V is stored.

Planning: ``correction_options`` fits every candidate rank from one SVD and reports bytes
and relative error, so a planner can keep a correction only where it pays: compare an
option's (bytes, error) against the uncorrected layer and against spending the same bytes
on the base format (smaller groups, one more bit), e.g. with ``best_within``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import InvalidInputError
from bfc.factorize.calibrated import weighted_error


@dataclass(frozen=True)
class LowRankCorrection:
    u: np.ndarray          # int8 (K, r)
    u_scale: np.ndarray    # float32 (r,)
    v: np.ndarray          # int8 (N, r)
    v_scale: np.ndarray    # float32 (r,)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """Dequantized (U, V) in float64."""
        return (self.u.astype(np.float64) * self.u_scale.astype(np.float64),
                self.v.astype(np.float64) * self.v_scale.astype(np.float64))

    def apply(self, x) -> np.ndarray:
        u, v = self.factors()
        return (np.asarray(x, dtype=np.float64) @ u) @ v.T

    def to_dense(self) -> np.ndarray:
        u, v = self.factors()
        return u @ v.T

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.v.nbytes + self.u_scale.nbytes + self.v_scale.nbytes


@dataclass(frozen=True)
class CorrectionOption:
    rank: int
    nbytes: int                           # bytes of the correction alone
    error: float                          # relative (activation-weighted) error of base + correction
    correction: LowRankCorrection | None


def _int8_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.abs(a).max(axis=0) / 127.0
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    q = np.clip(np.rint(a / s.astype(np.float64)), -127, 127).astype(np.int8)
    return q, s


def _whitening(gram, k: int, damp: float):
    if gram is None:
        return np.eye(k), np.eye(k), np.eye(k)
    g = 0.5 * (np.asarray(gram, dtype=np.float64) + np.asarray(gram, dtype=np.float64).T)
    if g.shape != (k, k):
        raise InvalidInputError(f"Gram of shape {g.shape} does not match a weight with K={k} rows")
    lam, e = np.linalg.eigh(g)
    lam = np.clip(lam, 0.0, None) + damp * max(float(np.mean(np.diag(g))), 1e-300)
    return (e * np.sqrt(lam)) @ e.T, (e / np.sqrt(lam)) @ e.T, (e * lam) @ e.T


def _fit_all(residual, gram, ranks, damp):
    r_mat = np.asarray(residual, dtype=np.float64)
    if r_mat.ndim != 2:
        raise InvalidInputError(f"expected a 2-D residual (K, N), got shape {r_mat.shape}")
    k, n = r_mat.shape
    s, s_inv, g = _whitening(gram, k, damp)
    p, sig, _ = np.linalg.svd(s @ r_mat, full_matrices=False)
    out = {}
    for r in ranks:
        r = int(r)
        if r < 1 or r > min(k, n):
            raise InvalidInputError(f"correction rank {r} must lie in [1, {min(k, n)}]")
        u0 = s_inv @ (p[:, :r] * np.sqrt(sig[:r]))
        uq, us = _int8_columns(u0)
        uh = uq.astype(np.float64) * us.astype(np.float64)
        a = uh.T @ g @ uh
        vt = np.linalg.lstsq(a, uh.T @ (g @ r_mat), rcond=None)[0]          # (r, N)
        vq, vs = _int8_columns(vt.T)
        out[r] = LowRankCorrection(uq, us, vq, vs)
    return out


def fit_correction(residual, gram=None, rank: int = 8, damp: float = 0.01) -> LowRankCorrection:
    """Rank-``rank`` int8 correction C ~= residual in the norm ||X C||_F (see module docstring)."""
    return _fit_all(residual, gram, [rank], damp)[int(rank)]


def correction_options(w, w_base, gram=None, ranks=(4, 8, 16, 32), damp: float = 0.01) -> list[CorrectionOption]:
    """Rank 0 (no correction) plus each rank: bytes of the correction and the relative
    error ``||X (W - W_base - C)|| / ||X W||`` (Frobenius without a Gram)."""
    w = np.asarray(w, dtype=np.float64)
    w_base = np.asarray(w_base, dtype=np.float64)
    fits = _fit_all(w - w_base, gram, ranks, damp)
    opts = [CorrectionOption(0, 0, weighted_error(w, w_base, gram), None)]
    for r in ranks:
        c = fits[int(r)]
        opts.append(CorrectionOption(int(r), c.nbytes, weighted_error(w, w_base + c.to_dense(), gram), c))
    return opts


def best_within(options, max_extra_bytes: int) -> CorrectionOption:
    """The lowest-error option whose correction fits in ``max_extra_bytes`` (rank 0 always does)."""
    fit = [o for o in options if o.nbytes <= max_extra_bytes]
    return min(fit, key=lambda o: (o.error, o.nbytes))
