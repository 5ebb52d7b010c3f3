"""One rotated low-bit layer: ``y = x @ W ~= (x Q) deq(Q^T W) + (x U) V^T``.

``rotate_quantize`` chains the pieces of ``bfc.lowbit``:

1. Q: the randomized Hadamard-like butterfly rotation (``rotation``), optionally learned
   (``rotation_learn``, needs torch); Q = I when ``rotate=False``.
2. W_r = Q^T W and G_r = Q^T G Q (the Gram of the rotated activations x Q), both through
   the chain, never forming Q.
3. W_r quantized group-wise (``groups``): GPTQ with G_r (``gptq``) when ``gptq`` and a Gram
   are given, else round-to-nearest with searched scales weighted by diag(G_r).
4. Optional rank-r int8 correction of R = W - Q deq(W_r) in the original coordinates
   (``correction``), fitted with G.

Since Q is orthogonal, ``X W - (X Q) deq(W_r) = (X Q)(W_r - deq(W_r))``: the rounding error
seen by the rotated activations is the error of the layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import InvalidInputError
from bfc.factorize.calibrated import weighted_error
from bfc.lowbit.correction import LowRankCorrection, fit_correction
from bfc.lowbit.gptq import gptq_quantize
from bfc.lowbit.groups import (
    GroupQuantized,
    LowBitFormat,
    quantize_groups,
)
from bfc.lowbit.rotation import ButterflyRotation
from bfc.lowbit.rotation_learn import learn_rotation


@dataclass(frozen=True)
class RotatedLayer:
    rotation: ButterflyRotation | None      # None = identity
    weight: GroupQuantized                  # quantized Q^T W
    correction: LowRankCorrection | None
    owns_rotation: bool = True              # False: another layer reading the same tensor stores Q

    low_rank = None                         # no float32 residual (the correction is part of apply)

    def apply(self, x) -> np.ndarray:
        """``(x Q) deq(Q^T W) + (x U) V^T`` in float64."""
        x = np.asarray(x, dtype=np.float64)
        xr = x if self.rotation is None else self.rotation.apply(x)
        y = xr @ self.weight.dequantize()
        return y if self.correction is None else y + self.correction.apply(x)

    def to_dense(self) -> np.ndarray:
        w = self.weight.dequantize()
        if self.rotation is not None:
            w = self.rotation.apply_transpose(w.T).T            # Q @ deq
        return w if self.correction is None else w + self.correction.to_dense()

    @property
    def weight_nbytes(self) -> int:
        """Packed low-bit codes, scales, zero points and the correction."""
        return self.weight.nbytes + (0 if self.correction is None else self.correction.nbytes)

    @property
    def rotation_nbytes(self) -> int:
        """Stored values of the rotation chain (shared by every layer reading the same input:
        counted by the layer that ``owns_rotation`` only)."""
        return 0 if self.rotation is None or not self.owns_rotation else self.rotation.nbytes

    @property
    def nbytes(self) -> int:
        return self.weight_nbytes + self.rotation_nbytes

    @property
    def resident_nbytes(self) -> int:
        """As stored: the 2/4-bit MatMulNBits and LowBitMatMul read the packed codes (the portable and 3-bit
        ort emissions unpack them to the model's float type at load; the report measures the session)."""
        return self.nbytes

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def n_params(self) -> int:
        """Stored numbers: weight codes, the correction's factors, the rotation when owned."""
        k, n = self.shape
        r = 0 if self.correction is None else self.correction.rank * (k + n)
        return k * n + r + (0 if self.rotation is None or not self.owns_rotation else self.rotation.n_params)

    @property
    def flops_per_row(self) -> int:
        """Multiply-adds (x2) per input row: rotation chain, weight, correction."""
        k, n = self.shape
        r = 0 if self.correction is None else self.correction.rank * (k + n)
        return 2 * (k * n + r + (0 if self.rotation is None else self.rotation.n_params))

    def error(self, w, gram=None) -> float:
        """``||X (W - W_hat)|| / ||X W||`` (relative Frobenius without a Gram)."""
        return weighted_error(w, self.to_dense(), gram)


def rotated_gram(rotation: ButterflyRotation, gram) -> np.ndarray:
    """``Q^T G Q`` through the chain."""
    return rotation.apply(rotation.rotate_weight(gram))


def rotate_quantize(w, gram=None, bits: int = 4, group_size: int | None = 64, symmetric: bool = True,
                    learn: bool = False, gptq: bool = True, correction_rank: int = 0, seed: int = 0,
                    rotate: bool = True, scale_dtype: str = "float16", learn_steps: int = 100,
                    damp: float = 0.01, rotation: ButterflyRotation | None = None) -> RotatedLayer:
    """Rotate, quantize (and correct) W (K, N) for ``y = x @ W``; ``gram = X^T X`` (K, K).

    ``rotation``: use this Q (e.g. one shared by every layer reading the same tensor) instead of
    building (and learning) one."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or not np.isfinite(w).all():
        raise InvalidInputError(f"expected a finite 2-D weight (K, N), got shape {w.shape}")
    k = w.shape[0]
    if gram is not None:
        gram = np.asarray(gram, dtype=np.float64)
        if gram.shape != (k, k):
            raise InvalidInputError(f"Gram of shape {gram.shape} does not match W with K={k} rows")
    fmt = LowBitFormat(bits, group_size, symmetric, scale_dtype)
    rot = rotation
    if rot is not None and rot.size != k:
        raise InvalidInputError(f"rotation of size {rot.size} does not match W with K={k} rows")
    if rotate and rot is None:
        rot = ButterflyRotation.hadamard_like(k, seed)
        if learn:
            params, _ = learn_rotation(w, gram, fmt, init=rot.params, steps=learn_steps, seed=seed)
            rot = ButterflyRotation.from_params(params)
    wr = w if rot is None else rot.rotate_weight(w)
    gr = None if gram is None or rot is None else rotated_gram(rot, gram)
    gr = gram if rot is None else gr
    if gptq and gr is not None:
        gq = gptq_quantize(wr, gr, fmt, damp=damp)
    else:
        gq = quantize_groups(wr, fmt, h=None if gr is None else np.diag(gr))
    layer = RotatedLayer(rot, gq, None)
    if correction_rank:
        corr = fit_correction(w - layer.to_dense(), gram, correction_rank, damp)
        layer = RotatedLayer(rot, gq, corr)
    return layer
