"""ONNX export of models containing ``KSLinear`` layers.

Choice: every ``KSLinear`` is exported as one plain ``MatMul`` with a constant dense
weight ``W = dense_weight()`` (in x out, fake quantization applied) plus an ``Add`` for the
bias.  Why not emit bfc's portable KS subgraph directly: ``bfc optimize`` owns that
rewrite (structure choice, quantization with scales, the custom-op target, verification
and the report), and a dense ``MatMul`` is what it already matches.  Since W is exactly a
product of KS factors, re-factorizing it with the same (chainable) chain is exact up to
float rounding, so nothing is lost but file size in the intermediate model.  To make the
hand-off exact rather than searched, the chain of every layer is recorded in the model's
``metadata_props`` under ``bfc.ks_layers`` (JSON list of ``{"module", "weight", "shape",
"chain", "chainable", "quant"}``; ``weight`` is the initializer name of the MatMul weight).

The exporter is ``torch.onnx.export(dynamo=True)`` (needs ``onnxscript``); the first
dimension of every input is dynamic ("batch").
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bfc.api import save
from bfc.errors import InvalidInputError, ModelError
from bfc.torch.linear import KSLinear

METADATA_KEY = "bfc.ks_layers"


class _DenseMatMul(nn.Module):
    """``x @ W + b`` with W a constant buffer in ONNX orientation (exports as MatMul + Add)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


def densify(module: nn.Module) -> tuple[nn.Module, list[dict]]:
    """A deep copy of ``module`` with every KSLinear replaced by a dense MatMul module."""
    model = copy.deepcopy(module).eval()
    records = []
    if isinstance(model, KSLinear):
        raise InvalidInputError("export a model that contains KSLinear layers; to export a "
                                "lone KSLinear wrap it, e.g. nn.Sequential(layer)")
    for name, sub in list(model.named_modules()):
        if not isinstance(sub, KSLinear):
            continue
        with torch.no_grad():
            w = sub.dense_weight().float()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _DenseMatMul(w, None if sub.bias is None else sub.bias.float()))
        records.append({"module": name, "shape": list(sub.chain.shape),
                        "chain": [[p.a, p.b, p.c, p.d] for p in sub.chain.patterns],
                        "chainable": sub.chain.is_chainable,
                        "quant": None if sub.quant is None else sub.quant.fmt.value,
                        "_dense": w.numpy()})
    return model, records


def export_onnx(module: nn.Module, path, example, *, input_names=None, output_names=None,
                opset: int = 20, ir_version: int = 10, dynamic_batch: bool = True) -> Path:
    """Export ``module`` (with KSLinear layers as dense MatMuls) to ``path``; returns the path.

    ``example`` is one tensor or a tuple of tensors (the forward's positional arguments).
    The file is written atomically; its IR version is capped at ``ir_version`` so that
    onnxruntime accepts it.
    """
    import onnx

    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise InvalidInputError("example must be a tensor or a tuple of tensors")
    model, records = densify(module)
    if dynamic_batch:
        # a batch of 1 would be specialized by torch.export: trace with a batch of 2
        args = tuple(a if a.shape[0] > 1 else torch.cat([a, a]) for a in args)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
    else:
        dynamic_shapes = None
    path = Path(path)
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
    except ImportError as e:
        raise ModelError(f"torch.onnx.export(dynamo=True) needs onnxscript: pip install onnxscript ({e})") from e
    proto = program.model_proto
    if proto.ir_version > ir_version:
        proto.ir_version = ir_version
    inits = {i.name: i for i in proto.graph.initializer}
    consts = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            consts.setdefault(node.input[1], None)
    arrays = {name: onnx.numpy_helper.to_array(inits[name]) for name in consts}
    meta = []
    for rec in records:
        dense = rec.pop("_dense")
        rec["weight"] = next((n for n, a in arrays.items()
                              if a.shape == dense.shape and np.array_equal(a, dense)), None)
        meta.append(rec)
    if meta:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(proto, path)                         # atomic, external data above 2 GB
    return path


def ks_layers_metadata(model) -> list[dict]:
    """The ``bfc.ks_layers`` records of an exported model (a ModelProto or a path)."""
    import onnx
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return []
