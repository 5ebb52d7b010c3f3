"""``quantize(factorization, fmt, method=...)``, ``cast(factorization, fmt)`` and the quantized layer type.

``QuantizedFactorization`` is bfc's one quantized-layer type: the planner scores it,
every graph target emits it, and reconstruction / distillation refine it.  Algebra:

    W_hat = P_row^T (S_1 * Q_1) ... (S_L * Q_L) P_col + U V^T,      y = x @ W_hat

with Q_l the stored values (canonical (a, d, b, c) layout), S_l float32 scales
broadcastable to them (dims 1 or full, 1 on axis 2), P the permutations and U V^T an
optional float32 low-rank residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import ConfigError, InvalidInputError
from bfc.factorize.calibrated import weighted_error
from bfc.factorize.result import KSFactorization, chain_column_chunks
from bfc.ks import Chain
from bfc.quant.chain import Method, quantize_chain, round_grid
from bfc.quant.formats import FP32, Format, get_format, packed_nbytes
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
        """In-memory bytes (an int4 factor is held as int8: see ``QuantizedFactorization.nbytes``)."""
        return int(self.values.nbytes + self.scale.nbytes)

    def stored_nbytes(self, fmt: Format) -> int:
        """Bytes as stored in ``fmt``: sub-byte values packed (int4: ceil(size / 2)), float32 scales."""
        return int(packed_nbytes(fmt, self.values.size) + self.scale.nbytes)


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

    def dequantized(self) -> KSFactorization:
        """The same layer with float64 factors S_l * Q_l (what every target computes in float)."""
        lr = None if self.low_rank is None else tuple(np.asarray(m, np.float64) for m in self.low_rank)
        return KSFactorization(self.chain, tuple(f.dequantize() for f in self.factors),
                               self.row_perm, self.col_perm, lr)

    def to_dense(self, chunk: int | None = None) -> np.ndarray:
        return self.dequantized().to_dense(chunk)

    def apply(self, x) -> np.ndarray:
        """``x @ W_hat`` (float64) for x of shape (..., M), without forming W_hat."""
        return self.dequantized().apply(np.asarray(x, dtype=np.float64))

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def values(self) -> tuple[np.ndarray, ...]:
        return tuple(f.values for f in self.factors)

    @property
    def scales(self) -> tuple[np.ndarray, ...]:
        return tuple(f.scale for f in self.factors)

    @property
    def n_params(self) -> int:
        k = 0 if self.low_rank is None else self.low_rank[0].size + self.low_rank[1].size
        return self.chain.nnz + k

    @property
    def nbytes(self) -> int:
        """Stored bytes: values (int4 packed two per byte), float32 scales, float32 residual,
        permutations as int64."""
        fmt = self.format
        n = sum(f.stored_nbytes(fmt) for f in self.factors)
        n += 0 if self.low_rank is None else 4 * (self.low_rank[0].size + self.low_rank[1].size)
        return int(n + sum(8 * p.size for p in (self.row_perm, self.col_perm) if p is not None))

    @property
    def resident_nbytes(self) -> int:
        """Bytes a session keeps: the stored values (the standard-op targets dequantize them per run; the
        custom op reads them directly)."""
        return self.nbytes

    @property
    def flops_per_row(self) -> int:
        """Multiply-adds (x2) per input row: the chain's nonzeros plus the residual's k (M + N)."""
        m, n = self.chain.shape
        k = 0 if self.low_rank is None else self.low_rank[0].shape[1]
        return 2 * (self.chain.nnz + k * (m + n))


def _get_method(method) -> Method:
    if isinstance(method, Method):
        return method
    try:
        return Method(method)
    except ValueError:
        raise ConfigError(f"unknown quantization method {method!r}; allowed: "
                          f"{[m.value for m in Method]}") from None


_DEFAULT_GRAN = {True: Granularity.FACTOR, False: Granularity.CHANNEL}    # by fmt.is_float


def _product_errors(chain, ref, deqs) -> tuple[list[float], float]:
    """([||K_1...K_L - K^_1...K^_L||_F for each factor list in ``deqs``], ||K_1...K_L||_F) in fp64,
    for the factor values ``ref``: one pass over column chunks of the products (each reference
    chunk formed once; no dense M x N temporary)."""
    sums = [0.0] * len(deqs)
    norm = 0.0
    for parts in zip(chain_column_chunks(chain, ref), *(chain_column_chunks(chain, d) for d in deqs)):
        a = parts[0][2]
        norm += float(np.vdot(a, a))
        for i, (_, _, b) in enumerate(parts[1:]):
            d = a - b
            sums[i] += float(np.vdot(d, d))
    return [float(np.sqrt(t)) for t in sums], float(np.sqrt(norm))


def cast(factorization: KSFactorization, fmt="fp32") -> QuantizedFactorization:
    """Store the factors in a float format as they are (unit scales, no scale search): fp32 or fp16."""
    f: Format = get_format(fmt)
    if f.name not in ("fp32", "fp16"):
        raise ConfigError(f"cast stores fp32 or fp16 factors, got {f.name!r}; use quantize() for {f.name}")
    factors = tuple(QuantizedFactor(np.asarray(v).astype(f.dtype), np.ones((1, 1, 1, 1), np.float32))
                    for v in factorization.factors)
    low = None if factorization.low_rank is None else tuple(np.asarray(m, np.float32)
                                                          for m in factorization.low_rank)
    return QuantizedFactorization(factorization.chain, factors, factorization.row_perm, factorization.col_perm,
                                  low, f.name, "cast", float("nan"))     # rel_error: not measured


def quantize(factorization: KSFactorization, fmt, method="auto", rounding="nearest", seed=None,
             granularity=None) -> QuantizedFactorization:
    """Quantize every KS factor of ``factorization`` to ``fmt``.

    fmt: "int8" | "int4" | "fp8-e4m3" | "fp8-e5m2" | "fp16" | "bf16" (int4: symmetric [-7, 7],
    held as int8 in memory, stored packed; the same scale searches as int8 with qmax 7).
    method: "rtn" | "pairwise" | "l2r" | "balanced" | "auto" (the smallest measured
    product error among them; the winner is recorded in ``.method``).
    rounding: "nearest" (ties to even) or "stochastic" (``seed``; only with "rtn").
    granularity: scale groups "factor" | "block" | "channel"; default "channel" for
    int8/int4 and "factor" for floats (power-of-two scales).
    """
    f: Format = get_format(fmt)
    if f is FP32:
        return cast(factorization, f)
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
    rng = np.random.default_rng(seed)

    candidates = ([Method.RTN, Method.PAIRWISE, Method.L2R, Method.BALANCED] if m is Method.AUTO
                  else [m])
    if m is Method.AUTO and not f.is_float:
        candidates = [Method.RTN, Method.L2R]          # every non-RTN int8 order is the same
    if len(values) == 2 and Method.PAIRWISE in candidates:
        # two factors: pairwise, l2r and balanced are the same joint solve (Alg. 7.1 on
        # (K_1, K_2)); the first of them wins ties anyway, so solve it once
        candidates = [c for c in candidates if c not in (Method.L2R, Method.BALANCED)]
    found = [quantize_chain(f, values, cand, gran, r, rng) for cand in candidates]
    errs, nrm = _product_errors(chain, values, [[q * s.astype(np.float64) for q, s in qs] for qs in found])
    best = min(range(len(candidates)), key=lambda i: errs[i])      # the first of equal errors
    used, qs = candidates[best], found[best]
    factors = tuple(QuantizedFactor(to_storage(f, round_grid(f, q)), np.asarray(s, np.float32))
                    for q, s in qs)
    low_rank = None
    if factorization.low_rank is not None:
        low_rank = tuple(np.asarray(mat, dtype=np.float32) for mat in factorization.low_rank)
    out = QuantizedFactorization(chain, factors, factorization.row_perm, factorization.col_perm,
                                 low_rank, f.name, used.value, float("nan"))
    if low_rank is None:         # permutations only reorder entries: the product error is it
        rel = errs[best] / nrm if nrm > 0 else errs[best]
    else:
        rel = weighted_error(factorization.to_dense(4096), out.dequantized().iter_columns(), None)
    object.__setattr__(out, "rel_error", rel)
    return out
