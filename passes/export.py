"""Export: a rewritten graph back to a model (dead nodes/initializers, topological order, shape inference, checker).

``export(graph, template, layers, base)`` returns a new ModelProto (the input model is not
modified); the rewrite stage calls it.  It ensures: unused nodes and tensors are gone (gs cleanup), nodes are topologically
sorted, ``metadata_props['bfc.layers']`` lists the rewritten layers (so a second
``bfc optimize`` recognizes them besides the ``bfc/`` name prefix), shapes are
inferred where onnx can, and the model passes ``onnx.checker``.
No algebra: the function computed is unchanged.
"""
from __future__ import annotations

import json

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from bfc.passes.model_io import stream
from bfc.passes.model_io.files import output_ir_version


def _export_light(graph: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx copies every initializer twice (graph, then model); export with data-less
    stand-ins for the untouched big initializers and copy each original in once, at the end."""
    originals = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues):
            src = t._values.tensor
            if src.ByteSize() > (1 << 16):
                stub = onnx.TensorProto(name=src.name, data_type=src.data_type, dims=src.dims)
                originals[t.name] = (t, src)
                t._values = LazyValues(stub)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for t, src in originals.values():
            t._values = LazyValues(src)
    for init in model.graph.initializer:
        if init.name in originals:
            init.CopyFrom(originals[init.name][1])
            init.name = originals[init.name][0].name
    return model


def export(graph: gs.Graph, template: onnx.ModelProto, layers: list[str], base=None) -> onnx.ModelProto:
    """The rewritten graph as a model with ``template``'s metadata; weights still in their files stay
    references relative to ``base`` (``bfc.passes.model_io.stream``)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = _export_light(graph)
    model.ir_version = output_ir_version(template)
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    have = {imp.domain for imp in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - have - {"ai.onnx"}):
        model.opset_import.add(domain=domain, version=1)     # e.g. ai.bfc from the custom-op target
    model.producer_name, model.producer_version = template.producer_name, template.producer_version
    model.doc_string, model.model_version, model.domain = template.doc_string, template.model_version, template.domain
    meta = {p.key: p.value for p in template.metadata_props}
    old = json.loads(meta.get("bfc.layers", "[]"))
    meta["bfc.layers"] = json.dumps(old + layers)
    del model.metadata_props[:]
    for k in sorted(meta):
        model.metadata_props.add(key=k, value=meta[k])
    for f in template.functions:
        model.functions.add().CopyFrom(f)
    model = check(model, base)            # shape inference may name unknown output dims: restore them after
    keep_io_types(model, template)
    return model


def keep_io_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Graph inputs and outputs keep the types and shapes ``template`` declares, field for field (an
    empty ``shape {}``, unknown or symbolic dims): graphsurgeon and the version converter may drop or
    rewrite them, and a user's runtime may rely on the declaration."""
    for ours, theirs in ((model.graph.input, template.graph.input), (model.graph.output, template.graph.output)):
        declared = {vi.name: vi for vi in theirs}
        for vi in ours:
            t = declared.get(vi.name)
            if t is not None and (t.type.tensor_type.HasField("shape") or not t.type.HasField("tensor_type")):
                vi.type.CopyFrom(t.type)      # a declaration without any shape keeps the inferred one


INFER_LIMIT = 64 << 20    # shape inference copies the model twice: only below 64 MB


def check(model: onnx.ModelProto, base=None) -> onnx.ModelProto:
    """Shape inference and the ONNX checker in memory when the model with its weights is below
    INFER_LIMIT (they copy the model; on a skeleton they see the references, not the weights);
    larger models are checked from the saved file (``check_file``) and by loading them in
    onnxruntime (verification)."""
    if stream.model_size(model, base) < INFER_LIMIT:
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - inference is best effort; the checker below decides
            pass
        _checked(lambda: stream.check_skeleton(model))
    return model


def check_file(path) -> None:
    """The written model parses and passes the checker (read as a skeleton: its weights are not loaded)."""
    def run():
        model = stream.read_skeleton(path)
        stream.check_refs(model, path)
        stream.check_skeleton(model)
    _checked(run)


def _checked(run) -> None:
    try:
        run()
    except (onnx.checker.ValidationError, ValueError) as e:
        raise RuntimeError(f"bfc's output fails the ONNX checker ({str(e).splitlines()[0]}); this is a bug in "
                           "bfc, not in the input model: please report it with the model and command") from None


def pin_batch(model: onnx.ModelProto, n: int, base=None) -> onnx.ModelProto:
    """Pin the first (batch) dimension of every graph input and output to ``n`` when it is dynamic."""
    for vi in list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and len(t.shape.dim) > 0:
            d = t.shape.dim[0]
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.Clear()
                d.dim_value = n
    del model.graph.value_info[:]
    return check(model, base)
