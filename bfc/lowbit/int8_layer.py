"""Layer forms computed by an integer MatMul: ``Int8Linear`` (stored int8, or stored as rotated low-bit
codes folded to int8 at load) and ``HalfLinear`` (fp16 storage, float compute).

``Int8Linear``: y = int8_matmul(x Q, W8, c)  (``bfc.lowbit.int8_fold``: onnxruntime's dynamic uint8
activation quantization, an exact int32 product, float32 rescaling; Q the identity when
``rotation`` is None).  Storage:
  * ``codes`` None: W8 (K, N) int8 and c (N,) float32 are stored (``quantize_columns(W)``);
  * ``codes`` a symmetric b-bit ``GroupQuantized`` of W_r = Q^T W: the packed codes and fp16 group
    scales are stored, and (W8, c) = fold_codes(deq(codes)) is computed by a constant subgraph that
    onnxruntime folds at session creation: the file holds b bits per weight, the running session
    the int8 weight (``resident_nbytes``), and the layer runs at int8 speed.
``HalfLinear``: y = x W16 in the model's float type, W16 the fp16 weight (Cast at load: the
resident weight is the model's type).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from bfc.lowbit.groups import GroupQuantized
from bfc.lowbit.int8_fold import dequantize_codes, fold_codes, int8_matmul, quantize_columns


@dataclass(frozen=True, eq=False)
class Int8Linear:
    shape: tuple[int, int]
    w_s8: np.ndarray                       # (K, N) int8: the weight the integer MatMul uses
    col_scale: np.ndarray                  # (N,) float32
    rotation: object | None = None         # a rotation of the input (ButterflyRotation / KroneckerRotation)
    codes: GroupQuantized | None = None    # stored low-bit codes of Q^T W (None: w_s8 is stored)
    owns_rotation: bool = True             # False: another layer reading the same tensor stores Q

    low_rank = None                        # no float residual

    @classmethod
    def from_weight(cls, w) -> Int8Linear:
        w8, c = quantize_columns(w)
        return cls(tuple(w8.shape), w8, c)

    @classmethod
    def from_codes(cls, codes: GroupQuantized, rotation=None) -> Int8Linear:
        deq = dequantize_codes(codes.codes(), codes.scales, codes.bits, codes.group_size)
        w8, c = fold_codes(deq)
        return cls(tuple(w8.shape), w8, c, rotation, codes)

    @property
    def bits(self) -> int:
        return 8 if self.codes is None else self.codes.bits

    @property
    def label(self) -> str:
        if self.codes is None:
            return "int8 per-column"
        return f"rotated int{self.codes.bits} g{self.codes.group_size} (int8 compute)"

    def apply(self, x) -> np.ndarray:
        """The computed function (float64 result of the float32 computation)."""
        x = np.asarray(x, np.float32)
        xr = x if self.rotation is None else np.asarray(self.rotation.apply(x), np.float32)
        return int8_matmul(xr, self.w_s8, self.col_scale).astype(np.float64)

    @cached_property
    def _dense(self) -> np.ndarray:
        w = self.w_s8.astype(np.float64) * self.col_scale.astype(np.float64)
        return w if self.rotation is None else self.rotation.apply_transpose(w.T).T

    def to_dense(self) -> np.ndarray:
        """Q W8 diag(c): the weight without the activation rounding."""
        return self._dense

    @property
    def rotation_nbytes(self) -> int:
        return 0 if self.rotation is None or not self.owns_rotation else self.rotation.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes in the file: the stored weight (int8 + scales, or packed codes + scales) and the
        rotation when this layer owns it."""
        k, n = self.shape
        stored = k * n + 4 * n if self.codes is None else self.codes.nbytes
        return stored + self.rotation_nbytes

    @property
    def resident_nbytes(self) -> int:
        """Bytes onnxruntime keeps after session creation: the int8 weight and its column scales."""
        k, n = self.shape
        return k * n + 4 * n + self.rotation_nbytes

    @property
    def n_params(self) -> int:
        k, n = self.shape
        return k * n + (0 if self.rotation is None or not self.owns_rotation else self.rotation.n_params)

    @property
    def flops_per_row(self) -> int:
        k, n = self.shape
        return 2 * k * n + (0 if self.rotation is None else self.rotation.flops_per_row)


@dataclass(frozen=True, eq=False)
class HalfLinear:
    """y = x W16 (fp16 storage; the model's float type at run time)."""
    w16: np.ndarray

    low_rank = None
    rotation = None

    @classmethod
    def from_weight(cls, w) -> HalfLinear:
        return cls(np.asarray(w, np.float32).astype(np.float16))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w16.shape)

    label = "fp16"

    def apply(self, x) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.w16.astype(np.float64)

    def to_dense(self) -> np.ndarray:
        return self.w16.astype(np.float64)

    @property
    def nbytes(self) -> int:
        return int(self.w16.nbytes)

    @property
    def resident_nbytes(self) -> int:
        return 2 * int(self.w16.nbytes)        # folded to float32 at load

    @property
    def n_params(self) -> int:
        return int(self.w16.size)

    @property
    def flops_per_row(self) -> int:
        return 2 * int(self.w16.size)
