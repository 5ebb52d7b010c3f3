"""Tiny inline ONNX models for the distillation tests (an MLP and a transformer-ish block)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def mlp(seed: int = 0, d_in: int = 64, hidden: int = 128, d_out: int = 64) -> onnx.ModelProto:
    """x -> MatMul+Add -> Gelu(erf form) -> MatMul+Add -> Relu -> MatMul -> LayerNorm -> y."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)
    w2 = rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
    w3 = rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)
    inits = [_init("w1", w1), _init("b1", rng.standard_normal(hidden) * 0.1), _init("w2", w2),
             _init("b2", rng.standard_normal(hidden) * 0.1), _init("w3", w3),
             _init("ln_s", 1 + 0.1 * rng.standard_normal(d_out)), _init("ln_b", 0.1 * rng.standard_normal(d_out)),
             _init("half", 0.5), _init("one", 1.0), _init("rsqrt2", 1 / np.sqrt(2))]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h1"], name="fc1"), n("Add", ["h1", "b1"], ["h1b"]),
             n("Mul", ["h1b", "rsqrt2"], ["g0"]), n("Erf", ["g0"], ["g1"]), n("Add", ["g1", "one"], ["g2"]),
             n("Mul", ["h1b", "g2"], ["g3"]), n("Mul", ["g3", "half"], ["a1"]),
             n("MatMul", ["a1", "w2"], ["h2"], name="fc2"), n("Add", ["h2", "b2"], ["h2b"]),
             n("Relu", ["h2b"], ["a2"]), n("MatMul", ["a2", "w3"], ["h3"], name="fc3"),
             n("LayerNormalization", ["h3", "ln_s", "ln_b"], ["y"], axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(m)
    return m


def block(seed: int = 0, d: int = 64, ff: int = 128) -> onnx.ModelProto:
    """One pre-softmax-attention transformer block on x [batch, seq, d]: single-head attention with
    Transpose/Div/Softmax, residual + LayerNorm, Gelu FFN (Gemm-free, MatMul + Add), residual + LayerNorm;
    output y [batch, seq, d] and the pooled mean over seq (ReduceMean)."""
    rng = np.random.default_rng(seed)
    w = {k: rng.standard_normal(s) / np.sqrt(s[0]) for k, s in
         (("wq", (d, d)), ("wk", (d, d)), ("wv", (d, d)), ("wo", (d, d)), ("w1", (d, ff)), ("w2", (ff, d)))}
    inits = [_init(k, v) for k, v in w.items()]
    inits += [_init("b1", 0.1 * rng.standard_normal(ff)), _init("b2", 0.1 * rng.standard_normal(d)),
              _init("bq", 0.1 * rng.standard_normal(d)), _init("sqrtd", np.sqrt(d)),
              _init("ln1_s", 1 + 0.1 * rng.standard_normal(d)), _init("ln1_b", 0.1 * rng.standard_normal(d)),
              _init("ln2_s", 1 + 0.1 * rng.standard_normal(d)), _init("ln2_b", 0.1 * rng.standard_normal(d)),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q0"], name="q"), n("Add", ["q0", "bq"], ["q"]),
             n("MatMul", ["x", "wk"], ["k"], name="k"), n("MatMul", ["x", "wv"], ["v"], name="v"),
             n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s0"]),
             n("Div", ["s0", "sqrtd"], ["s1"]), n("Softmax", ["s1"], ["p"], axis=-1),
             n("MatMul", ["p", "v"], ["ctx"]), n("MatMul", ["ctx", "wo"], ["o"], name="o"),
             n("Add", ["o", "x"], ["r1"]), n("LayerNormalization", ["r1", "ln1_s", "ln1_b"], ["h"], axis=-1),
             n("MatMul", ["h", "w1"], ["f0"], name="ff1"), n("Add", ["f0", "b1"], ["f1"]),
             n("Gelu", ["f1"], ["f2"]), n("MatMul", ["f2", "w2"], ["f3"], name="ff2"),
             n("Add", ["f3", "b2"], ["f4"]), n("Add", ["f4", "h"], ["r2"]),
             n("LayerNormalization", ["r2", "ln2_s", "ln2_b"], ["y"], axis=-1),
             n("ReduceMean", ["y", "axis1"], ["pooled"], keepdims=0)]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d]),
                           helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(m)
    return m


def inputs(model: onnx.ModelProto, n: int, seed: int, seq: int = 8) -> dict:
    """n samples of correlated Gaussian inputs (a fixed random mixing of fewer latent factors + noise)."""
    rng = np.random.default_rng(seed)
    vi = model.graph.input[0]
    d = vi.type.tensor_type.shape.dim[-1].dim_value
    mix = np.random.default_rng(1234).standard_normal((d // 2, d)) / np.sqrt(d // 2)
    shape = (n, seq, d // 2) if len(vi.type.tensor_type.shape.dim) == 3 else (n, d // 2)
    x = rng.standard_normal(shape) @ mix + 0.1 * rng.standard_normal(shape[:-1] + (d,))
    return {vi.name: x.astype(np.float32)}
