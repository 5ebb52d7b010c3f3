"""Quantized KS factors: int8 / int4 / fp8 / fp16 / bf16 with optimal rank-one scaling.

``quantize(factorization, fmt, method=...)`` returns a ``QuantizedFactorization``.
Modules: ``formats`` (number formats and their grids), ``rounding`` (RNE / stochastic,
ONNX saturation), ``scales`` (granularity, power-of-two and optimal int8 scales),
``rank_one`` (Alg. 5.1), ``chain`` (pairwise / left-to-right / balanced orders), ``api``.
"""
from bfc.quant.api import QuantizedFactor, QuantizedFactorization, cast, quantize
from bfc.quant.chain import Method
from bfc.quant.formats import BF16, FORMATS, FP8_E4M3, FP8_E5M2, FP16, FP32, INT4, INT8, Format, Kind, get_format
from bfc.quant.rank_one import RankOneResult, optimal_rank_one, rank_one_rtn
from bfc.quant.rounding import Rounding, round_nearest, round_stochastic
from bfc.quant.scales import Granularity, optimal_int_scale

__all__ = ["quantize", "cast", "FP32", "QuantizedFactor", "QuantizedFactorization", "FORMATS", "Format", "Kind",
           "INT8", "INT4", "FP8_E4M3", "FP8_E5M2", "FP16", "BF16", "get_format", "Method", "Rounding",
           "Granularity", "round_nearest", "round_stochastic", "optimal_rank_one", "rank_one_rtn",
           "RankOneResult", "optimal_int_scale"]
