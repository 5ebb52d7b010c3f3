"""Emitters of the integer-MatMul forms (``bfc.lowbit.int8_layer``) for every target.

``Int8Linear``: [x Q (the shared rotation, ``Target.rotate``)] -> DynamicQuantizeLinear ->
MatMulInteger -> Cast -> Mul (``bfc.passes.int8_emit``), the weight a stored int8 constant or the
constant subgraph that unpacks low-bit codes and rounds them per column to int8 (folded by
onnxruntime at session creation).  Standard ops only, so one emitter serves portable, ort and
custom-op; onnxruntime fuses the chain into its DynamicQuantizeMatMul kernel.  Numerics:
``Int8Linear.apply`` (``bfc.lowbit.int8_fold``), which reproduces onnxruntime's arithmetic.
``HalfLinear``: Cast(W16) -> MatMul, the float product of the fp16 weight.
"""
from __future__ import annotations

import numpy as np

from bfc.lowbit.int8_layer import HalfLinear, Int8Linear
from bfc.ops import lowbit_codes_stream
from bfc.passes.int8_emit import emit_folded_codes, emit_int8_matmul
from bfc.passes.lowbit_emit import UNPACK_OPSET
from bfc.passes.targets import FormEmitter, emits
from bfc.passes.targets.custom_op import CustomOp
from bfc.passes.targets.portable import Portable
from bfc.quant.formats import format_of_dtype


class Int8MatMul(FormEmitter):
    def support(self, form, opset: int) -> str | None:
        if form.codes is not None and opset < UNPACK_OPSET:
            return f"folding low-bit codes in the graph needs ONNX opset >= {UNPACK_OPSET}"
        return None

    def simulate(self, form):
        return form.apply

    def tensors(self, b, q: Int8Linear):
        if q.codes is None:
            return b.const("w_s8", q.w_s8), b.const("col_scale", q.col_scale)
        c = q.codes
        k, n = q.shape
        stream = lowbit_codes_stream(c.codes(), c.group_size, c.bits)
        return emit_folded_codes(b, stream, c.scales, c.bits, c.group_size, k, n)

    def emit(self, b, x, rank, tensors, q, bias, rotated):
        w8, col = tensors
        if q.rotation is None:
            return emit_int8_matmul(b, x, w8, col, bias)
        if rank == 2:
            return emit_int8_matmul(b, rotated(), w8, col, bias)
        # x Q back in x's shape once per rotation and graph (shared by Q, K, V): the integer MatMul then
        # writes [..., N] directly, so onnxruntime fuses the model's own bias Add into it
        cache = b.graph.__dict__.setdefault("_bfc_rotated_nd", {})
        key = (x.name, id(q.rotation))
        if key not in cache:
            cache[key] = b.op("Reshape", [rotated(), b.op("Shape", [x], dtype=np.int64)])
        return emit_int8_matmul(b, cache[key], w8, col, bias)


class HalfMatMul(FormEmitter):
    def tensors(self, b, q: HalfLinear):
        return b.cast(b.const("w16", q.w16), b.dtype, format_of_dtype(b.dtype).onnx_type)

    def emit(self, b, x, rank, tensors, q, bias, rotated):
        y = b.op("MatMul", [x, tensors])
        return y if bias is None else b.op("Add", [y, bias])


for _target in (Portable.name, CustomOp.name):
    emits(_target, Int8Linear)(Int8MatMul)
    emits(_target, HalfLinear)(HalfMatMul)
del _target
