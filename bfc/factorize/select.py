"""Structure choice: named chains for a shape, and the cheapest chain meeting an error budget."""
from __future__ import annotations

import numpy as np

from bfc.errors import ConfigError
from bfc.factorize.core import factorize
from bfc.factorize.result import KSFactorization
from bfc.ks import Chain, chainable_chain, monarch_chain, prime_factors

STRUCTURES = ("monarch", "butterfly", "chain3")


def chain_for(structure: str, m: int, n: int, rank: int = 1) -> Chain:
    """The chain a structure name stands for at shape m x n.

    ``monarch``: 2 factors with near-square blocks; ``chain3``: 3 factors;
    ``butterfly``: as many factors as the longer prime factorization (the square-dyadic
    butterfly for powers of two).  ``rank`` is the block rank between factors.
    """
    if structure == "monarch":
        return monarch_chain(m, n, rank=rank)
    if structure == "chain3":
        return chainable_chain(m, n, rank=rank, n_factors=3)
    if structure == "butterfly":
        n_factors = max(len(prime_factors(m)), len(prime_factors(n)), 2)
        return chainable_chain(m, n, rank=rank, n_factors=n_factors)
    raise ConfigError(f"structure={structure!r} is not one of {STRUCTURES}")


def candidates(m: int, n: int, structures=STRUCTURES, ranks=(1, 2, 4, 8, 16),
               residual_ranks=(0,)) -> list[tuple[int, str, int, int, Chain]]:
    """(params, structure, rank, residual rank, chain) sorted by parameter count, cheaper than dense."""
    out, seen = [], set()
    for s in structures:
        for r in ranks:
            try:
                ch = chain_for(s, m, n, r)
            except Exception:  # noqa: BLE001 - rank too large for the shape: not a candidate
                continue
            for k in residual_ranks:
                params = ch.nnz + k * (m + n)
                key = (tuple(ch.patterns), k)
                if params < m * n and key not in seen:
                    seen.add(key)
                    out.append((params, s, r, k, ch))
    return sorted(out, key=lambda t: (t[0], t[1], t[2], t[3]))


def cheapest(w, max_error: float, *, structures=STRUCTURES, ranks=(1, 2, 4, 8, 16),
             residual_ranks=(0,), calibration=None, order: str = "balanced") -> KSFactorization | None:
    """The cheapest (fewest parameters) factorization with relative error <= max_error.

    The error is the weight error, or with ``calibration`` the output error
    ||X (W - W_hat)|| / ||X W||.  Returns None when no candidate cheaper than dense meets it.
    """
    if not (isinstance(max_error, (int, float)) and 0 < max_error):
        raise ConfigError(f"max_error={max_error!r} must be a positive number")
    w = np.asarray(w)
    for params, s, r, k, ch in candidates(w.shape[0], w.shape[1], structures, ranks, residual_ranks):
        f = factorize(w, ch, order=order, calibration=calibration, residual_rank=k)
        err = f.info.get("output_error", f.rel_error)
        if err <= max_error:
            f.info.update(structure=s, rank=r, residual_rank=k)
            return f
    return None
