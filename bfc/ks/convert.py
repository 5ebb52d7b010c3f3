"""Converters between bfc's canonical layout and pyfaust / lazylinop (optional packages).

- lazylinop ``ks_values`` are ``(a, b, c, d)``: ``canonical = ks.transpose(0, 3, 1, 2)``.
- pyfaust ``Faust`` objects hold each factor as a dense or scipy sparse matrix; their
  pattern is recovered from the support (``pattern_of``) unless a chain is given.
Both libraries list factors left to right, as bfc does.
"""
from __future__ import annotations

import numpy as np

from bfc.errors import ChainError, InvalidInputError
from bfc.ks.chain import Chain
from bfc.ks.pattern import KSPattern


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise InvalidInputError(f"this converter needs the optional package {module!r}: "
                                f"pip install {module.split('.')[0]}") from None


def to_lazylinop_values(values) -> list[np.ndarray]:
    return [np.ascontiguousarray(np.asarray(v).transpose(0, 2, 3, 1)) for v in values]


def from_lazylinop_values(ks_values) -> tuple[Chain, list[np.ndarray]]:
    vals = [np.asarray(v) for v in (ks_values if isinstance(ks_values, (list, tuple)) else [ks_values])]
    chain = Chain([KSPattern(*v.shape) for v in vals])
    return chain, [np.ascontiguousarray(v.transpose(0, 3, 1, 2)) for v in vals]


def to_lazylinop(chain: Chain, values):
    """A lazylinop ``ksm`` operator for K_1 ... K_L."""
    ksm = _require("lazylinop.butterfly").ksm
    return ksm(to_lazylinop_values(chain.check_values(values)))


def from_lazylinop(op) -> tuple[Chain, list[np.ndarray]]:
    """Chain and canonical values of a lazylinop ``ksm``/``ksd`` operator."""
    if not hasattr(op, "ks_values"):
        raise InvalidInputError("expected a lazylinop KsmLazyLinOp (from ksm or ksd) with .ks_values")
    return from_lazylinop_values(op.ks_values)


def pattern_of(matrix) -> KSPattern:
    """Smallest KS pattern whose support holds every nonzero of ``matrix``."""
    m = np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix)
    rows, cols = m.shape
    nz = m != 0
    best = None
    for a in range(1, rows + 1):
        if rows % a or cols % a:
            continue
        for d in range(1, rows // a + 1):
            if (rows // a) % d or (cols // a) % d:
                continue
            p = KSPattern(a, rows // (a * d), cols // (a * d), d)
            if (best is None or p.nnz < best.nnz) and not (nz & ~p.support()).any():
                best = p
    return best


def to_faust(chain: Chain, values):
    """A pyfaust ``Faust`` whose factors are scipy CSR matrices of the KS factors."""
    pyfaust = _require("pyfaust")
    from scipy.sparse import csr_matrix
    factors = [csr_matrix(p.to_dense(v)) for p, v in zip(chain, chain.check_values(values))]
    return pyfaust.Faust(factors)


def from_faust(faust, chain: Chain | None = None) -> tuple[Chain, list[np.ndarray]]:
    """Chain and canonical values of a ``Faust`` (patterns inferred from supports if not given)."""
    n = faust.numfactors()
    dense = [faust.factors(i) for i in range(n)]
    dense = [np.asarray(f.toarray() if hasattr(f, "toarray") else f) for f in dense]
    if chain is None:
        chain = Chain([pattern_of(f) for f in dense])
    elif len(chain) != n:
        raise ChainError(f"chain {chain} has {len(chain)} factors but the Faust has {n}")
    return chain, [p.from_dense(f) for p, f in zip(chain, dense)]
