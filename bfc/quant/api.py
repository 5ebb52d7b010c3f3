"""``quantize(factorization, fmt, method=...)`` and the quantized result types."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import ConfigError, InvalidInputError
from bfc.factorize.result import KSFactorization
from bfc.ks import Chain
from bfc.quant.chain import Method, quantize_chain, round_grid
from bfc.quant.formats import Format, get_format
from bfc.quant.rounding import Rounding, get_rounding, to_storage
from bfc.quant.scales import Granularity, get_granularity


@dataclass(frozen=True)
class QuantizedFactor:
    values: np.ndarray   # stored dtype, canonical (a, d, b, c) layout
    scale: np.ndarray    # float32, 4-D, size 1 along axis 2 (b)

    def dequantize(self) -> np.ndarray:
        return self.values.astype(np.float64) * self.scale.astype(np.float64)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scale.nbytes)


@dataclass(frozen=True)
class QuantizedFactorization:
    """A quantized KS factorization.  ``low_rank`` (if any) is kept as float32, unquantized."""
    chain: Chain
    factors: tuple[QuantizedFactor, ...]
    row_perm: np.ndarray | None
    col_perm: np.ndarray | None
    low_rank: tuple[np.ndarray, np.ndarray] | None
    fmt: str
    method: str
    rel_error: float

    def _as_ks(self) -> KSFactorization:
        lr = None if self.low_rank is None else tuple(np.asarray(m, np.float64) for m in self.low_rank)
        return KSFactorization(self.chain, tuple(f.dequantize() for f in self.factors),
                               self.row_perm, self.col_perm, lr)

    def to_dense(self) -> np.ndarray:
        return self._as_ks().to_dense()

    def apply(self, x) -> np.ndarray:
        return self._as_ks().apply(np.asarray(x, dtype=np.float64))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.low_rank is None else sum(int(m.nbytes) for m in self.low_rank)
        return sum(f.nbytes for f in self.factors) + extra


def _get_method(method) -> Method:
    if isinstance(method, Method):
        return method
    try:
        return Method(method)
    except ValueError:
        raise ConfigError(f"unknown quantization method {method!r}; allowed: "
                          f"{[m.value for m in Method]}") from None


_DEFAULT_GRAN = {True: Granularity.FACTOR, False: Granularity.CHANNEL}    # by fmt.is_float


def _product_error(chain, ref, deq):
    """||K_1...K_L - K^_1...K^_L||_F (dense, fp64)."""
    return float(np.linalg.norm(ref - chain.to_dense(deq)))


def quantize(factorization: KSFactorization, fmt, method="auto", rounding="nearest", seed=None,
             granularity=None) -> QuantizedFactorization:
    """Quantize every KS factor of ``factorization`` to ``fmt``.

    fmt: "int8" | "fp8-e4m3" | "fp8-e5m2" | "fp16" | "bf16".
    method: "rtn" | "pairwise" | "l2r" | "balanced" | "auto" (the smallest measured
    product error among them; the winner is recorded in ``.method``).
    rounding: "nearest" (ties to even) or "stochastic" (``seed``; only with "rtn").
    granularity: scale groups "factor" | "block" | "channel"; default "channel" for
    int8 and "factor" for floats (power-of-two scales).
    """
    f: Format = get_format(fmt)
    m = _get_method(method)
    r = get_rounding(rounding)
    gran = _DEFAULT_GRAN[f.is_float] if granularity is None else get_granularity(granularity)
    if r is Rounding.STOCHASTIC and m is not Method.RTN:
        raise ConfigError(f"rounding='stochastic' is only defined with method='rtn' (got "
                          f"method={m.value!r}); the optimal searches pick deterministic points")
    if not isinstance(factorization, KSFactorization):
        raise InvalidInputError(f"quantize expects a KSFactorization, got {type(factorization).__name__}")
    chain = factorization.chain
    values = [np.asarray(v) for v in chain.check_values(factorization.factors)]
    for l, v in enumerate(values):
        if np.iscomplexobj(v):
            raise InvalidInputError(f"factor {l} is complex; bfc.quant handles real factors only")
        if not np.all(np.isfinite(v)):
            raise InvalidInputError(f"factor {l} contains NaN or inf; fix the factorization first")
    values = [v.astype(np.float64) for v in values]
    ref = chain.to_dense(values)
    rng = np.random.default_rng(seed)

    candidates = ([Method.RTN, Method.PAIRWISE, Method.L2R, Method.BALANCED] if m is Method.AUTO
                  else [m])
    if m is Method.AUTO and not f.is_float:
        candidates = [Method.RTN, Method.L2R]          # every non-RTN int8 order is the same
    best = None
    for cand in candidates:
        qs = quantize_chain(f, values, cand, gran, r, rng)
        deq = [q * s.astype(np.float64) for q, s in qs]
        err = _product_error(chain, ref, deq)
        if best is None or err < best[0]:
            best = (err, cand, qs)
    _, used, qs = best
    factors = tuple(QuantizedFactor(to_storage(f, round_grid(f, q)), np.asarray(s, np.float32))
                    for q, s in qs)
    low_rank = None
    if factorization.low_rank is not None:
        low_rank = tuple(np.asarray(mat, dtype=np.float32) for mat in factorization.low_rank)
    out = QuantizedFactorization(chain, factors, factorization.row_perm, factorization.col_perm,
                                 low_rank, f.name, used.value, float("nan"))
    if low_rank is None:         # permutations only reorder entries: the product error is it
        err, nrm = best[0], float(np.linalg.norm(ref))
    else:
        w_src = factorization.to_dense()
        nrm = float(np.linalg.norm(w_src))
        err = float(np.linalg.norm(w_src - out.to_dense()))
    object.__setattr__(out, "rel_error", err / nrm if nrm > 0 else err)
    return out
