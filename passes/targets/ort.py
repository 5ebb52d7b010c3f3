"""ort target: onnxruntime's own contrib ops where they fit; runs in a stock onnxruntime (no bfc library).

KS layers are emitted as the portable target emits them (standard ops).  Rotated low-bit
layers (``bfc.lowbit.RotatedLayer``): x Q by the portable chain code (one subgraph per input
tensor and Q, fp16 values), then

  * 2 or 4 bits: ``com.microsoft.MatMulNBits(xr, B, scales)`` with ``bits``, ``block_size`` =
    the group size, ``K``, ``N``, ``accuracy_level`` 0 (float computation; int8 activations at
    level 4 are not used, so the planner's float scoring is what runs).  B holds the codes of
    W_r transposed and blocked (``bfc.lowbit.to_matmulnbits``); the implicit zero point
    2^(b-1) is bfc's symmetric format.  Scales are stored fp16 and Cast to float32 (the op
    takes the activation type; onnxruntime folds the Cast at load);
  * 3 bits (MatMulNBits has no 3-bit kernel): the portable in-graph unpacking + MatMul.
  + the int8 correction MatMul(MatMul(x, U), V^T) and the bias, as portable.
Numerics: the float function ``layer.apply`` (fp32 accumulation).
"""
from __future__ import annotations

import numpy as np

from bfc.lowbit import ORT_BITS, RotatedLayer, to_matmulnbits
from bfc.passes.lowbit_emit import correction_tensors, finish
from bfc.passes.targets import emits, register
from bfc.passes.targets.portable import Portable, RotatedUnpacked

DOMAIN = "com.microsoft"


@register
class Ort(Portable):
    name = "ort"
    summary = "onnxruntime contrib ops (MatMulNBits for rotated low-bit layers); stock onnxruntime"

    def compute_dtype(self, model_dtype):
        return np.dtype(np.float32)

    def lowbit_support(self, bits, opset):
        if bits in ORT_BITS:
            return None
        return super().lowbit_support(bits, opset)


@emits(Ort.name, RotatedLayer)
class RotatedNBits(RotatedUnpacked):
    """2/4 bits: x Q, then ``com.microsoft.MatMulNBits``; 3 bits: as the portable target."""

    def tensors(self, b, q):
        if q.weight.bits not in ORT_BITS:
            return super().tensors(b, q)
        mw = to_matmulnbits(q.weight, scale_dtype=q.weight.scales.dtype)
        scales = b.const("scales", mw.scales)
        if mw.scales.dtype != np.float32:
            scales = b.cast(scales, np.float32, 1)                      # TensorProto.FLOAT
        return ("nbits", b.const("B", mw.B), scales, mw.attributes(0)), correction_tensors(b, q.correction)

    def emit(self, b, x, rank, tensors, layer, bias, rotated):
        w, corr = tensors
        if not (isinstance(w, tuple) and w[0] == "nbits"):
            return super().emit(b, x, rank, tensors, layer, bias, rotated)
        _, bq, scales, attrs = w
        x2 = rotated() if layer.rotation is not None else (b.reshape(x, [-1, layer.shape[0]]) if rank != 2 else x)
        y2 = b.op("MatMulNBits", [x2, bq, scales], dict(attrs), domain=DOMAIN)
        return finish(b, x, rank, layer, y2, corr, bias)
