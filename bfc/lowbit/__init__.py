"""Low-bit (int2/int3/int4) weights behind orthogonal butterfly rotations.

``y = x @ W = (x Q)(Q^T W)``: Q an orthogonal KS chain (``rotation``), Q^T W stored in a
group-wise low-bit format (``groups``, ``packing``, ``ort_layout``), rounded with error
feedback (``gptq``), plus an optional low-rank correction (``correction``).  The front
function is ``rotate_quantize`` (``layer``).
"""
from bfc.lowbit.correction import CorrectionOption, LowRankCorrection, best_within, correction_options, fit_correction
from bfc.lowbit.gptq import gptq_quantize
from bfc.lowbit.groups import GroupQuantized, LowBitFormat, PackedGroups, quantize_groups, weighted_error
from bfc.lowbit.packing import pack_bits, packed_nbytes, unpack_bits
from bfc.lowbit.layer import RotatedLayer, rotate_quantize, rotated_gram
from bfc.lowbit.ort_layout import ORT_BITS, MatMulNBitsWeights, to_matmulnbits
from bfc.lowbit.rotation import ButterflyRotation, RotationParams, rotation_chain

__all__ = ["GroupQuantized", "LowBitFormat", "PackedGroups", "quantize_groups", "weighted_error",
           "pack_bits", "unpack_bits", "packed_nbytes", "ButterflyRotation", "RotationParams",
           "rotation_chain", "gptq_quantize", "LowRankCorrection", "CorrectionOption", "fit_correction",
           "correction_options", "best_within", "RotatedLayer", "rotate_quantize", "rotated_gram",
           "ORT_BITS", "MatMulNBitsWeights", "to_matmulnbits"]
