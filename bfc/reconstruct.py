"""Layer-wise reconstruction: fine-tune quantized KS factors to match a layer's outputs.

Given calibration activations X (n x M) of a layer with weight W, the factors of a
``QuantizedFactorization`` are refined to minimize the relative output error

    L(V) = || X W - X W_hat(Q(V)) ||_F^2 / || X W ||_F^2

where Q(V) = s * round(V / s) fake-quantizes each factor on its stored grid with its
fixed scales s.  Gradients pass through the rounding (straight-through estimator,
zero where the value saturates) and Adam (cosine-decayed step, relative to each factor's RMS) updates the latent fp64
values V.  The best quantized iterate is returned, so the
output error never increases.  Permutations and the low-rank residual stay fixed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bfc.errors import InvalidInputError
from bfc.factorize import relative_error
from bfc.quant import QuantizedFactor, QuantizedFactorization, get_format
from bfc.quant.rounding import round_nearest, to_storage


@dataclass(frozen=True)
class ReconstructionResult:
    factorization: QuantizedFactorization
    error_before: float      # relative output error ||X(W - W_hat)|| / ||X W||
    error_after: float
    steps: int


def _forward(chain, values, x):
    acts = [x]
    for p, v in zip(chain, values):
        acts.append(p.apply(v, acts[-1]))
    return acts


def _backward(chain, values, acts, grad_out):
    grads = [None] * len(values)
    g = grad_out
    for l in range(len(values) - 1, -1, -1):
        p, v = chain[l], values[l]
        n = g.shape[0]
        xs = acts[l].reshape(n, p.a, p.b, p.d)
        gs = g.reshape(n, p.a, p.c, p.d)
        grads[l] = np.einsum("nijl,nikl->iljk", xs, gs, optimize=True)
        if l:
            g = np.einsum("nikl,iljk->nijl", gs, v, optimize=True).reshape(n, -1)
    return grads


def gram_rows(gram) -> np.ndarray:
    """Rows R with R^T R = G (R = diag(sqrt(lambda)) U^T from G = U diag(lambda) U^T, small
    eigenvalues dropped): ||X E|| = ||R E|| for every E, so R stands in for the activations X
    with at most M rows however many tokens were seen."""
    evals, evecs = np.linalg.eigh(np.asarray(gram, np.float64))
    keep = evals > evals.max() * 1e-10
    return np.sqrt(evals[keep])[:, None] * evecs[:, keep].T


def reconstruct(qf: QuantizedFactorization, w, x=None, *, gram=None, steps: int = 200,
                lr: float = 1e-2) -> ReconstructionResult:
    """Refine ``qf`` (a quantized approximation of ``w``) on activations ``x`` or on their Gram
    matrix ``gram`` = X^T X (through ``gram_rows``); see module doc."""
    w = np.asarray(w, dtype=np.float64)
    if (x is None) == (gram is None):
        raise InvalidInputError("reconstruct needs the layer's activations x or their Gram matrix, not both")
    x = gram_rows(gram) if gram is not None else np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[-1] != w.shape[0]:
        raise InvalidInputError(f"activations of shape {x.shape} do not match a {w.shape} weight: "
                                f"the last dimension must be {w.shape[0]}")
    if not (isinstance(steps, int) and steps >= 0) or not (lr > 0):
        raise InvalidInputError(f"steps must be a non-negative integer and lr positive, got {steps}, {lr}")
    x = x.reshape(-1, x.shape[-1])
    fmt = get_format(qf.fmt)
    chain = qf.chain
    target = x @ w
    if qf.low_rank is not None:
        u, v = (np.asarray(m, np.float64) for m in qf.low_rank)
        target = target - (x @ u) @ v.T
    xp = x[:, qf.row_perm] if qf.row_perm is not None else x
    zt = target[:, qf.col_perm] if qf.col_perm is not None else target
    norm2 = float(np.sum((x @ w) ** 2)) or 1.0
    scales = [f.scale.astype(np.float64) for f in qf.factors]
    latent = [f.dequantize() for f in qf.factors]

    def quantized(vals):
        return [s * round_nearest(fmt, v / s) for v, s in zip(vals, scales)]

    def loss_of(q):
        z = _forward(chain, q, xp)[-1]
        return float(np.sum((z - zt) ** 2)) / norm2

    q0 = quantized(latent)
    best_q, best = q0, loss_of(q0)
    first = best
    m1 = [np.zeros_like(v) for v in latent]
    m2 = [np.zeros_like(v) for v in latent]
    step_size = [lr * (float(np.sqrt(np.mean(v ** 2))) or 1.0) for v in latent]
    b1, b2, eps = 0.9, 0.999, 1e-12
    for t in range(1, steps + 1):
        q = quantized(latent)
        acts = _forward(chain, q, xp)
        resid = acts[-1] - zt
        loss = float(np.sum(resid ** 2)) / norm2
        if loss < best:
            best, best_q = loss, q
        grads = _backward(chain, q, acts, 2.0 * resid / norm2)
        for l, g in enumerate(grads):
            g = g * (np.abs(latent[l] / scales[l]) <= fmt.max)      # STE, no gradient when saturated
            m1[l] = b1 * m1[l] + (1 - b1) * g
            m2[l] = b2 * m2[l] + (1 - b2) * g * g
            mh, vh = m1[l] / (1 - b1 ** t), m2[l] / (1 - b2 ** t)
            decay = 0.5 * (1 + np.cos(np.pi * (t - 1) / steps))       # cosine schedule
            latent[l] = latent[l] - decay * step_size[l] * mh / (np.sqrt(vh) + eps)
    final = quantized(latent)
    if loss_of(final) < best:
        best, best_q = loss_of(final), final
    factors = tuple(QuantizedFactor(to_storage(fmt, round_nearest(fmt, qv / s)), f.scale)
                    for qv, s, f in zip(best_q, scales, qf.factors))
    out = replace(qf, factors=factors)
    dense = out.to_dense()
    object.__setattr__(out, "rel_error", relative_error(w, dense))
    return ReconstructionResult(out, float(np.sqrt(first)), float(np.sqrt(best)), steps)
