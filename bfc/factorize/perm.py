"""Permutations for butterfly factorization.

Since ||W - B P|| = ||W P^T - B|| for a permutation P, bfc factorizes ``W[:, perm]``
(``perm`` = column indices) and records ``perm`` in the result.  The DFT needs the
bit-reversal permutation; ``candidate_perms`` is the small set tried by ``perm="search"``.
"""
from __future__ import annotations

import numpy as np

from bfc.errors import InvalidInputError


def bitrev_perm(n: int) -> np.ndarray:
    """Bit-reversal permutation of range(n), n a power of two (an involution)."""
    if n < 1 or n & (n - 1):
        raise InvalidInputError(f"bit-reversal needs a power-of-two size, got {n}")
    bits = n.bit_length() - 1
    idx = np.arange(n)
    out = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        out |= ((idx >> b) & 1) << (bits - 1 - b)
    return out


def stride_perm(n: int, stride: int) -> np.ndarray:
    """Perfect-shuffle style permutation: read range(n) as (n/stride, stride) column-major."""
    if n % stride:
        raise InvalidInputError(f"stride {stride} does not divide {n}")
    return np.arange(n).reshape(n // stride, stride).T.reshape(-1)


def candidate_perms(n: int) -> list[tuple[str, np.ndarray | None]]:
    """Identity, bit-reversal (powers of two) and the stride permutations of small primes."""
    out: list[tuple[str, np.ndarray | None]] = [("identity", None)]
    if n >= 4 and not n & (n - 1):
        out.append(("bitrev", bitrev_perm(n)))
    for s in (2, 3, 4):
        if n % s == 0 and n // s > 1:
            out.append((f"stride{s}", stride_perm(n, s)))
    return out


def check_perm(perm, n: int, what: str) -> np.ndarray:
    perm = np.asarray(perm)
    if perm.shape != (n,) or not np.issubdtype(perm.dtype, np.integer) \
            or not np.array_equal(np.sort(perm), np.arange(n)):
        raise InvalidInputError(f"{what} must be a permutation of range({n}), got an array of "
                                f"shape {perm.shape} and dtype {perm.dtype}")
    return perm.astype(np.int64)
