"""What both ``ai.bfc`` ops share: the domain and versions, the model opset imports, and the per-row
int8 activation quantization both kernels apply.

Per-row symmetric int8 (``quantize_rows``), as the native kernels compute it in float32:
``amax = max|h|`` over the last axis, ``q = rint(clip(h * (127/amax), -127, 127))`` (round half
to even; ``q = 0`` where ``amax = 0`` or the product is NaN), returned with the row scale ``amax/127``.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

DOMAIN = "ai.bfc"
OPSET_VERSION = 1
DEFAULT_IR_VERSION = 10


def opset_imports(onnx_opset: int) -> list:
    """The ``opset_import`` of a model using ai.bfc ops: the default domain at ``onnx_opset``, ai.bfc at 1."""
    return [helper.make_opsetid("", onnx_opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)]


def quantize_rows(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 quantization as the kernel does it (float32 arithmetic)."""
    h = h.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        amax = np.max(np.abs(h), axis=-1, keepdims=True) if h.shape[-1] else np.zeros(h.shape[:-1] + (1,), np.float32)
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        r = h * inv
        r = np.where(np.isnan(r), np.float32(0), r)
        q = np.rint(np.clip(r, -127, 127))
    return q.astype(np.int64), (amax / np.float32(127)).astype(np.float32)
