"""The target-independent artefact of planning: one layer's stored factors.

``LayerWeights`` is what every rewrite target consumes (portable now, custom-op
later): the chain, per factor the stored values (canonical (a, d, b, c) layout,
dtype int8 / float8 / float16 / float32) and a float32 scale broadcastable to them
(dims 1 or full, 1 on axis 2), the permutations and the optional low-rank residual.
Algebra:  W_hat = P_row^T (S_1*Q_1) ... (S_L*Q_L) P_col + U V^T, with ``y = x @ W_hat``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.config import Precision
from bfc.factorize import KSFactorization, inverse_perm
from bfc.ks import Chain


@dataclass(frozen=True)
class LayerWeights:
    chain: Chain
    values: tuple[np.ndarray, ...]
    scales: tuple[np.ndarray, ...]
    row_perm: np.ndarray | None
    col_perm: np.ndarray | None
    low_rank: tuple[np.ndarray, np.ndarray] | None
    precision: Precision

    def dequantized(self) -> list[np.ndarray]:
        return [v.astype(np.float32) * s for v, s in zip(self.values, self.scales)]

    def factorization(self) -> KSFactorization:
        return KSFactorization(self.chain, tuple(v.astype(np.float64) for v in self.dequantized()),
                               self.row_perm, self.col_perm, self.low_rank)

    def apply(self, x) -> np.ndarray:
        """``x @ W_hat`` for x of shape (..., M), with batched np.matmul (float64)."""
        x = np.asarray(x, np.float64)
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        n = h.shape[0]
        if self.row_perm is not None:
            h = h[:, self.row_perm]
        for p, v in zip(self.chain, self.dequantized()):
            hb = h.reshape(n, p.a, p.b, p.d).transpose(1, 3, 0, 2)          # (a, d, n, b)
            h = np.matmul(hb, v.astype(np.float64)).transpose(2, 0, 3, 1).reshape(n, -1)  # (n, a, c, d)
        if self.col_perm is not None:
            h = h[:, inverse_perm(np.asarray(self.col_perm))]
        if self.low_rank is not None:
            u, v = self.low_rank
            h = h + (x.reshape(n, -1) @ u.astype(np.float64)) @ v.astype(np.float64).T
        return h.reshape(lead + (h.shape[-1],))

    def to_dense(self) -> np.ndarray:
        return self.apply(np.eye(self.chain.shape[0]))

    @property
    def n_params(self) -> int:
        k = 0 if self.low_rank is None else self.low_rank[0].size + self.low_rank[1].size
        return self.chain.nnz + k

    @property
    def nbytes(self) -> int:
        n = sum(v.nbytes for v in self.values) + sum(s.size * 4 for s in self.scales if s.size > 1)
        n += sum(4 for s in self.scales if s.size == 1)
        n += sum(p.size * 8 for p in (self.row_perm, self.col_perm) if p is not None)
        if self.low_rank is not None:
            n += 4 * (self.low_rank[0].size + self.low_rank[1].size)
        return int(n)

    @property
    def flops_per_row(self) -> int:
        m, n = self.chain.shape
        k = 0 if self.low_rank is None else self.low_rank[0].shape[1]
        return 2 * (self.chain.nnz + k * (m + n))


def from_factorization(f, precision: Precision, value_dtype=np.float32) -> LayerWeights:
    """LayerWeights from a KSFactorization (fp32/fp16, unit scales) or a QuantizedFactorization."""
    low = None if f.low_rank is None else tuple(np.asarray(t, np.float32) for t in f.low_rank)
    if isinstance(f, KSFactorization):
        values = tuple(np.asarray(v).astype(value_dtype) for v in f.factors)
        scales = tuple(np.ones((1, 1, 1, 1), np.float32) for _ in values)
    else:
        values = tuple(np.asarray(q.values) for q in f.factors)
        scales = tuple(np.asarray(q.scale, np.float32) for q in f.factors)
    return LayerWeights(f.chain, values, scales, f.row_perm, f.col_perm, low, precision)
