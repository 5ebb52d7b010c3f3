"""onnx's ``ReferenceEvaluator`` running the ``ai.bfc`` ops with their numpy references.

``reference_evaluator(model)`` runs any model holding KSMatMul, LowBitMatMul and RotateQuantize nodes (the
``OpRun`` classes of ``reference_ops`` call ``ks_matmul_reference`` and ``lowbit_matmul_reference``);
``fp8_bf16=True`` gives fp8 KSMatMul factors the AVX512_BF16 kernels' bf16 activations.
"""
from __future__ import annotations

from bfc.errors import InvalidInputError
from bfc.ops.common import DOMAIN
from bfc.ops.ks_matmul import ks_matmul_reference
from bfc.ops.lowbit_matmul import lowbit_matmul_reference, rotate_quantize_reference


def _make_op_run():
    from onnx.reference.op_run import OpRun

    class KSMatMul(OpRun):
        """``onnx.reference`` implementation of ai.bfc.KSMatMul (see :mod:`bfc.ops.ks_matmul`)."""

        op_domain = DOMAIN
        emulate_int8 = True
        fp8_bf16 = False        # the AVX512_BF16 fp8 numerics (reference_evaluator(..., fp8_bf16=True))

        def _run(self, X, bias=None, *factors, patterns=None, in_perm=None, out_perm=None):
            if patterns is None:
                raise InvalidInputError("KSMatMul attribute 'patterns' is required")
            y = ks_matmul_reference(X, bias, factors, patterns, in_perm, out_perm,
                                    emulate_int8=self.emulate_int8, fp8_bf16=self.fp8_bf16)
            return (y,)

    class LowBitMatMul(OpRun):
        """``onnx.reference`` implementation of ai.bfc.LowBitMatMul (see :mod:`bfc.ops.lowbit_matmul`)."""

        op_domain = DOMAIN

        def _run(self, X, bias=None, codes=None, scales=None, *rot, K=None, N=None, bits=None, group_size=None,
                 rot_patterns=None, rot_angles=None, prequantized=None):
            if None in (K, N, bits, group_size):
                raise InvalidInputError("LowBitMatMul attributes 'K', 'N', 'bits', 'group_size' are required")
            if prequantized:
                if len(rot) != 1:
                    raise InvalidInputError("LowBitMatMul prequantized = 1 takes 5 inputs (X, bias, codes, scales, "
                                            "x_scale)")
                return (lowbit_matmul_reference(X, bias, codes, scales, K=K, N=N, bits=bits, group_size=group_size,
                                                x_scale=rot[0]),)
            return (lowbit_matmul_reference(X, bias, codes, scales, K=K, N=N, bits=bits, group_size=group_size,
                                            rot_factors=rot, rot_patterns=rot_patterns,
                                            rot_angles=bool(rot_angles)),)

    class RotateQuantize(OpRun):
        """``onnx.reference`` implementation of ai.bfc.RotateQuantize (see :mod:`bfc.ops.lowbit_matmul`)."""

        op_domain = DOMAIN

        def _run(self, X, *rot, K=None, rot_patterns=None, rot_angles=None):
            if K is None:
                raise InvalidInputError("RotateQuantize attribute 'K' is required")
            return rotate_quantize_reference(X, K=K, rot_factors=rot, rot_patterns=rot_patterns,
                                             rot_angles=bool(rot_angles))

    return KSMatMul, LowBitMatMul, RotateQuantize


_OP_RUN = None


def reference_ops():
    """The OpRun classes (KSMatMul, LowBitMatMul, RotateQuantize) for ``ReferenceEvaluator(model, new_ops=[...])``."""
    global _OP_RUN
    if _OP_RUN is None:
        _OP_RUN = _make_op_run()
    return _OP_RUN


def reference_op():
    """The KSMatMul OpRun class (see :func:`reference_ops`)."""
    return reference_ops()[0]


def reference_evaluator(model, fp8_bf16: bool = False, **kwargs):
    """``ReferenceEvaluator`` that runs ai.bfc ops with the numpy reference; ``fp8_bf16``: fp8 factors
    with the AVX512_BF16 kernels' bf16 activations (``fp8_bf16_active()`` says whether the library does)."""
    from onnx.reference import ReferenceEvaluator

    ks_op, lb_op, rq_op = reference_ops()
    if fp8_bf16:
        ks_op = type("KSMatMul", (ks_op,), {"fp8_bf16": True})
    new_ops = list(kwargs.pop("new_ops", [])) + [ks_op, lb_op, rq_op]
    return ReferenceEvaluator(model, new_ops=new_ops, **kwargs)
