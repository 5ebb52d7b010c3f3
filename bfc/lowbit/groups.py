"""Group-wise low-bit weight formats (int2 / int3 / int4 / int8) for ``y = x @ W``, W (K, N).

Layout.  The K (input) rows of each column are cut into groups of ``g`` consecutive rows
(``g`` = 32 / 64 / 128, or ``None`` = the whole column); group ``G_j = [j*g, (j+1)*g)``
of column ``n`` has one scale ``s[j, n]`` (stored as fp16 or fp32) and, for asymmetric
formats, one integer zero point ``z[j, n]``.  A last, shorter group takes the rest when
g does not divide K.

* symmetric, b bits: levels ``q in [-2^(b-1), 2^(b-1) - 1]`` (all 2^b codes; int2 has
  {-2, -1, 0, 1}), ``w_hat = s * q``.  The scale is *signed*: the largest-magnitude entry
  v of a group maps to ``-2^(b-1)`` (``s = -alpha * v / 2^(b-1)``), so the extreme value
  is exact whatever its sign (the llama.cpp q4_0 convention).  Stored code
  ``u = q + 2^(b-1)``, i.e. an implicit zero point 2^(b-1) (MatMulNBits' default).
* asymmetric: codes ``u in [0, 2^b - 1]``, ``w_hat = s * (u - z)``, with the clipped range
  ``[alpha*min(w, 0), alpha*max(w, 0)]``, ``s = alpha*(max - min) / (2^b - 1)``,
  ``z = clip(rint(-alpha*min / s), 0, 2^b - 1)``.

Scale search (``method="search"``).  For a fixed scale s (and zero point) nearest
rounding of every entry is optimal, because the (activation-weighted) error of a group
``sum_k h_k (w_k - s q_k)^2`` is separable over entries (h = diag of the calibration Gram
X^T X, or ones).  So only s is searched, the low-bit analogue of bfc's optimal rank-one
scaling (``bfc.quant.rank_one``: x_hat = Q(lam x), then the exact least-squares
``mu = <x, x_hat> / ||x_hat||^2``): for every clipping ratio alpha of a grid,

    q_alpha = Q(w / s_alpha),   s'_alpha = <w, q_alpha>_h / <q_alpha, q_alpha>_h,

and both s_alpha and the refitted s'_alpha (cast to the storage dtype, then the codes
re-rounded with it) are scored exactly.  alpha = 1 without refit is absmax RTN, so the
search is never worse than RTN.  ``method="rtn"`` is plain absmax (alpha = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import ConfigError, InvalidInputError
from bfc.lowbit.packing import pack_bits, packed_nbytes, unpack_bits

DEFAULT_RATIOS = tuple(np.round(np.linspace(1.0, 0.40, 31), 4))
_SCALE_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


@dataclass(frozen=True)
class LowBitFormat:
    """bits in {2, 3, 4, 8}; group_size None = one group per column (whole K)."""
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"bits={self.bits!r}: allowed 2, 3, 4, 8")
        if self.group_size is not None and (not isinstance(self.group_size, (int, np.integer))
                                            or self.group_size < 1):
            raise ConfigError(f"group_size={self.group_size!r} must be a positive integer or None")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"scale_dtype={self.scale_dtype!r}: allowed {sorted(_SCALE_DTYPES)}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def dtype(self) -> np.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def group(self, k: int) -> int:
        return k if self.group_size is None else min(int(self.group_size), k)

    def bits_per_weight(self, k: int) -> float:
        """Storage bits per weight of a column of K entries (codes + scales + zero points)."""
        n_groups = -(-k // self.group(k))
        extra = self.dtype.itemsize * 8 + (0 if self.symmetric else self.bits)
        return self.bits + n_groups * extra / k


@dataclass(frozen=True)
class GroupQuantized:
    """Quantized W (K, N): ``values`` int8 levels q (symmetric) or uint8 codes u (asymmetric),
    ``scales`` (n_groups, N) in fp16/fp32, ``zero_points`` (n_groups, N) uint8 or None."""
    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def codes(self) -> np.ndarray:
        """Unsigned stored codes (K, N): ``q + 2^(b-1)`` when symmetric."""
        if self.symmetric:
            return (self.values.astype(np.int16) + (1 << (self.bits - 1))).astype(np.uint8)
        return self.values.astype(np.uint8)

    def zero_point_codes(self) -> np.ndarray:
        """Zero points (n_groups, N) as codes; 2^(b-1) everywhere when symmetric."""
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)
        return self.zero_points

    def dequantize(self) -> np.ndarray:
        """W_hat (K, N) in float64 (exact: stored scale times a small integer)."""
        k = self.values.shape[0]
        rows = np.arange(k) // self.group_size
        s = self.scales.astype(np.float64)[rows]
        q = self.values.astype(np.float64)
        if not self.symmetric:
            q = q - self.zero_points.astype(np.float64)[rows]
        return s * q

    @property
    def nbytes(self) -> int:
        """Packed codes + scales + packed zero points; a last, shorter group is stored padded to
        ``group_size`` rows (as MatMulNBits and bfc's graphs store it)."""
        _k, n = self.shape
        zp = 0 if self.zero_points is None else packed_nbytes(self.zero_points.size, self.bits)
        return packed_nbytes(self.n_groups * self.group_size * n, self.bits) + self.scales.nbytes + zp

    def pack(self) -> PackedGroups:
        """Bit-packed storage: codes in column-major order (each column's K codes contiguous)."""
        zp = None if self.zero_points is None else pack_bits(self.zero_points.T, self.bits)
        return PackedGroups(pack_bits(self.codes().T, self.bits), self.scales.copy(), zp,
                            self.shape, self.bits, self.group_size, self.symmetric)


@dataclass(frozen=True)
class PackedGroups:
    codes: np.ndarray             # uint8 stream of the (N, K) codes
    scales: np.ndarray
    zero_points: np.ndarray | None  # uint8 stream of the (N, n_groups) zero points
    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)

    def unpack(self) -> GroupQuantized:
        k, n = self.shape
        u = unpack_bits(self.codes, self.bits, k * n).reshape(n, k).T
        zp = None
        if self.zero_points is not None:
            g = self.scales.shape[0]
            zp = np.ascontiguousarray(unpack_bits(self.zero_points, self.bits, g * n).reshape(n, g).T)
        vals = (u.astype(np.int16) - (1 << (self.bits - 1))).astype(np.int8) if self.symmetric else u
        return GroupQuantized(np.ascontiguousarray(vals), self.scales.copy(), zp, self.bits,
                              self.group_size, self.symmetric)


# ---- scales ---------------------------------------------------------------------------
def round_codes(w, s, z, fmt: LowBitFormat) -> np.ndarray:
    """Nearest level for every entry: ``clip(rint(w / s) + z)`` (s == 0 gives level z)."""
    w = np.asarray(w, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    safe = np.where(s == 0, 1.0, s)
    q = np.rint(w / safe) + (0 if z is None else z)
    q = np.where(s == 0, 0 if z is None else z, q)
    return np.clip(q, fmt.qmin, fmt.qmax)


def _dequant(q, s, z):
    return s * (q - (0 if z is None else z))


def _candidate(w, alpha, fmt: LowBitFormat):
    """Scale and zero point for clipping ratio alpha; w is (..., g, N), result (..., 1, N)."""
    if fmt.symmetric:
        idx = np.argmax(np.abs(w), axis=-2)[..., None, :]
        v = np.take_along_axis(w, idx, axis=-2)
        s = (-alpha * v / (1 << (fmt.bits - 1))).astype(fmt.dtype).astype(np.float64)
        return s, None
    mn = np.minimum(w.min(axis=-2, keepdims=True), 0.0)
    mx = np.maximum(w.max(axis=-2, keepdims=True), 0.0)
    s = (alpha * (mx - mn) / fmt.qmax).astype(fmt.dtype).astype(np.float64)
    z = np.clip(np.rint(-alpha * mn / np.where(s == 0, 1.0, s)), 0, fmt.qmax)
    return s, z


def fit_scales(w, fmt: LowBitFormat, h=None, method: str = "search", ratios=DEFAULT_RATIOS):
    """Scales (and zero points) for blocks ``w`` of shape (..., g, N), each (g-row, column)
    slice one group; ``h`` (..., g, 1) non-negative error weights (default ones).

    Returns ``(s, z)`` of shape (..., 1, N) in float64 (s already rounded to the storage
    dtype; z None when symmetric).  See the module docstring for the search.
    """
    w = np.asarray(w, dtype=np.float64)
    h = np.ones(w.shape[:-1] + (1,)) if h is None else np.asarray(h, dtype=np.float64)
    if method not in ("search", "rtn"):
        raise ConfigError(f"method={method!r}: allowed 'search', 'rtn'")
    best_s, best_z = _candidate(w, 1.0, fmt)
    if method == "rtn":
        return best_s, best_z

    def err(s, z):
        q = round_codes(w, s, z, fmt)
        return (h * (w - _dequant(q, s, z)) ** 2).sum(axis=-2, keepdims=True), q

    best_e, _ = err(best_s, best_z)
    for alpha in ratios:
        s, z = _candidate(w, float(alpha), fmt)
        e, q = err(s, z)
        qz = q - (0 if z is None else z)
        den = (h * qz * qz).sum(axis=-2, keepdims=True)
        s2 = np.where(den > 0, (h * w * qz).sum(axis=-2, keepdims=True) / np.where(den > 0, den, 1), s)
        s2 = s2.astype(fmt.dtype).astype(np.float64)
        e2, _ = err(s2, z)
        for cs, ce in ((s, e), (s2, e2)):
            better = ce < best_e * (1 - 1e-12)
            best_e = np.where(better, ce, best_e)
            best_s = np.where(better, cs, best_s)
            if z is not None:
                best_z = np.where(better, z, best_z)
    return best_s, best_z


# ---- whole matrices -------------------------------------------------------------------
def _blocks(w: np.ndarray, g: int) -> np.ndarray:
    """(K, N) -> (n_groups, g, N), zero-padding the last group."""
    k, n = w.shape
    pad = (-k) % g
    return np.concatenate([w, np.zeros((pad, n))]).reshape(-1, g, n)


def quantize_groups(w, fmt: LowBitFormat | None = None, h=None, method: str = "search",
                    ratios=DEFAULT_RATIOS, **fmt_kwargs) -> GroupQuantized:
    """Group-wise quantization of W (K, N) (RTN with searched or absmax scales).

    ``h`` (K,) are the per-row error weights of the search, typically ``diag(X^T X)``
    (activation-weighted error ``sum_k h_k (W - W_hat)_kn^2``); default ones.
    ``fmt_kwargs`` (bits, group_size, symmetric, scale_dtype) build the format when
    ``fmt`` is None.
    """
    fmt = fmt or LowBitFormat(**fmt_kwargs)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or not np.isfinite(w).all():
        raise InvalidInputError(f"expected a finite 2-D weight (K, N), got shape {w.shape}")
    k, n = w.shape
    g = fmt.group(k)
    hk = np.ones(k) if h is None else np.asarray(h, dtype=np.float64).reshape(-1)
    if hk.shape != (k,) or (hk < 0).any():
        raise InvalidInputError(f"error weights must be {k} non-negative numbers, got shape {hk.shape}")
    wb = _blocks(w, g)
    hb = np.concatenate([hk, np.zeros((-k) % g)]).reshape(-1, g, 1)
    s, z = fit_scales(wb, fmt, hb, method, ratios)
    q = round_codes(wb, s, z, fmt).reshape(-1, n)[:k]
    return GroupQuantized(
        values=q.astype(np.int8 if fmt.symmetric else np.uint8),
        scales=s[:, 0, :].astype(fmt.dtype),
        zero_points=None if z is None else z[:, 0, :].astype(np.uint8),
        bits=fmt.bits, group_size=g, symmetric=fmt.symmetric)


