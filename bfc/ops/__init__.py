"""The ``ai.bfc`` ONNX operators: one module per op (specification, node and model builders, numpy
reference), what both share, and the reference evaluator.

* ``bfc.ops.ks_matmul`` -- ``KSMatMul``: a chain of Kronecker-sparse factors (int8, fp8, fp16, fp32).
* ``bfc.ops.lowbit_matmul`` -- ``LowBitMatMul``: a rotated low-bit layer (2/3/4-bit group codes), and
  ``RotateQuantize``: its rotation and row quantization alone, shared by the layers reading one tensor.
* ``bfc.ops.common`` -- the domain, versions and opset imports, the per-row int8 activation quantization.
* ``bfc.ops.evaluator`` -- onnx's ``ReferenceEvaluator`` with both ops' numpy references.

The names below are the public API (``bfc.ops.<name>``); each is defined once, in its module.
"""
from bfc.ops.common import DEFAULT_IR_VERSION, DOMAIN, OPSET_VERSION, opset_imports, quantize_rows
from bfc.ops.evaluator import reference_evaluator, reference_op, reference_ops
from bfc.ops.ks_matmul import (
    GRANULARITIES,
    OP_TYPE,
    VALUE_TYPES,
    dequantize_factor,
    factor_initializers,
    fp8_bf16_active,
    fp8_uses_bf16,
    ks_matmul_reference,
    make_ks_matmul_model,
    make_ks_matmul_node,
    patterns_attribute,
    perms_from_factorization,
    quantize_factor,
    round_bf16,
)
from bfc.ops.lowbit_matmul import (
    LOWBIT_BITS,
    LOWBIT_OP_TYPE,
    ROTATE_QUANTIZE_OP_TYPE,
    angle_rotation_factors,
    lowbit_codes_stream,
    lowbit_matmul_reference,
    make_lowbit_matmul_model,
    rotate_quantize_reference,
)

__all__ = ["DEFAULT_IR_VERSION", "DOMAIN", "OPSET_VERSION", "opset_imports", "quantize_rows",
           "reference_evaluator", "reference_op", "reference_ops",
           "GRANULARITIES", "OP_TYPE", "VALUE_TYPES", "dequantize_factor", "factor_initializers", "fp8_bf16_active",
           "fp8_uses_bf16", "ks_matmul_reference", "make_ks_matmul_model", "make_ks_matmul_node",
           "patterns_attribute", "perms_from_factorization", "quantize_factor", "round_bf16",
           "LOWBIT_BITS", "LOWBIT_OP_TYPE", "angle_rotation_factors", "lowbit_codes_stream",
           "lowbit_matmul_reference", "make_lowbit_matmul_model", "ROTATE_QUANTIZE_OP_TYPE",
           "rotate_quantize_reference"]
