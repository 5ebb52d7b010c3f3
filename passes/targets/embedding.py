"""Emitters of quantized embedding tables (``bfc.quant.embedding.QuantizedEmbedding``) for every target.

A Gather site ``y = T[indices]`` becomes ``form.dequantized()[indices]``:
  * ort and custom-op: one ``com.microsoft.GatherBlockQuantized`` (codes read directly, no float table
    in memory) where the installed onnxruntime supports the form, else the portable emission;
  * portable: Gather of the codes and of the scales, then (4 and 2 bits) BitShift/BitwiseAnd/Concat
    unpacking of the gathered bytes and Cast/Sub/Mul (standard ops, opset >= 13; the float table is
    never materialized).
Every ``bits`` of the form (8, 4, 2) goes through the same emitters.
(The algebra and the measured resident bytes are in ``bfc.passes.embedding_emit``.)
"""
from __future__ import annotations

from bfc.passes.embedding_emit import (
    emit_ort,
    emit_portable,
    ort_support,
    ort_tensors,
    portable_support,
    portable_tensors,
)
from bfc.passes.targets import FormEmitter, emits
from bfc.passes.targets.custom_op import CustomOp
from bfc.passes.targets.ort import Ort
from bfc.passes.targets.portable import Portable
from bfc.quant.embedding import QuantizedEmbedding


@emits(Portable.name, QuantizedEmbedding)
class GatherDequantized(FormEmitter):
    def support(self, form, opset):
        return portable_support(form, opset)

    def simulate(self, form):
        return None

    def tensors(self, b, form):
        return portable_tensors(b, form)

    def emit(self, b, indices, rank, tensors, form, bias, rotated):
        return emit_portable(b, indices, form, tensors)


class GatherBlockQuantized(GatherDequantized):
    def support(self, form, opset):
        return None if ort_support(form) is None else portable_support(form, opset)

    def tensors(self, b, form):
        return ("ort", ort_tensors(b, form)) if ort_support(form) is None else ("portable", portable_tensors(b, form))

    def emit(self, b, indices, rank, tensors, form, bias, rotated):
        kind, t = tensors
        return emit_ort(b, indices, form, t) if kind == "ort" else emit_portable(b, indices, form, t)


emits(Ort.name, QuantizedEmbedding)(GatherBlockQuantized)
emits(CustomOp.name, QuantizedEmbedding)(GatherBlockQuantized)
