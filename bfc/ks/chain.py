"""Chains of KS patterns: W = K_1 K_2 ... K_L, and their constructors.

A chain is *valid* when consecutive shapes agree (a_l c_l d_l = a_{l+1} b_{l+1} d_{l+1})
and *chainable* when, in addition, r_l = a_l c_l / a_{l+1} = b_{l+1} d_{l+1} / d_l is
an integer with a_l | a_{l+1} and d_{l+1} | d_l; r_l is the block rank between
factors l and l+1.  Chainable chains are what the hierarchical factorization needs:
the product of any run of consecutive factors is again supported on a KS pattern
(``Chain.product_pattern``).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import isqrt, prod

import numpy as np

from bfc.errors import ChainError, InvalidInputError
from bfc.ks.pattern import KSPattern


def _as_pattern(p) -> KSPattern:
    if isinstance(p, KSPattern):
        return p
    try:
        a, b, c, d = p
    except (TypeError, ValueError):
        raise ChainError(f"a KS pattern is 4 positive integers (a, b, c, d), got {p!r}") from None
    return KSPattern(a, b, c, d)


@dataclass(frozen=True)
class Chain:
    patterns: tuple[KSPattern, ...]

    def __init__(self, patterns):
        pats = tuple(_as_pattern(p) for p in patterns)
        if not pats:
            raise ChainError("a chain needs at least one KS pattern")
        for l, (p, q) in enumerate(zip(pats, pats[1:])):
            if p.shape[1] != q.shape[0]:
                raise ChainError(f"invalid chain: factor {l} has {p.shape[1]} columns but factor "
                                 f"{l + 1} has {q.shape[0]} rows ({p} then {q})")
        object.__setattr__(self, "patterns", pats)

    # ---- structure -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.patterns)

    def __iter__(self):
        return iter(self.patterns)

    def __getitem__(self, i):
        return self.patterns[i]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.patterns[0].shape[0], self.patterns[-1].shape[1])

    @property
    def nnz(self) -> int:
        return sum(p.nnz for p in self.patterns)

    @property
    def is_chainable(self) -> bool:
        for p, q in zip(self.patterns, self.patterns[1:]):
            if q.a % p.a or p.d % q.d or (p.a * p.c) % q.a or (q.b * q.d) % p.d:
                return False
            if (p.a * p.c) // q.a != (q.b * q.d) // p.d:
                return False
        return True

    @property
    def ranks(self) -> tuple[int, ...]:
        """Block rank r_l between consecutive factors (chainable chains only)."""
        self.require_chainable()
        return tuple((p.a * p.c) // q.a for p, q in zip(self.patterns, self.patterns[1:]))

    def require_chainable(self) -> None:
        if not self.is_chainable:
            raise ChainError(f"chain {self} is valid but not chainable (need a_l | a_(l+1), "
                             "d_(l+1) | d_l and a_l c_l / a_(l+1) = b_(l+1) d_(l+1) / d_l); "
                             "build it with chainable_chain()")

    def product_pattern(self, lo: int, hi: int) -> KSPattern:
        """Pattern supporting K_lo ... K_hi (inclusive, zero-based)."""
        self.require_chainable()
        if not 0 <= lo <= hi < len(self):
            raise ChainError(f"factor range [{lo}, {hi}] outside a chain of {len(self)} factors")
        p = self.patterns[lo]
        a, b, c, d = p.a, p.b, p.c, p.d
        for q in self.patterns[lo + 1:hi + 1]:
            r = (a * c) // q.a
            b, c, d = b * q.b // r, c * q.c // r, q.d
        return KSPattern(a, b, c, d)

    # ---- values ----------------------------------------------------------------------
    def check_values(self, values) -> list[np.ndarray]:
        values = list(values)
        if len(values) != len(self):
            raise ChainError(f"chain {self} has {len(self)} factors but {len(values)} value arrays were given")
        return [p.check_values(v) for p, v in zip(self.patterns, values)]

    def to_dense(self, values) -> np.ndarray:
        values = self.check_values(values)
        out = self.patterns[-1].to_dense(values[-1])
        for p, v in zip(self.patterns[-2::-1], values[-2::-1]):
            out = _left_mul(p, v, out)
        return out

    def apply(self, values, x) -> np.ndarray:
        """``x @ (K_1 ... K_L)`` without forming any dense factor."""
        values = self.check_values(values)
        for p, v in zip(self.patterns, values):
            x = p.apply(v, x)
        return x

    def random_values(self, rng=None, dtype=np.float64) -> list[np.ndarray]:
        """Gaussian values on every support (a random exact KS product)."""
        rng = np.random.default_rng(rng)
        return [rng.standard_normal(p.value_shape).astype(dtype) for p in self.patterns]

    def __str__(self) -> str:
        return "[" + " ".join(str(p) for p in self.patterns) + "]"


def _left_mul(p: KSPattern, values: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``K @ m`` for a KS factor K (values in canonical layout) and a dense m."""
    a, b, c, d = p.a, p.b, p.c, p.d
    ms = m.reshape(a, c, d, m.shape[1])
    out = np.einsum("iljk,ikln->ijln", values, ms, optimize=True)
    return out.reshape(a * b * d, m.shape[1])


# ---- constructors --------------------------------------------------------------------
def _check_dim(name: str, n) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ChainError(f"{name}={n!r} must be a positive integer")
    return int(n)


def prime_factors(n: int) -> list[int]:
    """Prime factors of n in non-increasing order (384 -> [3, 2, 2, 2, 2, 2, 2, 2])."""
    n = _check_dim("n", n)
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return sorted(out, reverse=True)


def split_factors(n: int, k: int) -> list[int]:
    """Split n into k integer factors as evenly as the primes allow (product == n).

    Largest primes first, each to the currently smallest group; the groups are
    returned in non-increasing order.  Missing groups are 1.
    """
    groups = [1] * k
    for p in prime_factors(n):
        groups[int(np.argmin(groups))] *= p
    return sorted(groups, reverse=True)


def chain_from_blocks(bs, cs, rank: int = 1) -> Chain:
    """Chainable chain with per-factor block sizes b_l, c_l (prod bs = M, prod cs = N).

    Pattern l is (prod_{i<l} c_i, b_l * r^[l>0], c_l * r^[l<L-1], prod_{i>l} b_i):
    the dense-block sizes are b_l x c_l and consecutive factors meet at block rank r.
    """
    bs, cs = [_check_dim("b", b) for b in bs], [_check_dim("c", c) for c in cs]
    rank = _check_dim("rank", rank)
    if len(bs) != len(cs) or not bs:
        raise ChainError(f"need as many row blocks as column blocks, got {bs} and {cs}")
    L = len(bs)
    pats = []
    for l in range(L):
        a = prod(cs[:l])
        d = prod(bs[l + 1:])
        pats.append(KSPattern(a, bs[l] * (rank if l > 0 else 1), cs[l] * (rank if l < L - 1 else 1), d))
    return Chain(pats)


def chainable_chain(m: int, n: int, rank: int = 1, n_factors: int = 2) -> Chain:
    """A chainable chain for any M x N, from the prime factorizations of M and N.

    M and N are each split into ``n_factors`` near-equal factors (``split_factors``);
    factor l gets a b_l x c_l dense block, and consecutive factors meet at block rank
    ``rank``.  ``n_factors=2`` is a (rectangular) Monarch; ``n_factors=log2(N)`` on
    a power of two is the square-dyadic butterfly.
    """
    m, n = _check_dim("m", m), _check_dim("n", n)
    n_factors = _check_dim("n_factors", n_factors)
    bs = split_factors(m, n_factors)
    cs = split_factors(n, n_factors)[::-1]
    return chain_from_blocks(bs, cs, rank)


def butterfly_chain(n: int) -> Chain:
    """Square-dyadic butterfly of size n = 2^L: pattern l (1-based) is (2^(l-1), 2, 2, n/2^l)."""
    n = _check_dim("n", n)
    if n < 2 or n & (n - 1):
        raise ChainError(f"a square-dyadic butterfly needs a power-of-two size >= 2, got {n}; "
                         "use chainable_chain(m, n) for other sizes")
    L = n.bit_length() - 1
    return Chain([KSPattern(2 ** (l - 1), 2, 2, n // 2 ** l) for l in range(1, L + 1)])


def _near_sqrt_divisor(n: int) -> int:
    best = 1
    for p in range(1, isqrt(n) + 1):
        if n % p == 0:
            best = p
    return best


def monarch_chain(m: int, n: int | None = None, p: int | None = None, q: int | None = None,
                  rank: int = 1) -> Chain:
    """Monarch: ((1, p, q*r, m/p), (q, (m/p)*r, n/q, 1)); p, q default to divisors near sqrt."""
    m = _check_dim("m", m)
    n = m if n is None else _check_dim("n", n)
    p = _near_sqrt_divisor(m) if p is None else _check_dim("p", p)
    q = _near_sqrt_divisor(n) if q is None else _check_dim("q", q)
    if m % p or n % q:
        raise ChainError(f"Monarch needs p | m and q | n, got m={m}, p={p}, n={n}, q={q}")
    return chain_from_blocks([p, m // p], [q, n // q], rank)


def dense_chain(m: int, n: int) -> Chain:
    """One dense factor (1, m, n, 1)."""
    return Chain([KSPattern(1, _check_dim("m", m), _check_dim("n", n), 1)])


def parse_chain(spec) -> Chain:
    """A Chain from a Chain, or a sequence of (a, b, c, d)."""
    if isinstance(spec, Chain):
        return spec
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__iter__"):
        raise InvalidInputError(f"expected a Chain or a list of (a, b, c, d) patterns, got {spec!r}")
    return Chain(spec)
