"""Quantized embedding tables: the form a ``Gather(table, indices)`` table takes (rows of int8, int4 or int2
codes with block scales), its exact runtime function, and the quantizer that chooses it.

Form (``QuantizedEmbedding``), for a table T of shape (V, D), ``bits`` b in {8, 4, 2}, ``block_size`` B
dividing D and a multiple of k = 8 / b (``n_blocks`` = D / B blocks per row; B = D is one scale per row):

  codes        uint8 (V, D / k), k levels per byte, least significant bits first (``pack_levels``):
               element k*j + i of a row in bits [b*i, b*(i+1)) of byte j.  b = 8: one level u in [0, 255]
               per byte; b = 4: element 2j in the low nibble, 2j+1 in the high one (``pack_nibbles``);
               b = 2: byte j = u[4j] | u[4j+1] << 2 | u[4j+2] << 4 | u[4j+3] << 6.  This is the layout
               of onnxruntime's GatherBlockQuantized on uint8 data (probed at 4 and 2 bits, see
               ``bfc.passes.embedding_emit``).
  scales       (V, n_blocks), float16 or float32; a scale may be negative (see the quantizer).
  zero_points  None (symmetric): the implicit zero level z = 2^(b-1) (128, 8, 2), which is
               GatherBlockQuantized's default for uint8 data, so no tensor is stored; or uint8
               (V, n_blocks) with values in [0, 2^b - 1] (asymmetric; stored packed like the codes,
               (V, ceil(n_blocks / k)) zero-padded, ``zero_points_packed``).

Function (``dequantized``), for row r, column c in block k = c // B:
  y[r, c] = round_S( float32(u[r, c] - z[r, k]) * float32(s[r, k]) )
where S is the scale type: with float32 scales the float32 product (one rounding), with float16 scales
that product rounded once to float16 (it is exact in float32: at most 8 + 11 significant bits), which
is what GatherBlockQuantized outputs (its output type is the scales' type) and what the portable
emitter computes (``bfc.passes.embedding_emit``).  A graph of another float type casts that once.

Quantizer (``quantize_embedding``), per block x of B values, level range [lo, hi]:
  symmetric   lo = -2^(b-1), hi = 2^(b-1) - 1, z = 2^(b-1).  m = the block's signed extreme value
              (largest |x_i|, with its sign); candidate scales s_a = a * m / lo, so m maps to lo/a and
              every level is usable (a = 1: m -> lo exactly, the opposite extreme clips at hi by at
              most one step; a = -lo/hi: no clipping, the classic absmax/hi).  A negative s is fine:
              y = s q is a plain product.
  asymmetric  lo = 0, hi = 2^b - 1; [mn, mx] = [min(min x, 0), max(max x, 0)]; s_a = a (mx - mn) / hi,
              z = clip(rint(-mn / s_a'), 0, hi) with s_a' the stored scale.
  For every candidate: s' = s_a rounded to the scale type, q = clip(rint(x / s') + z, lo + z, hi + z),
  e_a = ||x - s' (q - z)||^2 (float64); the block keeps argmin_a e_a (the first on ties, a = 1 first).
  ``search=False`` keeps a = 1 only; ``search=True`` adds a in {-lo/hi} U linspace(1, 0.6, 17) (4 bits)
  or linspace(1, 0.9, 6) (8 bits: clipping never pays there).  2 bits (levels {-2, -1, 0, 1} s):
  symmetric a in +-linspace(1.2, 0.5, 15) (a = 1 first; a < 0 flips the level set to {2, 1, 0, -1} |s|
  around the extreme, which puts it on the one-level side: worth +0.1 dB for no bytes), asymmetric a in
  linspace(1, 0.45, 12).  The grid comes from the winners of a grid of step 0.025 over +-[0.3, 2] on
  4096 rows of MiniLM's table: 98% of the blocks pick |a| in [0.475, 1.2] (the median falls from 0.875
  at B = 32 to 0.675 at B = 384: s at 0.45-0.6 of the extreme); step 0.025 instead of 0.05 gains
  < 0.01 dB, and a = -lo/hi = 2 (no clipping) never wins.  A zero block stores s = 0, q = z.
  A float16 scale that would underflow to 0 for a non-zero block becomes +-2^-24; one above 65504
  raises (use float32 scales).
Rows are independent: the quantizer works ``chunk_rows`` rows at a time (its temporaries scale with
the chunk, not V), and the result holds only the codes and scales.

Measured on MiniLM's word embedding (30522 x 384, bert.embeddings.word_embeddings.weight), SQNR =
-20 log10(error) with float16 scales (quantizer time on one core in brackets, search on):
  bits B     symmetric a=1   symmetric + search   asymmetric a=1   asymmetric + search   MB (sym / asym)
  8    384   42.8 dB         42.9 (0.5 s)         43.4             43.4                  11.78 / 11.81
  8    32    45.5            45.9                 46.5             46.5                  12.45 / 12.82
  4    384   18.7            19.7 (1.2 s)         18.8             19.4                   5.92 / 5.95
  4    32    21.3            21.7                 21.9             22.1 (1.7 s)           6.59 / 6.78
  2    384    6.6             8.5 (2.3 s)          4.9              7.9 (1.2 s)            2.99 / 3.02
  2    128    7.5             8.8                  6.0              8.2                    3.11 / 3.14
  2    64     8.1             9.1                  6.8              8.6                    3.30 / 3.36
  2    32     8.8             9.6 (2.7 s)          7.8              9.2 (1.6 s)            3.66 / 3.75
(rows of N(0, 1) values give the same figures within 0.1 dB).  Asymmetric costs one zero-point byte
(8 bits), nibble (4 bits) or 2 bits (2 bits) per block.  At 2 bits asymmetric loses: with 4 levels its
integer zero point only picks {-z, .., 3 - z} s, z in 0..3, i.e. the symmetric level set, its flip, or a
one-sided set, and its range-based scale (s = a (max - min) / 3) is a worse start than the signed
extreme; embedding rows are near-Gaussian and centered, so symmetric (both signs searched) is the default.
Even an asymmetric search over every z in 0..3 on the symmetric scale grid only ties the symmetric figure
(4096 rows of MiniLM, every B: the one-sided sets never win) while storing 2.5% more bytes at B = 32.

Bytes (``nbytes``, the file) and resident bytes (``resident_nbytes``, what onnxruntime 1.32 holds
after creating the session): both emitters read the stored initializers directly (no folded copies),
so resident = file bytes on every target.  Measured on MiniLM's table through ``bfc.passes.embedding_emit``
(float16 scales, search on; RSS after session creation minus that of a process holding a trivial
session, psutil, one subprocess per model; latency: indices 8 x 128, one thread):
  form                       target     file MB   resident MB   us/run   nodes
  fp32 Gather (original)     -          46.88     47.0          155      1
  int8 B=384 symmetric       ort        11.78     12.1          297      2
                             portable   11.78     12.0          359      7
  int8 B=32 symmetric        ort        12.45     13.4          407      2
                             portable   12.45     13.4          409      8
  int4 B=32 symmetric        ort         6.59      7.6          572      2
                             portable    6.59      7.5          698      12
  int4 B=32 asymmetric       ort         6.78      7.8          599      2
                             portable    6.78      7.9          906      17
  int4 B=384 symmetric       ort         5.92      6.2          490      2
                             portable    5.92      6.2          776      11
  int2 rows, measured later on a busier machine (same run: int4 B=32 symmetric ort 641 us, portable 689):
  int2 B=32 symmetric        ort         3.66      4.7          632      2
                             portable    3.66      4.6          920      14
  int2 B=64 symmetric        ort         3.30      3.9          611      2
                             portable    3.30      3.9          897      14
  int2 B=384 symmetric       ort         2.99      3.3          550      2
                             portable    2.99      3.3          874      13
(one run adds about 8 MB on every variant, fp32 included: thread pool and arena, not the table.)
The standard alternative DequantizeLinear(codes) -> Gather is NOT folded by onnxruntime at load (13.6 MB
after session creation for int8 B=32), but it dequantizes the whole table at every run (15 ms per run)
and the arena keeps the 47 MB float32 table after the first run (66 MB resident): bfc never emits it.
Casting float16 scales to float32 in the graph is folded at load and keeps both copies (+3.2 MB at
30522 x 24 scales): neither emitter does that (see ``bfc.passes.embedding_emit``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import ConfigError, InvalidInputError

BITS = (8, 4, 2)
SCALE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
FP16_TINY = float(2.0 ** -24)          # the smallest positive float16 (subnormal)
FP16_MAX = 65504.0


def per_byte(bits: int) -> int:
    """Levels stored per byte: 1 (8 bits), 2 (4 bits), 4 (2 bits)."""
    return 8 // bits


def pack_levels(u: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) levels in [0, 2^bits - 1], n a multiple of k = 8 / bits -> (..., n/k) uint8, LSB first:
    element k*j + i in bits [bits*i, bits*(i+1)) of byte j (onnxruntime's GatherBlockQuantized layout)."""
    u = np.asarray(u, np.uint8)
    k = per_byte(bits)
    if u.shape[-1] % k:
        raise InvalidInputError(f"packing {bits}-bit levels needs a last dimension divisible by {k}, "
                                f"got shape {u.shape}")
    if k == 1:
        return u.copy()
    p = np.zeros(u.shape[:-1] + (u.shape[-1] // k,), np.uint8)
    for i in range(k):
        p |= (u[..., i::k] << (bits * i)).astype(np.uint8)
    return p


def unpack_levels(p: np.ndarray, bits: int, n: int | None = None) -> np.ndarray:
    """Inverse of ``pack_levels``: (..., m) uint8 -> (..., k*m) levels (first ``n`` kept when given)."""
    p = np.asarray(p, np.uint8)
    k = per_byte(bits)
    if k == 1:
        return p if n is None else p[..., :n]
    mask = np.uint8((1 << bits) - 1)
    u = np.empty(p.shape[:-1] + (k * p.shape[-1],), np.uint8)
    for i in range(k):
        u[..., i::k] = (p >> np.uint8(bits * i)) & mask
    return u if n is None else u[..., :n]


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """(..., n) levels in [0, 15], n even -> (..., n/2) uint8: element 2j low nibble, 2j+1 high nibble."""
    u = np.asarray(u, np.uint8)
    if u.shape[-1] % 2:
        raise InvalidInputError(f"pack_nibbles needs an even last dimension, got shape {u.shape}")
    return pack_levels(u, 4)


def unpack_nibbles(p: np.ndarray, n: int | None = None) -> np.ndarray:
    """Inverse of ``pack_nibbles``: (..., m) uint8 -> (..., 2m) levels (first ``n`` kept when given)."""
    return unpack_levels(p, 4, n)


def _pack_padded(z: np.ndarray, bits: int) -> np.ndarray:
    k = per_byte(bits)
    pad = -z.shape[-1] % k
    if pad:
        z = np.concatenate([z, np.zeros(z.shape[:-1] + (pad,), np.uint8)], axis=-1)
    return pack_levels(z, bits)


@dataclass(frozen=True, eq=False)
class QuantizedEmbedding:
    """A (V, D) table as b-bit codes with block scales (see the module doc for layout and function).
    Compared and hashed by identity (it holds arrays), so a rewrite can key shared tensors by form."""
    shape: tuple[int, int]
    bits: int
    block_size: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None

    def __post_init__(self):
        v, d = (int(x) for x in self.shape)
        object.__setattr__(self, "shape", (v, d))
        _check_params(d, self.bits, self.block_size, self.scales.dtype if isinstance(self.scales, np.ndarray)
                      else None)
        nb = d // self.block_size
        want = (v, d // per_byte(self.bits))
        if not isinstance(self.codes, np.ndarray) or self.codes.dtype != np.uint8 or self.codes.shape != want:
            raise InvalidInputError(f"QuantizedEmbedding codes must be uint8 of shape {want} for a {v}x{d} "
                                    f"table at {self.bits} bits, got {getattr(self.codes, 'dtype', None)} "
                                    f"{getattr(self.codes, 'shape', None)}")
        if self.scales.shape != (v, nb):
            raise InvalidInputError(f"QuantizedEmbedding scales must have shape {(v, nb)} "
                                    f"(rows x blocks of {self.block_size}), got {self.scales.shape}")
        if self.zero_points is not None:
            z = self.zero_points
            if not isinstance(z, np.ndarray) or z.dtype != np.uint8 or z.shape != (v, nb):
                raise InvalidInputError(f"QuantizedEmbedding zero_points must be uint8 of shape {(v, nb)}, got "
                                        f"{getattr(z, 'dtype', None)} {getattr(z, 'shape', None)}")
            if int(z.max(initial=0)) >= 1 << self.bits:
                raise InvalidInputError(f"QuantizedEmbedding zero_points must be < {1 << self.bits} at "
                                        f"{self.bits} bits, got {int(z.max())}")

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.block_size

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def zero_level(self) -> int:
        """The implicit zero point of the symmetric form (GatherBlockQuantized's default for uint8 data)."""
        return 1 << (self.bits - 1)

    @property
    def scale_dtype(self) -> np.dtype:
        return self.scales.dtype

    @property
    def zero_points_packed(self) -> np.ndarray | None:
        """Zero points as stored: (V, n_blocks) at 8 bits, (V, ceil(n_blocks / 2)) nibbles at 4 bits,
        (V, ceil(n_blocks / 4)) at 2 bits (``pack_levels``, zero-padded)."""
        if self.zero_points is None or self.bits == 8:
            return self.zero_points
        return _pack_padded(self.zero_points, self.bits)

    def levels(self, rows=slice(None)) -> np.ndarray:
        """Stored levels u (uint8, (rows, D)), unpacked."""
        return unpack_levels(self.codes[rows], self.bits)

    def dequantized(self, dtype=np.float32, rows=slice(None)) -> np.ndarray:
        """The table the runtime computes (module doc), as ``dtype`` (a single cast of the result)."""
        u = self.levels(rows).astype(np.int16)
        s = self.scales[rows]
        z = np.int16(self.zero_level) if self.zero_points is None else \
            np.repeat(self.zero_points[rows].astype(np.int16), self.block_size, axis=-1)
        q = (u - z).astype(np.float32).reshape(u.shape[0], self.n_blocks, self.block_size)
        y = (q * s.astype(np.float32)[..., None]).reshape(u.shape)
        if s.dtype != np.float32:
            y = y.astype(s.dtype)
        return y.astype(dtype, copy=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes, scales, zero points packed as stored): the file size."""
        z = self.zero_points_packed
        return int(self.codes.nbytes + self.scales.nbytes + (0 if z is None else z.nbytes))

    @property
    def resident_nbytes(self) -> int:
        """Bytes onnxruntime keeps for this table after session creation.  Every target reads the stored
        initializers directly (GatherBlockQuantized on ort, Gather of codes and scales on portable; the
        custom-op target emits the ort form), so this equals ``nbytes``: measured within 0.4 MB (the
        per-session graph overhead) at 30522 x 384, see the module doc."""
        return self.nbytes

    @property
    def n_params(self) -> int:
        return int(self.shape[0] * self.shape[1])

    flops_per_row = 0                         # a lookup: no multiply-adds

    @property
    def label(self) -> str:
        per = "per row" if self.block_size == self.shape[1] else f"block {self.block_size}"
        return f"int{self.bits} rows {per}"

    def error(self, table, chunk_rows: int = 4096) -> float:
        """Relative Frobenius error ||T - deq||_F / ||T||_F (float64; 0 for an exact or all-zero table)."""
        t = np.asarray(table)
        if t.shape != self.shape:
            raise InvalidInputError(f"table shape {t.shape} does not match the quantized embedding {self.shape}")
        num = den = 0.0
        for r0 in range(0, self.shape[0], chunk_rows):
            rows = slice(r0, min(r0 + chunk_rows, self.shape[0]))
            x = t[rows].astype(np.float64)
            num += float(np.sum((x - self.dequantized(np.float64, rows)) ** 2))
            den += float(np.sum(x * x))
        return 0.0 if num == 0.0 else (float("inf") if den == 0.0 else float(np.sqrt(num / den)))

    def sqnr_db(self, table) -> float:
        """-20 log10(error): signal to quantization noise ratio in dB."""
        e = self.error(table)
        return float("inf") if e == 0.0 else float(-20.0 * np.log10(e))


def _check_params(d: int, bits, block_size, scale_dtype) -> None:
    if bits not in BITS:
        raise ConfigError(f"embedding bits must be one of {BITS}, got {bits!r}")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or not 1 <= block_size <= d \
            or d % block_size:
        raise ConfigError(f"embedding block_size must divide the row length {d} (e.g. 32, 64, 128 or {d}), "
                          f"got {block_size!r}")
    if block_size % per_byte(bits):
        k = per_byte(bits)
        need = "even" if k == 2 else f"a multiple of {k}"
        raise ConfigError(f"{bits}-bit embedding blocks pack {k} levels per byte: block_size must be {need}, "
                          f"got {block_size}")
    if scale_dtype is None or np.dtype(scale_dtype) not in SCALE_DTYPES:
        raise ConfigError(f"embedding scales must be float16 or float32, got {scale_dtype}")


def _alphas(bits: int, symmetric: bool, search: bool) -> np.ndarray:
    if not search:
        return np.array([1.0])
    if bits == 2:
        if symmetric:                                # both signs: the extreme on the two-level or the one-level side
            grid = np.linspace(1.2, 0.5, 15)
            return np.concatenate([[1.0], grid[grid != 1.0], -grid])
        return np.linspace(1.0, 0.45, 12)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    grid = np.linspace(1.0, 0.6, 17) if bits == 4 else np.linspace(1.0, 0.9, 6)
    extra = [-lo / hi] if symmetric else []
    return np.concatenate([grid[:1], extra, grid[1:]])


def _stored_scale(s: np.ndarray, nonzero: np.ndarray, sdt: np.dtype) -> np.ndarray:
    """s rounded to the scale type; non-zero blocks never get a zero scale."""
    if sdt == np.float16 and np.any(np.abs(s) > FP16_MAX):
        raise ConfigError(f"an embedding block needs a scale of {float(np.abs(s).max()):.4g}, above float16's "
                          f"{FP16_MAX}: use scale_dtype=float32")
    st = s.astype(sdt).astype(np.float64)
    tiny = FP16_TINY if sdt == np.float16 else float(np.finfo(np.float32).smallest_subnormal)
    fix = nonzero & (st == 0)
    if np.any(fix):
        st = np.where(fix, np.where(s < 0, -tiny, tiny), st)
    return st


def _quantize_chunk(x: np.ndarray, bits: int, bs: int, sdt: np.dtype, symmetric: bool, alphas):
    """x (r, D) float64 -> (levels u (r, D) uint8, scales (r, nb) float64 stored values, zero points or None)."""
    r, d = x.shape
    blk = x.reshape(r, d // bs, bs)
    if symmetric:
        lo, hi, zero = -(1 << (bits - 1)), (1 << (bits - 1)) - 1, 1 << (bits - 1)
        idx = np.abs(blk).argmax(axis=-1)[..., None]
        base = np.take_along_axis(blk, idx, axis=-1)[..., 0] / lo          # s_1 = m / lo
        nonzero = base != 0
    else:
        lo, hi = 0, (1 << bits) - 1
        mn = np.minimum(blk.min(axis=-1), 0.0)
        mx = np.maximum(blk.max(axis=-1), 0.0)
        base = (mx - mn) / hi
        nonzero = base != 0
    best_e = best_s = best_q = best_z = None
    for a in alphas:
        s = _stored_scale(base * a, nonzero, sdt)
        safe = np.where(s == 0, 1.0, s)
        if symmetric:
            z = None
            q = np.clip(np.rint(blk / safe[..., None]), lo, hi)
            e = np.sum((blk - q * s[..., None]) ** 2, axis=-1)
        else:
            z = np.clip(np.rint(-mn / safe), lo, hi)
            q = np.clip(np.rint(blk / safe[..., None]) + z[..., None], lo, hi)
            e = np.sum((blk - (q - z[..., None]) * s[..., None]) ** 2, axis=-1)
        if best_e is None:
            best_e, best_s, best_q, best_z = e, s, q, z
            continue
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s, best_s)
        best_q = np.where(better[..., None], q, best_q)
        if z is not None:
            best_z = np.where(better, z, best_z)
    if symmetric:
        u = (best_q + zero).astype(np.uint8)
        zp = None
    else:
        u = best_q.astype(np.uint8)
        zp = best_z.astype(np.uint8)
    return u.reshape(r, d), best_s, zp


def quantize_embedding(table, bits: int = 8, block_size: int | None = None, scale_dtype=np.float16, *,
                       symmetric: bool = True, search: bool = True, chunk_rows: int = 2048) -> QuantizedEmbedding:
    """Quantize a (V, D) float table to ``bits`` (8, 4 or 2) with one scale per ``block_size`` values of a
    row (default D: one per row), ``scale_dtype`` float16 or float32; symmetric (implicit zero level
    2^(b-1)) or asymmetric (a zero point per block).  Scales: per-block extreme, plus a small MSE search
    when ``search`` (module doc)."""
    t = np.asarray(table)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidInputError(f"an embedding table must be 2-D (rows x width), got shape {t.shape}")
    if not (np.issubdtype(t.dtype, np.floating) or t.dtype.name == "bfloat16"):
        raise InvalidInputError(f"an embedding table must hold floats, got {t.dtype}")
    v, d = t.shape
    block_size = d if block_size is None else block_size
    _check_params(d, bits, block_size, scale_dtype)
    sdt = np.dtype(scale_dtype)
    nb = d // block_size
    codes = np.empty((v, d // per_byte(bits)), np.uint8)
    scales = np.empty((v, nb), sdt)
    zps = None if symmetric else np.empty((v, nb), np.uint8)
    alphas = _alphas(bits, symmetric, search)
    for r0 in range(0, v, max(1, int(chunk_rows))):
        r1 = min(r0 + max(1, int(chunk_rows)), v)
        x = t[r0:r1].astype(np.float64)
        if not np.all(np.isfinite(x)):
            bad = r0 + int(np.argwhere(~np.isfinite(x))[0][0])
            raise InvalidInputError(f"embedding table row {bad} holds a non-finite value; quantization needs "
                                    "finite weights")
        u, s, z = _quantize_chunk(x, bits, block_size, sdt, symmetric, alphas)
        codes[r0:r1] = pack_levels(u, bits)
        scales[r0:r1] = s.astype(sdt)
        if zps is not None:
            zps[r0:r1] = z
    return QuantizedEmbedding((v, d), bits, int(block_size), codes, scales, zps)
