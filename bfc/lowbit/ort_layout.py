"""onnxruntime's ``com.microsoft.MatMulNBits`` layout for a ``GroupQuantized`` weight.

MatMulNBits (contrib op, domain com.microsoft, opset 1) computes ``Y = A @ dequant(B)``
with the weight stored *transposed* and blocked along K:

* ``B``: uint8 ``[N, n_blocks, block_size * bits / 8]``, ``n_blocks = ceil(K / block_size)``;
  the codes of column n, rows ``[j*block, (j+1)*block)``, packed LSB first (two per byte
  at 4 bits, four at 2 bits; ``bfc.lowbit.packing``); rows past K are padding;
* ``scales``: ``[N * n_blocks]`` (n major), float32 or float16 (the same type as A);
* ``zero_points`` (optional): uint8 ``[N * ceil(n_blocks * bits / 8)]``, each column's
  block zero points packed LSB first and padded to whole bytes per column.  Without it
  the zero point is ``2^(bits-1)``, which is exactly bfc's symmetric format.

Attributes ``K``, ``N``, ``bits``, ``block_size`` (a power of two >= 16) and
``accuracy_level`` (0 = float; 4 = int8 activations).  ``dequant(B)[k, n] =
(code - zero_point) * scale`` of k's block, which equals ``GroupQuantized.dequantize()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import UnsupportedError
from bfc.lowbit.groups import GroupQuantized
from bfc.lowbit.packing import pack_bits

ORT_BITS = (2, 4, 8)   # what onnxruntime 1.32's MatMulNBits accepts (tests/test_lowbit_ort.py)


@dataclass(frozen=True)
class MatMulNBitsWeights:
    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    K: int
    N: int
    bits: int
    block_size: int

    def attributes(self, accuracy_level: int = 0) -> dict:
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size,
                "accuracy_level": accuracy_level}


def to_matmulnbits(gq: GroupQuantized, scale_dtype=np.float32,
                   explicit_zero_points: bool | None = None) -> MatMulNBitsWeights:
    """MatMulNBits inputs for ``gq`` (see the module docstring).

    ``explicit_zero_points`` defaults to ``not gq.symmetric``; pass True to write the
    implicit symmetric zero points out.
    """
    k, n = gq.shape
    bs = gq.group_size
    if gq.bits not in ORT_BITS:
        raise UnsupportedError(f"MatMulNBits takes bits in {ORT_BITS}, this weight has {gq.bits}; "
                               "use 2, 4 or 8 bits for the ort target")
    if bs < 16 or bs & (bs - 1):
        raise UnsupportedError(f"MatMulNBits needs a power-of-two block_size >= 16, the weight "
                               f"({k}x{n}) has groups of {bs}; requantize with group_size 16/32/64/128")
    n_blocks = -(-k // bs)
    codes = gq.codes()
    pad_code = 1 << (gq.bits - 1)
    full = np.full((n_blocks * bs, n), pad_code, np.uint8)
    full[:k] = codes
    # (N, n_blocks, bs) -> pack each block
    per_block = full.T.reshape(n, n_blocks, bs)
    blob = bs * gq.bits // 8
    B = pack_bits(per_block, gq.bits).reshape(n, n_blocks, blob)
    scales = np.ascontiguousarray(gq.scales.T.reshape(-1)).astype(scale_dtype)
    if explicit_zero_points is None:
        explicit_zero_points = not gq.symmetric
    zp = None
    if explicit_zero_points:
        z = gq.zero_point_codes().T                     # (N, n_blocks)
        zp = np.concatenate([pack_bits(z[i], gq.bits) for i in range(n)])   # whole bytes per column
    return MatMulNBitsWeights(B, scales, zp, k, n, gq.bits, bs)
