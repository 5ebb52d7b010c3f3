"""``factorize``: a dense weight onto a KS chain (+ permutation, residual, calibration)."""
from __future__ import annotations

import numpy as np

from bfc.errors import ChainError, InvalidInputError
from bfc.factorize.calibrated import activation_gram, gram_diagonal, refine_fits, refine_weighted, weighted_error
from bfc.factorize.hierarchical import hierarchical
from bfc.factorize.perm import bitrev_perm, candidate_perms, check_perm
from bfc.factorize.result import KSFactorization
from bfc.ks import parse_chain

ORDERS = ("balanced", "left-to-right")


def check_matrix(w, name: str = "W") -> np.ndarray:
    """A finite, non-empty, 2-D numeric array (float64 or complex128)."""
    try:
        w = np.asarray(w)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise InvalidInputError(f"{name} is not an array: {exc}") from None
    if w.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D matrix, got {w.ndim} dimensions (shape {w.shape})")
    if w.size == 0:
        raise InvalidInputError(f"{name} is empty (shape {w.shape}); give a matrix with at least one entry")
    try:   # numbers, including ml_dtypes' bfloat16 / float8 (numpy kind 'V')
        w = w.astype(np.complex128 if np.iscomplexobj(w) else np.float64, copy=False)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} has non-numeric dtype {w.dtype}") from None
    if not np.isfinite(w).all():
        bad = int((~np.isfinite(w)).sum())
        raise InvalidInputError(f"{name} has {bad} NaN/Inf entries; clean the weights before factorizing")
    return w


def _resolve_perm(perm, n: int, what: str):
    if perm is None:
        return None
    if isinstance(perm, str):
        if perm == "bitrev":
            return bitrev_perm(n)
        raise InvalidInputError(f"{what}={perm!r}: use None, 'bitrev', 'search' (columns only) or an index array")
    return check_perm(perm, n, what)


def _low_rank(e: np.ndarray, k: int):
    u, s, vt = np.linalg.svd(e, full_matrices=False)
    root = np.sqrt(s[:k])
    return u[:, :k] * root, vt[:k].conj().T * root


def factorize(w, chain, *, order: str = "balanced", orthonormalize: bool = True, perm=None,
              row_perm=None, calibration=None, gram=None, refine: bool = True, residual_rank: int = 0,
              residual_iters: int = 6) -> KSFactorization:
    """Approximate ``w`` (M x N) by ``P_row^T (K_1 ... K_L) P_col [+ U V^T]``.

    - ``chain``: a chainable ``Chain`` of shape (M, N) (e.g. ``monarch_chain(M, N)``; a
      2-factor chain makes this the closed-form Monarch projection).
    - ``order``: hierarchical tree, ``"balanced"`` or ``"left-to-right"``.
    - ``perm``: column permutation: None, ``"bitrev"``, ``"search"`` (best of
      ``candidate_perms``) or an index array; ``row_perm`` likewise for rows.
    - ``calibration``: activations X (n x M, or any [..., M]); the result then
      minimizes ``||X (W - W_hat)||_F`` (reported as ``info["output_error"]``).
    - ``gram``: G = X^T X (M x M) instead of X: the same objective, since
      ||X E||_F^2 = tr(E^T G E).  The fit pre-whitens by s_i = sqrt(G_ii) (floored at
      1e-3 max s): W is factorized as diag(s) W and the scaling undone on the first
      factor, which keeps the KS support; ``refine`` then runs the weighted
      block-coordinate CG (seconds per layer; the planner skips it).
    - ``residual_rank``: k > 0 adds a rank-k residual U V^T (alternating projections).
    """
    w = check_matrix(w)
    chain = parse_chain(chain)
    if chain.shape != w.shape:
        raise ChainError(f"chain {chain} has shape {chain.shape} but W has shape {w.shape}; "
                         f"build the chain for {w.shape[0]} x {w.shape[1]}")
    chain.require_chainable()
    if order not in ORDERS:
        raise InvalidInputError(f"order={order!r} is not one of {ORDERS}")
    if not isinstance(residual_rank, (int, np.integer)) or residual_rank < 0:
        raise InvalidInputError(f"residual_rank={residual_rank!r} must be a non-negative integer")
    if calibration is not None:
        x = np.asarray(calibration)
        if x.ndim < 1 or x.shape[-1] != w.shape[0] or x.size == 0:
            raise InvalidInputError(f"calibration activations of shape {x.shape} do not match W: the "
                                    f"last dimension must be {w.shape[0]}")
        if not np.isfinite(x).all():
            raise InvalidInputError("calibration activations contain NaN/Inf")
        gram = activation_gram(x)
    elif gram is not None:
        gram = np.asarray(gram, dtype=np.float64)
        if gram.ndim == 1:          # diagonal form (wide inputs, see bfc.factorize.calibrated)
            if gram.shape != (w.shape[0],) or not np.isfinite(gram).all() or (gram < 0).any():
                raise InvalidInputError(f"diagonal gram of shape {gram.shape} must hold {w.shape[0]} finite "
                                        "non-negative values diag(X^T X) of the layer's input activations")
        elif gram.shape != (w.shape[0], w.shape[0]) or not np.isfinite(gram).all():
            raise InvalidInputError(f"gram of shape {gram.shape} must be a finite {w.shape[0]} x {w.shape[0]} "
                                    "matrix X^T X of the layer's input activations")
        if refine and gram.ndim == 2 and refine_fits(chain):   # the small ridge keeps the CG well posed
            gram = gram + 1e-6 * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
    if isinstance(perm, str) and perm == "search":
        best = None
        for name, p in candidate_perms(w.shape[1]):
            f = factorize(w, chain, order=order, orthonormalize=orthonormalize, perm=p,
                          row_perm=row_perm, calibration=calibration, gram=gram, refine=refine,
                          residual_rank=residual_rank,
                          residual_iters=residual_iters)
            score = f.info.get("output_error", f.rel_error)
            if best is None or score < best[0]:
                best = (score, f, name)
        best[1].info["perm"] = best[2]
        return best[1]
    col_perm = _resolve_perm(perm, w.shape[1], "perm")
    rp = _resolve_perm(row_perm, w.shape[0], "row_perm")

    def permuted(m):
        m = m[rp] if rp is not None else m
        return m[:, col_perm] if col_perm is not None else m

    gram_p = None if gram is None or rp is None else (gram[rp] if gram.ndim == 1 else gram[np.ix_(rp, rp)])
    gram_p = gram if gram_p is None else gram_p
    refine_ok = refine and gram is not None and gram.ndim == 2 and refine_fits(chain)

    def fit(target):
        if gram_p is None:
            return hierarchical(target, chain, order, orthonormalize)
        # diagonal pre-whitening keeps the support; then weighted CG refinement
        scale = np.sqrt(np.clip(gram_diagonal(gram_p), 0, None))
        scale = np.maximum(scale, 1e-3 * max(scale.max(), 1e-30))
        values = hierarchical(scale[:, None] * target, chain, order, orthonormalize)
        p = chain[0]
        values[0] = values[0] / scale.reshape(p.a, p.b, p.d).transpose(0, 2, 1)[..., None]
        return refine_weighted(target, chain, values, gram_p) if refine_ok else values

    def result(values, low_rank):
        info = {"order": order, "orthonormalize": orthonormalize}
        f = KSFactorization(chain, tuple(values), rp, col_perm, low_rank, w, info)
        if gram is not None:
            info["output_error"] = weighted_error(w, f.to_dense(), gram)
            info["calibration"] = ("refined" if refine_ok else "diagonal gram" if gram.ndim == 1
                                   else "pre-whitened" if not refine else "pre-whitened (refinement over DENSE_CAP)")
        return f

    def score(f):
        return f.info.get("output_error", f.rel_error)

    values = fit(permuted(w))
    best = result(values, None)
    for _ in range(residual_iters if residual_rank else 0):
        # alternate: best rank-k residual for the current KS part, then refit the KS part
        ks = KSFactorization(chain, tuple(values), rp, col_perm).to_dense()
        u, v = _low_rank(w - ks, residual_rank)
        cand = result(values, (u, v))
        if best.low_rank is not None and score(cand) >= score(best) * (1 - 1e-9):
            break
        best = cand
        values = fit(permuted(w - u @ v.conj().T))
    return best
