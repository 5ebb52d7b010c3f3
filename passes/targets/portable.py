"""Portable target: each planned layer becomes standard ONNX ops (any runtime runs it).

KS chains: the standard-op chain code of ``bfc.passes.ks_emit`` (its docstring has the algebra).
Rotated low-bit layers (``bfc.lowbit.RotatedLayer``, opset >= 18): x Q by the chain code above
(fp16 values Cast to float), then MatMul with the weight unpacked in-graph from b-bit packed
codes and fp16 group scales, + the int8 correction (``bfc.passes.lowbit_emit``); the float
function ``layer.apply``.
"""
from __future__ import annotations

import numpy as np

from bfc.lowbit import RotatedLayer
from bfc.passes.ks_emit import emit_chain, factor_tensors
from bfc.passes.lowbit_emit import UNPACK_OPSET, correction_tensors, finish, rotate, unpacked_weight
from bfc.passes.targets import FormEmitter, Target, emits, register
from bfc.quant import QuantizedFactorization


@register
class Portable(Target):
    name = "portable"
    summary = "standard ONNX ops (any runtime)"

    def check(self, fmt, opset):
        if fmt.bits == 8 and fmt.is_float and opset < 19:
            return f"{fmt.name} weights need ONNX opset >= 19 (DequantizeLinear-19)"
        if fmt.bits == 4 and not fmt.is_float and opset < 21:
            return f"{fmt.name} weights need ONNX opset >= 21 (INT4 DequantizeLinear-21)"
        return None

    def lowbit_support(self, bits, opset):
        if opset < UNPACK_OPSET:
            return (f"rotated low-bit layers need ONNX opset >= {UNPACK_OPSET} on the {self.name} target (in-graph "
                    f"unpacking of the packed codes), the model has {opset}")
        return None

    def rotate(self, b, x, rank, rotation):
        return rotate(b, x, rank, rotation)


@emits(Portable.name, QuantizedFactorization)
class KSChain(FormEmitter):
    """A KS chain as standard ops (``bfc.passes.ks_emit``); the float product."""

    def tensors(self, b, q):
        return factor_tensors(b, q)

    def emit(self, b, x, rank, tensors, q, bias, rotated):
        m, n = q.chain.shape
        flat = rank != 2
        x2 = b.reshape(x, [-1, m]) if flat else x
        out = emit_chain(b, x2, q, tensors)
        if bias is not None:
            out = b.op("Add", [out, bias])
        if flat:
            shape = b.op("Shape", [x], dtype=np.int64)
            lead = b.op("Slice", [shape, b.const("start", np.array([0], np.int64)),
                                  b.const("end", np.array([-1], np.int64))], dtype=np.int64)
            tgt = b.op("Concat", [lead, b.const("n", np.array([n], np.int64))], {"axis": 0}, dtype=np.int64)
            out = b.op("Reshape", [out, tgt])
        return out


@emits(Portable.name, RotatedLayer)
class RotatedUnpacked(FormEmitter):
    """x Q, then MatMul with the weight unpacked in-graph from packed codes (``bfc.passes.lowbit_emit``)."""

    def tensors(self, b, layer):
        return unpacked_weight(b, layer.weight), correction_tensors(b, layer.correction)

    def emit(self, b, x, rank, tensors, layer, bias, rotated):
        w, corr = tensors
        x2 = rotated() if layer.rotation is not None else (b.reshape(x, [-1, layer.shape[0]]) if rank != 2 else x)
        return finish(b, x, rank, layer, b.op("MatMul", [x2, w]), corr, bias)
