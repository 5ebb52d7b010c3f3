"""``GraphBuilder``: appends named nodes and constants to a graphsurgeon graph (used by every target).

Every node and tensor it creates is named ``<prefix>/<what>_<n>`` with a ``bfc/``
prefix, so a later run recognizes bfc's own layers and never re-factorizes them.
The builder appends to the graph it is given: the main graph, or the If/Loop/Scan body
that holds the node being rewritten (its constants then become that body's
initializers on export).  ``opset`` is the model's default-domain opset, for targets
whose valid ops or types depend on it (e.g. fp16 DequantizeLinear scales need 19).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


class GraphBuilder:
    def __init__(self, graph: gs.Graph, prefix: str, dtype, opset: int):
        self.graph, self.prefix, self.dtype, self.count = graph, prefix, np.dtype(dtype), 0
        self.opset = opset

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, what: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(what), np.ascontiguousarray(values))

    def op(self, op: str, inputs, attrs=None, dtype=None, domain=None) -> gs.Variable:
        """One node ``op(inputs)``; its output is float of the builder's dtype unless ``dtype`` says."""
        out = gs.Variable(self.name(op.lower() + "_out"), dtype=self.dtype if dtype is None else np.dtype(dtype))
        self.graph.nodes.append(gs.Node(op, name=self.name(op), inputs=list(inputs), outputs=[out],
                                        attrs=attrs or {}, domain=domain))
        return out

    def op_outputs(self, op: str, inputs, dtypes, attrs=None, domain=None) -> list[gs.Variable]:
        """One node ``op(inputs)`` with one output per entry of ``dtypes``."""
        outs = [gs.Variable(self.name(f"{op.lower()}_out{i}"), dtype=np.dtype(dt)) for i, dt in enumerate(dtypes)]
        self.graph.nodes.append(gs.Node(op, name=self.name(op), inputs=list(inputs), outputs=outs,
                                        attrs=attrs or {}, domain=domain))
        return outs

    def reshape(self, x, shape) -> gs.Variable:
        return self.op("Reshape", [x, self.const("shape", np.array(shape, np.int64))])

    def cast(self, x, dtype, onnx_type: int) -> gs.Variable:
        return self.op("Cast", [x], {"to": onnx_type}, dtype=dtype)

    @staticmethod
    def route(out: gs.Variable, y: gs.Variable) -> None:
        """Make the node producing ``out`` write ``y`` instead (graph outputs keep their names)."""
        out.inputs[0].outputs = [y]
