"""Kronecker rotations ``Q = P1 (x) P2 (x) ... (x) Pt`` (each P_l an orthogonal d_l x d_l matrix,
K = d_1 ... d_t): an orthogonal K x K map that a graph applies in t MatMuls over reshaped rows.

Index convention (row-major, the same as numpy's ``reshape`` and ONNX ``Reshape``).  For t = 2,
m = d_1, n = d_2, a row x of length K is read as the m x n matrix X with ``X[i, j] = x[i*n + j]``;
``np.kron(P1, P2)[i*n + j, a*n + b] = P1[i, a] P2[j, b]``, so

    (x Q)[a*n + b] = sum_{i, j} X[i, j] P1[i, a] P2[j, b] = (P1^T X P2)[a, b]
    (x Q^T)        = vec(P1 X P2^T)        (Q^T = P1^T (x) P2^T)
    Q^T W          = (W^T Q)^T             (each column of W goes through Q^T)

(the "vec trick" in row-major form: ``vec_r(A X B) = vec_r(X) (A^T (x) B)``).  In a graph, for
x2 (rows, K): ``Reshape(rows, m, n) -> MatMul(., P2) -> MatMul(P1^T, .) -> Reshape(rows, K)``; the
first MatMul is one GEMM of (rows*m, n) x (n, n), the second a broadcast batched product of the
m x m P1^T with every row's (m, n) block (``bfc.passes.rotation_emit``).  t factors: the last one on
the right, then P_l^T on the left of the (rows * d_1..d_{l-1}, d_l, d_{l+1}..d_t) view, l = t-1..1.
Cost per row ``K (d_1 + ... + d_t)`` multiply-adds (K = 384, 16 x 24: 40 K; 1536, 32 x 48: 80 K).

Constructors:

* ``random(k, seed)``: each factor ``diag(s_l) H_l / sqrt(d_l)`` with random +-1 signs s_l and H_l a
  Hadamard matrix (Sylvester 2^a, Paley I/II orders q+1 / 2(q+1) for primes q, and their Sylvester
  doublings: 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 60, 64, ...); a factor with no
  Hadamard matrix gets the orthonormal DCT-II (entries <= sqrt(2/d)) under random signs.  When both
  factors are Hadamard, H_1 (x) H_2 is a Hadamard matrix of order K: every entry of Q has
  magnitude K^(-1/2), the flattest (most incoherent) orthogonal matrix there is.
* ``learn(w, gram, bits, group_size, ...)``: numpy only.  Alternates (1) the group-wise absmax
  rounding T = deq(Q^T W) at the current Q and (2) the orthogonal Procrustes update of each factor
  towards it, ``max_Q tr(Q^T W T^T)`` over Q = P1 (x) P2 (block coordinate ascent: for P2 fixed the
  objective is ``tr(P1^T C1)`` with ``C1[i, a] = sum_{j,b,c} W[i,j,c] P2[j,b] T[a,b,c]``, solved by
  the polar factor of C1; then the same for P2), scored by the activation-weighted error with a
  Gram; keeps the best Q seen (never worse than its start).  Temporaries are O(K N + K^2).

Factor sizes (``kron_sizes``): the divisor tuple of K with the smallest sum d_1 + ... + d_t (the
cost per row), preferring factors that have a Hadamard matrix within 25% of that cost.  A prime
K degenerates to (1, K): a dense K x K factor (random orthogonal or Hadamard), applied as one MatMul.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, reduce

import numpy as np

from bfc.errors import InvalidInputError
from bfc.lowbit.groups import LowBitFormat


# ---- Hadamard matrices ----------------------------------------------------------------
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) (quadratic character mod the prime q)."""
    sq = np.zeros(q, dtype=np.int64)
    sq[(np.arange(1, q) ** 2) % q] = 1
    chi = np.where(sq == 1, 1, -1)
    chi[0] = 0
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


@lru_cache(maxsize=None)
def _hadamard_int(n: int) -> np.ndarray | None:
    if n == 1:
        return np.ones((1, 1), np.int64)
    if n == 2:
        return np.array([[1, 1], [1, -1]], np.int64)
    if n % 4:
        return None
    q = n - 1
    if _is_prime(q) and q % 4 == 3:                     # Paley I
        s = np.zeros((n, n), np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return s + np.eye(n, dtype=np.int64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:      # Paley II
        c = np.zeros((q + 1, q + 1), np.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        a, b = np.array([[1, -1], [-1, -1]]), np.array([[1, 1], [1, -1]])
        return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)
    half = _hadamard_int(n // 2)
    if half is not None:                                 # Sylvester doubling
        return np.kron(np.array([[1, 1], [1, -1]], np.int64), half)
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order n (float64, H H^T = n I), or None when none is built."""
    h = _hadamard_int(int(n))
    return None if h is None else h.astype(np.float64)


def dct(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (rows = frequencies)."""
    j = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * j / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def _divisor_tuples(k: int, t: int):
    if t == 1:
        yield (k,)
        return
    for d in range(1, int(round(k ** (1.0 / t))) + 2):
        if k % d == 0:
            for rest in _divisor_tuples(k // d, t - 1):
                if rest[0] >= d:
                    yield (d,) + rest


def kron_sizes(k: int, n_factors: int = 2) -> tuple[int, ...]:
    """Factor sizes (d_1 <= ... <= d_t), product k: least cost sum(d), preferring Hadamard orders."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"rotation size must be a positive integer, got {k!r}")
    if n_factors < 1:
        raise InvalidInputError(f"n_factors must be >= 1, got {n_factors!r}")
    cands = list(_divisor_tuples(int(k), int(n_factors)))
    best = min(sum(c) for c in cands)
    ok = [c for c in cands if sum(c) <= 1.25 * best]
    return min(ok, key=lambda c: (-sum(hadamard(d) is not None for d in c), sum(c), c))


# ---- the rotation ---------------------------------------------------------------------
def _apply_factors(x: np.ndarray, factors, transpose: bool) -> np.ndarray:
    """``x @ (P1 (x) ... (x) Pt)`` (or its transpose) over the last axis of x, in float64."""
    x = np.asarray(x, dtype=np.float64)
    lead = x.shape[:-1]
    k = x.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    sizes = [f.shape[0] for f in factors]
    mats = [f.T if transpose else f for f in factors]
    h = x.reshape(rows * k // sizes[-1], sizes[-1]) @ mats[-1]          # last factor: one GEMM
    for l in range(len(factors) - 2, -1, -1):                           # P_l^T on the left
        before = rows * int(np.prod(sizes[:l], dtype=np.int64))
        after = k // int(np.prod(sizes[:l + 1], dtype=np.int64))
        h = np.matmul(mats[l].T, h.reshape(before, sizes[l], after))
    return h.reshape(lead + (k,))


@dataclass(frozen=True)
class KroneckerRotation:
    """``Q = factors[0] (x) factors[1] (x) ...``, each factor orthogonal: ``apply(x) = x @ Q``."""
    factors: tuple[np.ndarray, ...]
    storage: str = "float32"        # how a graph stores the factors ("float16": Cast at load)

    def __post_init__(self):
        fs = tuple(np.asarray(f, dtype=np.float64) for f in self.factors)
        if not fs or any(f.ndim != 2 or f.shape[0] != f.shape[1] for f in fs):
            raise InvalidInputError("Kronecker factors must be square matrices")
        object.__setattr__(self, "factors", fs)

    # -- constructors
    @classmethod
    def random(cls, k_dim: int, seed: int | None = 0, n_factors: int = 2,
               sizes: tuple[int, ...] | None = None) -> KroneckerRotation:
        """Randomized Hadamard-like factors (module docstring); seed None = no random signs."""
        sizes = tuple(sizes) if sizes is not None else kron_sizes(k_dim, n_factors)
        if int(np.prod(sizes)) != k_dim:
            raise InvalidInputError(f"factor sizes {sizes} do not multiply to K={k_dim}")
        rng = None if seed is None else np.random.default_rng(seed)
        out = []
        for d in sizes:
            h = hadamard(d)
            base = dct(d).T if h is None else h / np.sqrt(d)
            s = np.ones(d) if rng is None or d == 1 else rng.choice([-1.0, 1.0], size=d)
            out.append(s[:, None] * base)
        return cls(tuple(out))

    @classmethod
    def block_diagonal(cls, k_dim: int, block: int = 64, seed: int | None = 0) -> KroneckerRotation:
        """``I_{K/b} (x) diag(s) H_b / sqrt(b)``: one b x b randomized Hadamard-like block repeated along
        K (b = the quantization group size aligns each group with one block).  One GEMM per row block
        (K b multiply-adds per row); ``learn(init=...)`` keeps the identity factor and fits the block."""
        if block < 1 or k_dim % block:
            raise InvalidInputError(f"block {block} does not divide K={k_dim}")
        r = cls.random(block, seed, n_factors=1)
        return cls((np.eye(k_dim // block),) + r.factors)

    @classmethod
    def learn(cls, w, gram=None, bits: int = 4, group_size: int | None = 64, seed: int = 0,
              steps: int = 20, init: KroneckerRotation | None = None, symmetric: bool = True,
              inner: int = 2, columns: int | None = 2048, return_history: bool = False):
        """A rotation fitted to W (K, N) for group-wise ``bits``-bit rounding of Q^T W (module docstring).

        Score of a Q: ``tr(E^T Q^T G Q E) / tr(W^T G W)`` with E = Q^T W - deq(Q^T W) (absmax RTN
        per group), or ``||E||^2 / ||W||^2`` without a Gram.  ``steps`` outer rounds (each: one
        rounding, ``inner`` Procrustes sweeps over the factors) on ``columns`` seeded random columns of W
        (all when None or N is smaller), in float32; returns the best Q seen by that score, factors
        exactly orthogonal in float64 (and the score history when ``return_history``)."""
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or not np.isfinite(w).all():
            raise InvalidInputError(f"expected a finite 2-D weight (K, N), got shape {w.shape}")
        k, n = w.shape
        rot = init if init is not None else cls.random(k, seed)
        if rot.size != k:
            raise InvalidInputError(f"rotation of size {rot.size} does not match W with K={k} rows")
        fmt = LowBitFormat(bits, group_size, symmetric, "float32")
        if columns is not None and columns < n:            # a seeded column subset (the loss is a sum over columns)
            cols = np.sort(np.random.default_rng(seed).choice(n, size=columns, replace=False))
            w = w[:, cols]
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        g32 = None
        if gram is not None:
            g = np.asarray(gram, dtype=np.float64)
            if g.shape != (k, k):
                raise InvalidInputError(f"Gram of shape {g.shape} does not match W with K={k} rows")
            g32 = (0.5 * (g + g.T)).astype(np.float32)
        norm = float(np.sum(w32.astype(np.float64) ** 2)) if g32 is None else \
            float(np.sum(w32 * (g32 @ w32), dtype=np.float64))
        norm = norm or 1.0

        def score(fs):
            f32 = [f.astype(np.float32) for f in fs]
            wr = _left(w32, f32, transpose=True)                 # Q^T W
            t = _fake_quant(wr, fmt)
            e = wr - t
            if g32 is None:
                return float(np.sum(e.astype(np.float64) ** 2)) / norm, t
            qe = _left(e, f32, transpose=False)                  # Q E: the error in input coordinates
            return float(np.sum(qe * (g32 @ qe), dtype=np.float64)) / norm, t

        facs = list(rot.factors)
        free = [l for l, f in enumerate(facs) if f.shape[0] > 1 and not _is_identity(f)] or \
            [l for l, f in enumerate(facs) if f.shape[0] > 1] or [0]
        cur, t = score(facs)
        best, best_f, hist = cur, list(facs), [cur]
        for _ in range(steps):
            for _ in range(inner if len(free) > 1 else 1):
                for l in free:
                    facs[l] = _polar(_factor_target(w32, t, facs, l))
            cur, t = score(facs)
            hist.append(cur)
            if cur < best:
                best, best_f = cur, list(facs)
        out = cls(tuple(best_f), rot.storage)
        return (out, hist) if return_history else out

    # -- the protocol shared with ButterflyRotation
    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors)

    @property
    def size(self) -> int:
        return int(np.prod(self.sizes))

    @property
    def p1(self) -> np.ndarray:
        return self.factors[0]

    @property
    def p2(self) -> np.ndarray:
        return reduce(np.kron, self.factors[1:]) if len(self.factors) > 1 else np.ones((1, 1))

    def apply(self, x) -> np.ndarray:
        """``x @ Q`` (x: (..., K)) in float64, never forming Q."""
        self._check(x)
        return _apply_factors(x, self.factors, transpose=False)

    def apply_transpose(self, x) -> np.ndarray:
        """``x @ Q^T`` (the inverse when Q is orthogonal)."""
        self._check(x)
        return _apply_factors(x, self.factors, transpose=True)

    def rotate_weight(self, w) -> np.ndarray:
        """``Q^T W`` for W (K, N), i.e. ``(W^T Q)^T`` (computed over W's (d_1, ..., d_t, N) view)."""
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] != self.size:
            raise InvalidInputError(f"rotation of size {self.size} applied to a weight of shape {w.shape}")
        return _left(w, self.factors, transpose=True)

    def to_dense(self) -> np.ndarray:
        return reduce(np.kron, self.factors)

    @property
    def n_params(self) -> int:
        """Entries of the stored factors (identity factors are not stored)."""
        return int(sum(f.size for f in self.factors if not _is_identity(f)))

    @property
    def n_stored(self) -> int:
        return self.n_params

    @property
    def nbytes(self) -> int:
        return np.dtype(self.storage).itemsize * self.n_stored

    @property
    def flops_per_row(self) -> int:
        """Multiply-adds (x2) per row of the emitted graph (identity factors are skipped)."""
        return 2 * self.size * int(sum(f.shape[0] for f in self.factors if not _is_identity(f)))

    def stored_as(self, storage: str) -> KroneckerRotation:
        """The factors rounded to ``storage`` (float16 / float32); every use of the result sees
        exactly the stored numbers.  float16 Hadamard factors are c * (+-1) with c rounded: each is
        a scalar multiple (1 + eps, |eps| <= 2^-11) of an orthogonal matrix; float32 keeps
        Q^T Q = I to ~1e-7 (the factors are small: 16x24 in fp32 is 3.3 kB)."""
        dt = np.dtype(storage)
        if dt not in (np.float16, np.float32):
            raise InvalidInputError(f"rotation storage {storage!r}: allowed float16, float32")
        return KroneckerRotation(tuple(np.asarray(f, dt).astype(np.float64) for f in self.factors), dt.name)

    def _check(self, x):
        if np.shape(x)[-1] != self.size:
            raise InvalidInputError(f"rotation of size {self.size} applied to rows of length {np.shape(x)[-1]}")


# ---- learning helpers -----------------------------------------------------------------
def _is_identity(f: np.ndarray) -> bool:
    return bool(np.array_equal(f, np.eye(f.shape[0])))


def _polar(c: np.ndarray) -> np.ndarray:
    """argmax_{P orthogonal} tr(P^T C) = U V^T (C = U S V^T)."""
    u, _, vt = np.linalg.svd(c)
    return u @ vt


def _left(w: np.ndarray, factors, transpose: bool) -> np.ndarray:
    """``Q^T W`` (transpose) or ``Q W`` for W (K, N), as contiguous (batched) GEMMs over the
    (d_1, ..., d_t, N) view: factor l acts on axis l from the left."""
    k, n = w.shape
    sizes = [f.shape[0] for f in factors]
    h = w
    for l, f in enumerate(factors):
        before = int(np.prod(sizes[:l], dtype=np.int64))
        h = np.matmul(f.T if transpose else f, h.reshape(before, sizes[l], -1))
    return h.reshape(k, n)


def _factor_target(w: np.ndarray, t: np.ndarray, facs, l: int) -> np.ndarray:
    """C_l (float64) with tr(Q^T W T^T) = tr(P_l^T C_l) for the other factors fixed.

    tr(Q^T W T^T) = sum W[i_1..i_t, c] prod_j P_j[i_j, a_j] T[a_1..a_t, c]: apply P_j^T (j != l) to W's
    axis j, then C_l[i, a] = sum over the other indices of W'[.., i, .., c] T[.., a, .., c]."""
    sizes = [f.shape[0] for f in facs]
    h = w
    for j, f in enumerate(facs):
        if j != l:
            before = int(np.prod(sizes[:j], dtype=np.int64))
            h = np.matmul(f.T.astype(w.dtype), h.reshape(before, sizes[j], -1))
    before = int(np.prod(sizes[:l], dtype=np.int64))
    h3 = h.reshape(before, sizes[l], -1)
    t3 = t.reshape(before, sizes[l], -1)
    return np.matmul(h3, t3.transpose(0, 2, 1)).sum(axis=0, dtype=np.float64)


def _fake_quant(wr: np.ndarray, fmt: LowBitFormat) -> np.ndarray:
    """Group-wise absmax round-to-nearest of wr (K, N) on bfc's grid (``bfc.lowbit.groups``: signed
    scale, the largest-magnitude entry exact when symmetric), dequantized, in wr's dtype."""
    k, n = wr.shape
    g = fmt.group(k)
    pad = (-k) % g
    wb = (np.concatenate([wr, np.zeros((pad, n), wr.dtype)]) if pad else wr).reshape(-1, g, n)
    mx, mn = wb.max(axis=1, keepdims=True), wb.min(axis=1, keepdims=True)
    if fmt.symmetric:
        v = np.where(-mn > mx, mn, mx)
        s = -v / (1 << (fmt.bits - 1))
        z = 0.0
    else:
        mn, mx = np.minimum(mn, 0), np.maximum(mx, 0)
        s = (mx - mn) / fmt.qmax
        z = np.clip(np.rint(-mn / np.where(s == 0, 1, s)), 0, fmt.qmax)
    safe = np.where(s == 0, 1, s)
    q = np.clip(np.rint(wb / safe) + z, fmt.qmin, fmt.qmax)
    return (s * (q - z)).reshape(-1, n)[:k]
