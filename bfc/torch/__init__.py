"""PyTorch side of bfc: KS linear layers, fake quantization, ONNX export.

Optional: needs ``torch`` (``pip install 'bfc[torch]'``) and, for export, ``onnxscript``.

    from bfc.torch import KSLinear, export_onnx
    layer = KSLinear(784, 1024, chainable_chain(784, 1024, rank=4), quant="int8")
    dense_init = KSLinear.from_linear(nn.Linear(384, 384), monarch_chain(384))
    export_onnx(model, "model.onnx", example)   # KS layers become dense MatMuls for bfc
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("bfc.torch needs PyTorch: pip install 'bfc[torch]'") from e

from bfc.torch.export import densify, export_onnx, ks_layers_metadata
from bfc.torch.fake_quant import FakeQuant, QuantFormat, Scaling, fake_quant, quantize_values
from bfc.torch.linear import KSLinear, compose_chains, kaleidoscope_chain, transpose_chain, transpose_values

__all__ = ["KSLinear", "FakeQuant", "QuantFormat", "Scaling", "fake_quant", "quantize_values",
           "export_onnx", "densify", "ks_layers_metadata", "compose_chains", "transpose_chain",
           "transpose_values", "kaleidoscope_chain"]
