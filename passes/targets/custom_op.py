"""Custom-op target: each planned layer becomes ONE ``ai.bfc.KSMatMul`` node (bfc's onnxruntime library).

Algebra:  x @ W_hat + bias = KSMatMul(x; values_l, scale_l; in_perm = row_perm,
out_perm = inverse(col_perm), bias); the op's semantics and its numpy reference are in
:mod:`bfc.ops`.  The kernels compute in float32 (the rewrite casts fp16 models around
the node).  Numerics: for int8 factors the kernel quantizes each factor's input
activation per row (symmetric, 127/amax) and accumulates exactly in int32, so the
planner scores int8 layers with ``bfc.ops.ks_matmul_reference`` (bit-faithful
emulation), not with the float product; fp8/fp16/fp32 factors are decoded exactly and
multiplied in float32 (the float product).
"""
from __future__ import annotations

import numpy as np

from bfc.factorize import inverse_perm
from bfc.ops import DOMAIN, OP_TYPE, VALUE_TYPES, ks_matmul_reference, patterns_attribute
from bfc.passes.targets import Target, register


def _perms(q):
    in_perm = None if q.row_perm is None else np.asarray(q.row_perm, np.int64)
    out_perm = None if q.col_perm is None else inverse_perm(np.asarray(q.col_perm, np.int64))
    return in_perm, out_perm


@register
class CustomOp(Target):
    name = "custom-op"
    summary = "one ai.bfc.KSMatMul node per layer (bfc's onnxruntime library)"

    def compute_dtype(self, model_dtype):
        return np.dtype(np.float32)

    def check(self, fmt, opset):
        if fmt.name not in VALUE_TYPES:
            return "the KSMatMul kernels take int8/fp8/fp16/fp32 values"
        if fmt.bits == 8 and fmt.is_float and opset < 19:
            return f"{fmt.name} initializers need ONNX opset >= 19 (IR 9 float8 types)"
        return None

    def lowbit_support(self, bits, opset):
        return ("the custom-op target cannot emit rotated low-bit layers yet (no ai.bfc kernel for them); "
                "use --target ort or portable")

    def simulate(self, q):
        if getattr(q, "fmt", None) != "int8":
            return None
        factors = [t for f in q.factors for t in (f.values, f.scale)]
        in_perm, out_perm = _perms(q)
        pats = patterns_attribute(q.chain)

        def run(x):
            return ks_matmul_reference(np.asarray(x, np.float32), None, factors, pats, in_perm, out_perm)
        return run

    def tensors(self, b, q):
        factors = []
        for l, f in enumerate(q.factors):
            factors += [b.const(f"values{l}", f.values),
                        b.const(f"scale{l}", np.asarray(f.scale, np.float32).reshape(
                            f.scale.shape if np.ndim(f.scale) == 4 else (1, 1, 1, 1)))]
        attrs = {"patterns": patterns_attribute(q.chain)}
        in_perm, out_perm = _perms(q)
        if in_perm is not None:
            attrs["in_perm"] = [int(v) for v in in_perm]
        if out_perm is not None:
            attrs["out_perm"] = [int(v) for v in out_perm]
        return factors, attrs

    def emit(self, b, x, rank, tensors, q, bias):
        import onnx_graphsurgeon as gs
        factors, attrs = tensors
        return b.op(OP_TYPE, [x, bias if bias is not None else gs.Variable.empty(), *factors], dict(attrs),
                    domain=DOMAIN)
