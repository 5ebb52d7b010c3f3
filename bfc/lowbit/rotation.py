"""Orthogonal butterfly rotations Q of any size K = m * 2^k (m odd), as a bfc KS chain.

``x @ Q`` is a chain of k + 1 Kronecker-sparse factors (canonical (a, d, b, c) values,
``bfc.ks.pattern``), built with ``chain_from_blocks([m, 2, ..., 2], [m, 2, ..., 2])``:

* factor 0, pattern ``(1, m, m, 2^k)``: 2^k independent m x m orthogonal blocks;
  ``values[0, l] = diag(signs[j*2^k + l])_j @ B_l @ C(A_l)`` with B_l a fixed orthonormal
  block (the 3 x 3 reflection ``I - (2/3) 1 1^T`` for m = 3, the orthonormal DCT-II
  otherwise, [1] for m = 1), C(A) = (I - A)^-1 (I + A) the Cayley map of a skew A (zero at
  initialization; orthogonal for every A) and random +-1 signs (the "randomized" part);
* factor l = 1..k, pattern ``(m 2^(l-1), 2, 2, 2^(k-l))``: 2 x 2 blocks
  ``[[cos t, sin t], [sin t, -cos t]]`` (an angle-parameterized Givens reflection,
  orthogonal for every t).  At t = pi/4 every block is the normalized 2 x 2 Hadamard, and
  the product of the k factors is ``I_m (x) H_{2^k} / sqrt(2^k)`` (Sylvester ordering,
  factors commute since each acts on one bit of the index).

Q is a product of orthogonal factors, hence orthogonal; it is chainable (block rank 1), so
bfc's KS kernels and rewrites apply it as they apply any chain.  With random signs and
t = pi/4, Q = D (B (x) H) is the randomized Hadamard-like transform of QuIP/QuaRot:
every entry of the butterfly part has magnitude 2^(-k/2), so outliers spread over 2^k
coordinates (and over m more through B).  ``apply`` costs ``K (m + 2 k)`` multiply-adds
per row and never forms Q.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import InvalidInputError
from bfc.ks import Chain, chain_from_blocks


def split_size(k_dim: int) -> tuple[int, int]:
    """``K = m * 2^k`` with m odd: returns (m, k)."""
    if not isinstance(k_dim, (int, np.integer)) or k_dim < 1:
        raise InvalidInputError(f"rotation size must be a positive integer, got {k_dim!r}")
    k = 0
    while k_dim % 2 == 0:
        k_dim //= 2
        k += 1
    return int(k_dim), k


def rotation_chain(k_dim: int) -> Chain:
    m, k = split_size(k_dim)
    return chain_from_blocks([m] + [2] * k, [m] + [2] * k)


def base_block(m: int) -> np.ndarray:
    """A fixed orthonormal m x m block with small entries (see the module docstring)."""
    if m == 1:
        return np.ones((1, 1))
    if m == 3:
        return np.eye(3) - 2.0 / 3.0
    j = np.arange(m)[:, None]
    i = np.arange(m)[None, :]
    c = np.sqrt(2.0 / m) * np.cos(np.pi * (2 * i + 1) * j / (2 * m))
    c[0] /= np.sqrt(2.0)
    return c.T


def cayley(a: np.ndarray) -> np.ndarray:
    """``(I - A)^-1 (I + A)`` for a batch of skew-symmetric A (..., m, m)."""
    eye = np.eye(a.shape[-1])
    return np.linalg.solve(eye - a, eye + a)


@dataclass(frozen=True)
class RotationParams:
    """signs (K,) of +-1; skew (2^k, m, m) Cayley parameters; angles: k arrays (m 2^(l-1), 2^(k-l))."""
    signs: np.ndarray
    skew: np.ndarray
    angles: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        return self.signs.size

    @classmethod
    def hadamard_like(cls, k_dim: int, seed: int | None = 0) -> RotationParams:
        """Random signs (seeded; None = all +1), zero skew, all angles pi/4."""
        m, k = split_size(k_dim)
        signs = np.ones(k_dim) if seed is None else \
            np.random.default_rng(seed).choice([-1.0, 1.0], size=k_dim)
        angles = tuple(np.full((m * 2 ** (l - 1), 2 ** (k - l)), np.pi / 4) for l in range(1, k + 1))
        return cls(signs, np.zeros((2 ** k, m, m)), angles)

    def values(self) -> list[np.ndarray]:
        """Canonical (a, d, b, c) values of every factor."""
        m, k = split_size(self.size)
        d = 2 ** k
        blocks = base_block(m)[None] @ cayley(self.skew)                 # (d, m, m)
        s = self.signs.reshape(m, d).T                                    # s[l, j] = signs[j*d + l]
        out = [(s[:, :, None] * blocks)[None]]
        for t in self.angles:
            c, sn = np.cos(t), np.sin(t)
            out.append(np.stack([np.stack([c, sn], -1), np.stack([sn, -c], -1)], -2))
        return out


@dataclass(frozen=True)
class ButterflyRotation:
    """An orthogonal KS chain Q (K x K): ``apply(x) = x @ Q``."""
    chain: Chain
    values: tuple[np.ndarray, ...]
    params: RotationParams | None = None
    storage: str = "float32"      # how a graph stores the values ("float16": 2 bytes each, Cast at load)

    @classmethod
    def from_params(cls, params: RotationParams) -> ButterflyRotation:
        return cls(rotation_chain(params.size), tuple(params.values()), params)

    @classmethod
    def hadamard_like(cls, k_dim: int, seed: int | None = 0) -> ButterflyRotation:
        return cls.from_params(RotationParams.hadamard_like(k_dim, seed))

    @property
    def size(self) -> int:
        return self.chain.shape[0]

    def apply(self, x) -> np.ndarray:
        """``x @ Q`` through the chain (x: (..., K))."""
        return self.chain.apply(self.values, np.asarray(x, dtype=np.float64))

    def apply_transpose(self, x) -> np.ndarray:
        """``x @ Q^T`` (the inverse), factors transposed in reverse order."""
        x = np.asarray(x, dtype=np.float64)
        for p, v in zip(self.chain.patterns[::-1], self.values[::-1]):
            a, b, c, d = p.a, p.b, p.c, p.d
            xs = x.reshape(x.shape[:-1] + (a, c, d))
            x = np.einsum("...ikl,iljk->...ijl", xs, v, optimize=True).reshape(x.shape[:-1] + (a * b * d,))
        return x

    def rotate_weight(self, w) -> np.ndarray:
        """``Q^T W`` for W (K, N): columns of W go through Q^T, i.e. ``(W^T Q)^T``."""
        return self.apply(np.asarray(w, dtype=np.float64).T).T

    def to_dense(self) -> np.ndarray:
        return self.chain.to_dense(self.values)

    @property
    def flops_per_row(self) -> int:
        """Multiply-adds (x2) of ``apply`` per row: K (m + 2 k) (the m x m blocks, then k 2 x 2 stages)."""
        m, k = split_size(self.size)
        return 2 * self.size * (m + 2 * k)

    @property
    def n_params(self) -> int:
        return self.chain.nnz

    @property
    def n_stored(self) -> int:
        """Numbers a graph stores: with ``params``, the m x m blocks of factor 0 and one angle per
        2 x 2 block (the blocks are built from the angle in the graph); else every value."""
        if self.params is None:
            return self.chain.nnz
        return int(self.values[0].size + sum(a.size for a in self.params.angles))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored numbers (``storage``)."""
        return np.dtype(self.storage).itemsize * self.n_stored

    def stored_as(self, storage: str) -> ButterflyRotation:
        """The rotation as a graph stores it: angles and the m x m blocks rounded to ``storage``
        (float16 or float32).  The 2 x 2 blocks stay exactly orthogonal (cos/sin of the stored
        angle); float16 blocks of factor 0 are orthogonal to ~1e-3.  Every user of the returned
        rotation (``rotate_weight``, ``apply``) sees exactly the stored numbers."""
        dt = np.dtype(storage)
        if dt not in (np.float16, np.float32):
            raise InvalidInputError(f"rotation storage {storage!r}: allowed float16, float32")
        rnd = lambda v: np.asarray(v, dt).astype(np.float64)  # noqa: E731
        if self.params is None:
            return ButterflyRotation(self.chain, tuple(rnd(v) for v in self.values), None, dt.name)
        params = RotationParams(self.params.signs, self.params.skew, tuple(rnd(a) for a in self.params.angles))
        vals = params.values()
        vals[0] = rnd(vals[0])
        return ButterflyRotation(self.chain, tuple(vals), params, dt.name)
