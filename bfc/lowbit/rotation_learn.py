"""Learning a butterfly rotation for low-bit rounding (ButterflyQuant-style, torch).

Given W (K, N), the calibration Gram G = X^T X and a rotation Q(theta, A) (``rotation``:
angles theta of the 2 x 2 Givens reflections, skew A of the Cayley m x m blocks; the
random signs stay fixed), minimize the activation-weighted rounding error of Q^T W

    L = ||X Q E||_F^2 / ||X W||_F^2 = tr(E^T (Q^T G Q) E) / tr(W^T G W),
    E = Q^T W - deq(Q^T W),

with deq the group-wise absmax fake quantizer and straight-through rounding
(round(v) -> v + (round(v) - v).detach()).  Under the straight-through rule E depends on
the parameters through the group scales (the group maxima: spreading outliers) and through
Q^T G Q (aligning the rounding error with weak activation directions).  Q is orthogonal
for every parameter value, so no constraint or re-projection is needed.

Cost per step: the chain applied to W^T (N K (m + 2k)) and to P, a factor of G:
G ~= P^T P + tau I with P the top ``gram_rank`` eigen-directions (scaled by sqrt of their
eigenvalues) and tau the mean of the discarded eigenvalues, so the Gram term costs
``gram_rank * K * N`` instead of ``K^2 N``.  Adam with a fixed number of steps;
deterministic for a given seed (which draws the random signs of the default init).
torch is imported lazily (optional dependency).
"""
from __future__ import annotations

import numpy as np

from bfc.errors import InvalidInputError
from bfc.lowbit.groups import LowBitFormat
from bfc.lowbit.rotation import RotationParams, base_block, rotation_chain, split_size


def _torch():
    try:
        import torch
    except ImportError:
        raise InvalidInputError("learning a rotation needs torch: pip install torch==2.13.0 (the CPU build; another version "
                                "spec pulls a multi-GB CUDA build), or use the default rotation without torch") from None
    return torch


def gram_factor(gram, rank: int) -> tuple[np.ndarray, float]:
    """``(P, tau)`` with ``G ~= P^T P + tau I``: P (r, K) the top-r eigen-directions."""
    g = 0.5 * (np.asarray(gram, dtype=np.float64) + np.asarray(gram, dtype=np.float64).T)
    lam, v = np.linalg.eigh(g)
    lam = np.clip(lam, 0.0, None)[::-1]
    v = v[:, ::-1]
    r = min(rank, g.shape[0])
    tau = float(lam[r:].mean()) if r < g.shape[0] else 0.0
    return (v[:, :r] * np.sqrt(np.maximum(lam[:r] - tau, 0.0))).T, tau


def _values_t(torch, params: RotationParams, angles, skew):
    m, k = split_size(params.size)
    d = 2 ** k
    dt = skew.dtype
    eye = torch.eye(m, dtype=dt)
    b0 = torch.as_tensor(base_block(m), dtype=dt)
    blocks = b0[None] @ torch.linalg.solve(eye - skew, eye + skew)     # (d, m, m)
    s = torch.as_tensor(params.signs.reshape(m, d).T.copy(), dtype=dt)
    out = [(s[:, :, None] * blocks)[None]]
    for t in angles:
        c, sn = torch.cos(t), torch.sin(t)
        out.append(torch.stack([torch.stack([c, sn], -1), torch.stack([sn, -c], -1)], -2))
    return out


def _apply_t(torch, chain, values, x):
    """``x @ Q`` in torch: einsum for the m x m factor, elementwise 2 x 2 butterflies."""
    for p, v in zip(chain.patterns, values):
        lead = x.shape[:-1]
        if p.b == 2 and p.c == 2:
            xs = x.reshape(lead + (p.a, 2, p.d))
            x0, x1 = xs[..., 0, :], xs[..., 1, :]
            c, s = v[..., 0, 0], v[..., 0, 1]          # block [[c, s], [s, -c]], c/s (a, d)
            x = torch.stack([x0 * c + x1 * s, x0 * s - x1 * c], dim=-2).reshape(lead + (p.a * 2 * p.d,))
        else:
            xs = x.reshape(lead + (p.a, p.b, p.d))
            x = torch.einsum("...ijl,iljk->...ikl", xs, v).reshape(lead + (p.a * p.c * p.d,))
    return x


def _fake_quant(torch, wr, fmt: LowBitFormat):
    """Group-wise absmax fake quantization of wr (K, N) along K, straight-through rounding."""
    k, n = wr.shape
    g = fmt.group(k)
    pad = (-k) % g
    wb = torch.cat([wr, wr.new_zeros(pad, n)]).reshape(-1, g, n)
    if fmt.symmetric:
        idx = wb.abs().argmax(dim=1, keepdim=True)
        s = -torch.gather(wb, 1, idx) / (1 << (fmt.bits - 1))
        z = 0.0
    else:
        mn = wb.min(dim=1, keepdim=True).values.clamp(max=0.0)
        mx = wb.max(dim=1, keepdim=True).values.clamp(min=0.0)
        s = (mx - mn) / fmt.qmax
        z = torch.round(-mn / torch.where(s == 0, torch.ones_like(s), s)).detach()
    s = torch.where(s == 0, torch.ones_like(s), s)
    v = wb / s + z
    q = torch.clamp(v + (torch.round(v) - v).detach(), fmt.qmin, fmt.qmax)
    return (s * (q - z)).reshape(-1, n)[:k]


def learn_rotation(w, gram=None, fmt: LowBitFormat | None = None, init: RotationParams | None = None,
                   steps: int = 100, lr: float = 0.02, gram_rank: int = 128, seed: int = 0,
                   learn_blocks: bool = True, dtype: str = "float32",
                   columns_per_step: int | None = 384) -> tuple[RotationParams, list[float]]:
    """Learned rotation parameters and the loss history (relative activation-weighted
    squared error per step; without a Gram, the plain Frobenius one).  The straight-through
    loss is piecewise and noisy, so the parameters of the step with the lowest loss are
    returned (step 0 is the initialization, so the result never scores worse than it).

    Each step uses ``columns_per_step`` random columns of W (seeded; the loss is a sum over
    columns, so this is an unbiased stochastic gradient).  The optimization runs in ``dtype`` (float32 halves the time); the returned parameters
    define Q exactly (its values are rebuilt in float64 by ``RotationParams.values``)."""
    torch = _torch()
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    fmt = fmt or LowBitFormat()
    w = np.asarray(w, dtype=np.float64)
    k_dim, n = w.shape
    init = init or RotationParams.hadamard_like(k_dim, seed)
    if init.size != k_dim:
        raise InvalidInputError(f"rotation of size {init.size} does not match W with K={k_dim}")
    chain = rotation_chain(k_dim)
    angles = [torch.tensor(a, dtype=dt, requires_grad=True) for a in init.angles]
    # skew = raw - raw^T, so raw = init.skew / 2 reproduces the initial blocks exactly
    skew_raw = torch.tensor(0.5 * init.skew, dtype=dt, requires_grad=learn_blocks)
    wt = torch.as_tensor(w.T.copy(), dtype=dt)                                  # (N, K)
    if gram is not None:
        p, tau = gram_factor(gram, gram_rank)
        pt = torch.as_tensor(p.copy(), dtype=dt)
        norm = float(np.sum(w * (np.asarray(gram, dtype=np.float64) @ w)))
    else:
        pt, tau, norm = None, 1.0, float(np.sum(w * w))
    leaves = angles + ([skew_raw] if learn_blocks else [])
    opt = torch.optim.Adam(leaves, lr=lr)
    history = []
    best = (np.inf, None)
    for _ in range(steps):
        opt.zero_grad()
        if columns_per_step is not None and columns_per_step < n:
            cols = torch.randperm(n, generator=gen)[:columns_per_step]
            wsub, frac = wt[cols], columns_per_step / n
        else:
            wsub, frac = wt, 1.0
        skew = skew_raw - skew_raw.transpose(-1, -2)
        vals = _values_t(torch, init, angles, skew)
        wr = _apply_t(torch, chain, vals, wsub).T                      # Q^T W (K, N)
        e = wr - _fake_quant(torch, wr, fmt)
        loss = tau * (e * e).sum()
        if pt is not None:
            pq = _apply_t(torch, chain, vals, pt)                    # P Q (r, K)
            loss = loss + ((pq @ e) ** 2).sum()
        loss = loss / (norm * frac)
        history.append(float(loss.detach()))
        if history[-1] < best[0]:
            best = (history[-1], _snapshot(skew, angles))
        loss.backward()
        opt.step()
    if best[1] is None:                                              # steps == 0
        return RotationParams(init.signs.copy(), init.skew.copy(), tuple(a.copy() for a in init.angles)), history
    skew, ang = best[1]
    return RotationParams(init.signs.copy(), skew, ang), history


def _snapshot(skew, angles):
    return (skew.detach().numpy().astype(np.float64),
            tuple(a.detach().numpy().astype(np.float64) for a in angles))
