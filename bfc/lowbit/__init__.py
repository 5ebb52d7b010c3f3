"""Low-bit (int2/int3/int4) weights behind orthogonal butterfly rotations.

``y = x @ W = (x Q)(Q^T W)``: Q an orthogonal KS chain (``rotation``), Q^T W stored in a
group-wise low-bit format (``groups``, ``packing``, ``ort_layout``), rounded with error
feedback (``gptq``), plus an optional low-rank correction (``correction``).  The front
function is ``rotate_quantize`` (``layer``).
"""
from bfc.factorize.calibrated import weighted_error
from bfc.lowbit.correction import (
           CorrectionOption,
           LowRankCorrection,
           best_within,
           correction_options,
           fit_correction,
)
from bfc.lowbit.gptq import gptq_quantize
from bfc.lowbit.groups import (
           GroupQuantized,
           LowBitFormat,
           PackedGroups,
           quantize_groups,
)
from bfc.lowbit.layer import RotatedLayer, rotate_quantize, rotated_gram
from bfc.lowbit.ort_layout import ORT_BITS, MatMulNBitsWeights, to_matmulnbits
from bfc.lowbit.packing import pack_bits, packed_nbytes, unpack_bits
from bfc.lowbit.rotation import ButterflyRotation, RotationParams, rotation_chain

__all__ = [
           "ORT_BITS",
           "ButterflyRotation",
           "CorrectionOption",
           "GroupQuantized",
           "LowBitFormat",
           "LowRankCorrection",
           "MatMulNBitsWeights",
           "PackedGroups",
           "RotatedLayer",
           "RotationParams",
           "best_within",
           "correction_options",
           "fit_correction",
           "gptq_quantize",
           "pack_bits",
           "packed_nbytes",
           "quantize_groups",
           "rotate_quantize",
           "rotated_gram",
           "rotation_chain",
           "to_matmulnbits",
           "unpack_bits",
           "weighted_error",
]
