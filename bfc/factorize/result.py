"""The result of a factorization: W ~ P_row^T (K_1 ... K_L) P_col (+ U V^T).

Permutations are index arrays: the KS product approximates ``W[row_perm][:, col_perm]``
(``None`` means identity).  In ONNX terms (``y = x @ W``) ``row_perm`` gathers the
input features and ``col_perm`` scatters the outputs.  The optional low-rank residual
``U @ V.T`` lives in the original (unpermuted) space.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from bfc.factorize.calibrated import relative_error
from bfc.factorize.hierarchical import dense_column_chunks, product_values
from bfc.ks import Chain


def chain_dense(chain: Chain, values) -> np.ndarray:
    """K_1 ... K_L dense, multiplied piece by piece on the KS supports
    (``hierarchical.product_values``; cost nnz(product) * r, no dense factor formed)."""
    values = chain.check_values(values)
    if not chain.is_chainable:
        return chain.to_dense(values)
    pattern, v = product_values(chain, values)
    return pattern.to_dense(v)


def chain_column_chunks(chain: Chain, values, chunk: int = 4096):
    """``(start, stop, (K_1 ... K_L)[:, start:stop])`` chunks (``hierarchical.dense_column_chunks``)."""
    values = chain.check_values(values)
    if not chain.is_chainable:
        dense = chain.to_dense(values)
        for j0 in range(0, chain.shape[1], chunk):
            yield j0, min(chain.shape[1], j0 + chunk), dense[:, j0:j0 + chunk]
        return
    yield from dense_column_chunks(chain, values, chunk)


def inverse_perm(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


@dataclass(frozen=True)
class KSFactorization:
    chain: Chain
    factors: tuple[np.ndarray, ...]          # canonical (a, d, b, c) values, one per pattern
    row_perm: np.ndarray | None = None
    col_perm: np.ndarray | None = None
    low_rank: tuple[np.ndarray, np.ndarray] | None = None   # (U: M x k, V: N x k)
    source: np.ndarray | None = field(default=None, repr=False, compare=False)  # W, for rel_error
    info: dict = field(default_factory=dict, compare=False)

    @cached_property
    def rel_error(self) -> float:
        """||W - W_hat||_F / ||W||_F against ``source`` (computed on first use; nan without it)."""
        if self.source is None:
            return float("nan")
        return relative_error(self.source, self.to_dense())

    @property
    def shape(self) -> tuple[int, int]:
        return self.chain.shape

    def product(self) -> np.ndarray:
        """K_1 ... K_L as a dense matrix (permutations and residual not applied)."""
        return chain_dense(self.chain, self.factors)

    def to_dense(self, chunk: int | None = None) -> np.ndarray:
        """W_hat (M x N).  ``chunk``: assemble it from ``iter_columns(chunk)`` so that no
        temporary exceeds the two half-chain pieces plus one M x chunk block."""
        if chunk is None:
            return self._assemble(self.product())
        out = np.empty(self.shape, dtype=np.result_type(*self.factors))
        for cols, block in self.iter_columns(chunk):
            out[:, cols] = block
        return out

    def iter_columns(self, chunk: int = 4096):
        """Yield ``(cols, W_hat[:, cols])`` over all columns, ``cols`` an index array
        (a contiguous range without ``col_perm``), about ``chunk`` columns at a time.
        Product column j is output column ``col_perm[j]``."""
        inv_r = None if self.row_perm is None else inverse_perm(self.row_perm)
        for j0, j1, block in chain_column_chunks(self.chain, self.factors, chunk):
            cols = np.arange(j0, j1) if self.col_perm is None else self.col_perm[j0:j1]
            if inv_r is not None:
                block = block[inv_r]
            if self.low_rank is not None:
                u, v = self.low_rank
                block = block + u @ v[cols].T
            yield cols, block

    def _assemble(self, product: np.ndarray) -> np.ndarray:
        out = product
        if self.row_perm is not None:
            out = out[inverse_perm(self.row_perm)]
        if self.col_perm is not None:
            out = out[:, inverse_perm(self.col_perm)]
        if self.low_rank is not None:
            u, v = self.low_rank
            out = out + u @ v.T
        return out

    def apply(self, x) -> np.ndarray:
        """``x @ W_hat`` for x of shape (..., M) without forming W_hat."""
        x = np.asarray(x)
        y = x[..., self.row_perm] if self.row_perm is not None else x
        y = self.chain.apply(self.factors, y)
        if self.col_perm is not None:
            y = y[..., inverse_perm(self.col_perm)]
        if self.low_rank is not None:
            u, v = self.low_rank
            y = y + (x @ u) @ v.T
        return y

    @property
    def n_params(self) -> int:
        extra = 0 if self.low_rank is None else self.low_rank[0].size + self.low_rank[1].size
        return self.chain.nnz + extra
