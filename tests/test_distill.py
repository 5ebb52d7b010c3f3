"""Distillation: the ONNX -> torch interpreter, target-exact fake quantization, the Distill pass."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch", reason="distillation needs PyTorch (pip install 'bfc[torch]')")

import bfc
from bfc import runtime
from bfc.config import OptimizeConfig
from bfc.distill import QuantizedKS, batches
from bfc.errors import ConfigError, UnsupportedError
from bfc.factorize import factorize, relative_error
from bfc.ks import monarch_chain
from bfc.ops import ks_matmul_reference, patterns_attribute
from bfc.passes.model_io.session import session
from bfc.quant import quantize
from bfc.torch.onnx_module import OnnxModule

sys.path.insert(0, str(Path(__file__).parent))
import distill_models as dm

MODELS = {"mlp": dm.mlp, "block": dm.block}
TARGETS = ["portable", pytest.param("custom-op", marks=pytest.mark.skipif(
    not runtime.is_available(), reason="bfc custom-op library not built"))]
DISTILL_GAIN = 0.85     # distilled output error <= DISTILL_GAIN x planned output error (held-out inputs)
INTERPRETER_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _rel(got, ref):
    return max(relative_error(r, g) for g, r in zip(got, ref))


# ---- interpreter ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_interpreter_matches_onnxruntime(name):
    model = MODELS[name]()
    feeds = dm.inputs(model, 16, seed=5)
    ref = session(model).run(None, feeds)
    with torch.no_grad():
        out = OnnxModule(model)(feeds)
    assert _rel([out[n].numpy() for n in (o.name for o in model.graph.output)], ref) <= INTERPRETER_TOL


def test_interpreter_shape_ops_match_onnxruntime():
    """Shape/Slice/Concat/Reshape/Gather/Expand/Range/Where/Split/Unsqueeze/Squeeze/Cast/ConstantOfShape."""
    n = helper.make_node
    def i64(name, v):
        return helper.make_tensor(name, TensorProto.INT64, [len(v)], v)
    nodes = [n("Shape", ["x"], ["s"]), n("Slice", ["s", "c0", "c1"], ["b"]),
             n("Concat", ["b", "cm1"], ["tgt"], axis=0), n("Reshape", ["x", "tgt"], ["flat"]),
             n("Gather", ["flat", "idx"], ["g"], axis=1), n("Unsqueeze", ["g", "c0"], ["u"]),
             n("Squeeze", ["u", "c0"], ["sq"]), n("Split", ["sq", "two"], ["p1", "p2"], axis=1),
             n("Sub", ["p1", "p2"], ["d"]), n("Range", ["r0", "r1", "r2"], ["rg"]),
             n("Cast", ["rg"], ["rgf"], to=TensorProto.FLOAT), n("Add", ["d", "rgf"], ["d2"]),
             n("Greater", ["d2", "zero"], ["m"]), n("Where", ["m", "d2", "zero"], ["w"]),
             n("Expand", ["w", "eshape"], ["e"]), n("ConstantOfShape", ["b"], ["cz"],
                                                    value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
             n("ReduceMean", ["e", "c1"], ["y"], keepdims=0)]
    inits = [helper.make_tensor("c0", TensorProto.INT64, [1], [0]), helper.make_tensor("c1", TensorProto.INT64, [1], [1]),
             i64("cm1", [-1]), helper.make_tensor("idx", TensorProto.INT64, [4], [0, 3, -1, 2]),
             i64("two", [2, 2]), helper.make_tensor("r0", TensorProto.INT64, [], [0]),
             helper.make_tensor("r1", TensorProto.INT64, [], [2]), helper.make_tensor("r2", TensorProto.INT64, [], [1]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]), i64("eshape", [3, 1, 1])]
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("cz", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    ref = session(model).run(None, {"x": x})
    got = OnnxModule(model)({"x": x})
    for name, r in zip(("y", "cz"), ref):
        assert got[name].shape == r.shape
        np.testing.assert_allclose(got[name].numpy(), r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_interpreter_multi_head_attention_matches_onnxruntime(with_bias):
    """com.microsoft MultiHeadAttention as bfc's fusion emits it (separate Q/K/V, scale, attention_bias of
    shape (B, 1, S, L)): the interpreter's softmax attention equals onnxruntime's kernel."""
    b_, s_, heads, d = 3, 7, 4, 8
    ins = ["q", "k", "v"] + (["", "", "bias"] if with_bias else [])
    node = helper.make_node("MultiHeadAttention", ins, ["y"], domain="com.microsoft", num_heads=heads, scale=0.3)
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b_, s_, heads * d]) for n in ("q", "k", "v")]
    if with_bias:
        vi.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [b_, 1, s_, s_]))
    g = helper.make_graph([node], "mha", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    rng = np.random.default_rng(4)
    feeds = {n: rng.standard_normal((b_, s_, heads * d)).astype(np.float32) for n in ("q", "k", "v")}
    if with_bias:
        mask = rng.random((b_, 1, s_, s_)) < 0.3
        feeds["bias"] = np.where(mask, np.float32(-1e4), np.float32(0)).astype(np.float32)
    ref = session(model).run(None, feeds)
    with torch.no_grad():
        got = OnnxModule(model)(feeds)["y"].numpy()
    assert _rel([got], ref) <= INTERPRETER_TOL


def test_unsupported_op_is_named():
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv0")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(UnsupportedError, match=r"Conv \(node 'conv0'\)"):
        OnnxModule(model)


# ---- fake quantization == target numerics ---------------------------------------------------------
def _layer(fmt="int8", low_rank=0, perms=True, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((96, 48)) / 10
    f = factorize(w, monarch_chain(96, 48, rank=2), residual_rank=low_rank)
    q = quantize(f, fmt) if fmt not in ("fp32",) else quantize(f, "fp32")
    if perms:
        q = dataclasses.replace(q, row_perm=rng.permutation(96), col_perm=rng.permutation(48))
    return q, rng.standard_normal((40, 96)).astype(np.float32) * np.linspace(0.1, 3, 40, dtype=np.float32)[:, None]


def test_custom_op_int8_forward_is_the_kernel_reference():
    q, x = _layer("int8")
    ks = QuantizedKS(q, emulate_rows=True)
    with torch.no_grad():
        got = ks(torch.from_numpy(x)).numpy()
    factors = [t for f in q.factors for t in (f.values, f.scale)]
    from bfc.factorize import inverse_perm
    ref = ks_matmul_reference(x, None, factors, patterns_attribute(q.chain), q.row_perm, inverse_perm(q.col_perm))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("fmt,low_rank", [("int8", 0), ("int8", 4), ("fp8-e4m3", 0), ("fp16", 2), ("fp32", 0)])
def test_portable_forward_is_the_float_product(fmt, low_rank):
    q, x = _layer(fmt, low_rank)
    with torch.no_grad():
        got = QuantizedKS(q).forward(torch.from_numpy(x)).numpy()
    ref = q.apply(x)
    assert relative_error(ref, got) < 1e-6


@pytest.mark.parametrize("fmt", ["int8", "fp8-e4m3"])
@pytest.mark.parametrize("emulate", [False, True])
def test_trained_layer_exports_on_the_grid(fmt, emulate):
    """After a step the exported QuantizedFactorization computes what the torch layer computes."""
    q, x = _layer(fmt)
    ks = QuantizedKS(q, emulate_rows=emulate)
    opt = torch.optim.Adam(ks.parameters(), lr=1e-2)
    for _ in range(3):
        loss = ks(torch.from_numpy(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = ks.export()
    assert [f.values.dtype for f in out.factors] == [f.values.dtype for f in q.factors]
    assert any(not np.array_equal(a.values, b.values) for a, b in zip(out.factors, q.factors))
    with torch.no_grad():
        got = ks(torch.from_numpy(x)).numpy()
    if emulate and fmt == "int8":
        from bfc.passes.targets import get_target
        ref = get_target("custom-op").simulate(out)(x)
    else:
        ref = out.apply(x)
    assert relative_error(ref, got) < 1e-6


# ---- the pass --------------------------------------------------------------------------------------
def _files(tmp_path, model):
    cal, data = tmp_path / "cal.npz", tmp_path / "distill.npz"
    np.savez(cal, **dm.inputs(model, 64, seed=1))
    np.savez(data, **dm.inputs(model, 384, seed=2))
    return cal, data


def _cfg(cal, target, **kw):
    base = {"structure": "monarch", "precision": "int8", "max_error": None, "max_output_error": None, "min_size": 0,
            "calibration": cal, "target": target, "verify": False, "seed": 0}
    return OptimizeConfig(**{**base, **kw})


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_distillation_lowers_the_output_error(tmp_path, name, target):
    model = MODELS[name]()
    cal, data = _files(tmp_path, model)
    test = dm.inputs(model, 128, seed=3)             # held out: neither calibration nor distillation data
    ref = session(model).run(None, test)
    planned, _ = bfc.optimize(model, _cfg(cal, target))
    distilled, report = bfc.optimize(model, _cfg(cal, target, distill=data, distill_steps=100, distill_lr=3e-3))
    before = _rel(session(planned).run(None, test), ref)
    after = _rel(session(distilled).run(None, test), ref)
    assert after <= DISTILL_GAIN * before, (before, after)
    assert any(n.startswith("distill: whole-model output error") for n in report.notes)
    assert all("distilled" in (row.note or "") for row in report.layers if row.reason is None)
    assert report.model_bytes_after == pytest.approx(bfc.optimize(model, _cfg(cal, target))[1].model_bytes_after,
                                                     rel=0.01)


def test_distillation_that_hurts_keeps_the_plans(tmp_path):
    model = dm.mlp()
    cal, data = _files(tmp_path, model)
    planned, _ = bfc.optimize(model, _cfg(cal, "portable"))
    kept, report = bfc.optimize(model, _cfg(cal, "portable", distill=data, distill_steps=1, distill_lr=10.0))
    assert any("did not improve; the planned layers were kept" in n for n in report.notes)
    assert planned.SerializeToString() == kept.SerializeToString()


def test_match_and_layernorm_options(tmp_path):
    model = dm.block()
    cal, data = _files(tmp_path, model)
    out, report = bfc.optimize(model, _cfg(cal, "portable", distill=data, distill_steps=20, distill_lr=3e-3,
                                           distill_match=("h",), distill_layernorm=True))
    assert any("LayerNorm trained" in n for n in report.notes)
    ln = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name.startswith("ln")}
    orig = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("ln")}
    assert ln and any(not np.array_equal(ln[k], orig[k]) for k in ln)


def test_match_by_op_type(tmp_path):
    """distill_match op:TYPE names the first output of every node of that type (graph outputs left out)."""
    from bfc.passes.distill import match_tensors
    model = dm.block()
    assert match_tensors(model, ("op:LayerNormalization",)) == ("h",)         # "y" is a graph output
    assert match_tensors(model, ("op:Gelu", "h", "op:LayerNormalization")) == ("f2", "h")
    with pytest.raises(ConfigError, match="no Conv node"):
        match_tensors(model, ("op:Conv",))
    with pytest.raises(ConfigError, match="is no tensor of the graph"):
        match_tensors(model, ("nope",))
    cal, data = _files(tmp_path, model)
    by_type, _ = bfc.optimize(model, _cfg(cal, "portable", distill=data, distill_steps=20, distill_lr=3e-3,
                                           distill_match=("op:LayerNormalization",)))
    by_name, _ = bfc.optimize(model, _cfg(cal, "portable", distill=data, distill_steps=20, distill_lr=3e-3,
                                           distill_match=("h",)))
    assert by_type.SerializeToString() == by_name.SerializeToString()        # the same run (seeded)
    with pytest.raises(ConfigError, match="no Conv node"):
        bfc.optimize(model, _cfg(cal, "portable", distill=data, distill_steps=2, distill_match=("op:Conv",)))


def test_teacher_cache_is_bounded():
    """Teacher outputs are cached only within the byte budget; past it they are recomputed (same values)."""
    from bfc.distill import Teacher
    model = dm.block()
    feeds = dm.inputs(model, 16, seed=4)
    one = sum(v.nbytes for v in session(model).run(None, feeds)) + 16 * 8 * 64 * 4     # outputs + "h"
    unbounded, bounded = Teacher(dm.block(), ("h",)), Teacher(dm.block(), ("h",), cache_bytes=one)
    for k in range(3):
        a, b = unbounded(k, feeds), bounded(k, feeds)
        assert all(np.array_equal(a[n], b[n]) for n in a)
    assert len(unbounded.cache) == 3 and len(bounded.cache) == 1 and bounded.cached_bytes <= one
    assert Teacher(dm.block(), cache_bytes=0)(0, feeds) and not Teacher(dm.block(), cache_bytes=0).cache


def test_config_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="distill_steps"):
        OptimizeConfig(distill_steps=0)
    with pytest.raises(ConfigError, match="distill_lr"):
        OptimizeConfig(distill_lr=-1.0)
    assert OptimizeConfig.from_dict({"distill-match": "a"}).distillation.match == ("a",)
    model = dm.mlp()
    cal, _ = _files(tmp_path, model)
    with pytest.raises(ConfigError, match="does not exist"):
        bfc.optimize(model, _cfg(cal, "portable", distill=tmp_path / "nope.npz"))


def test_batches_cut_padding():
    mask = np.zeros((6, 10), np.int64)
    for i, n in enumerate([3, 5, 2, 4, 1, 2]):
        mask[i, :n] = 1
    data = {"input_ids": mask * 7, "attention_mask": mask}
    bs = batches(data, 3, seed=0)
    assert sum(b["input_ids"].shape[0] for b in bs) == 6
    for b in bs:
        assert b["attention_mask"][:, -1].any() and b["input_ids"].shape == b["attention_mask"].shape


def test_minilm_distill_sentences_are_disjoint_from_evaluation(tmp_path):
    pytest.importorskip("gensim", reason="the sentences come from gensim's bundled corpora")
    sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
    import minilm
    none = {"wordnet": tmp_path / "wordnet", "fortunes": tmp_path / "fortunes"}   # gensim only: no network
    a, facts = minilm.distill_sentences(200, seed=0, folders=none)
    b, _ = minilm.distill_sentences(200, seed=0, folders=none)
    stsb = minilm._stsb_sentences()
    assert not stsb & {minilm._norm(s) for s in a}
    assert a == b and len(set(a)) == 200
    assert all(5 <= len(s.split()) <= 60 for s in a)
    cal = set(minilm.calibration_sentences(48))
    assert not cal & set(a)
    assert facts["pool"] >= 200


@pytest.mark.skipif("work_dir" not in OptimizeConfig.keys(), reason="needs the work_dir option")
def test_checkpoint_resumes(tmp_path):
    model = dm.mlp()
    cal, data = _files(tmp_path, model)
    cfg = _cfg(cal, "portable", distill=data, distill_steps=30, distill_lr=3e-3, work_dir=tmp_path / "work")
    first, _ = bfc.optimize(model, cfg)
    assert len(list((tmp_path / "work").glob("distill-*.pt"))) == 1
    again, report = bfc.optimize(model, cfg)           # resumes at step 30: nothing left to train
    assert first.SerializeToString() == again.SerializeToString()
    assert any("(0 steps" in n for n in report.notes)


# ---- faster float forward, teacher forcing, block-wise reconstruction ----------------------------
MONARCH_TOL = 1e-6      # relative: x @ (K_1 K_2) vs (x @ K_1) @ K_2 differ by float32 summation order only


@pytest.mark.parametrize("m,n,rank", [(96, 48, 2), (64, 64, 1), (48, 96, 3), (384, 384, 4)])
def test_monarch_product_is_the_dense_chain(m, n, rank):
    """monarch_product == the chain's dense matrix (numpy, Chain.to_dense), and the layer's forward and
    gradients through it == those of the per-factor block products (_ks_apply)."""
    from bfc.torch.linear import _ks_apply, monarch_product, monarch_rank
    chain = monarch_chain(m, n, rank=rank)
    p1, p2 = chain.patterns
    assert monarch_rank(p1, p2) == rank
    rng = np.random.default_rng(7)
    vals = [rng.standard_normal(p.value_shape).astype(np.float32) for p in chain.patterns]
    got = monarch_product(p1, torch.from_numpy(vals[0]), p2, torch.from_numpy(vals[1])).numpy()
    ref = chain.to_dense([v.astype(np.float64) for v in vals])
    assert relative_error(ref, got) < MONARCH_TOL
    x = torch.from_numpy(rng.standard_normal((50, m)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((50, n)).astype(np.float32))
    grads = []
    for dense in (True, False):
        v = [torch.from_numpy(a).requires_grad_() for a in vals]
        y = x @ monarch_product(p1, v[0], p2, v[1]) if dense else _ks_apply(p2, v[1], _ks_apply(p1, v[0], x))
        (y * g).sum().backward()
        grads.append([t.grad.numpy() for t in v] + [y.detach().numpy()])
    for a, b in zip(*grads):
        assert relative_error(b.astype(np.float64), a) < MONARCH_TOL


def test_monarch_forward_only_for_float_products():
    q, _ = _layer("int8")
    assert QuantizedKS(q).monarch and not QuantizedKS(q, emulate_rows=True).monarch


def test_forced_tensors_cut_the_graph():
    """force={t: value}: the nodes after t read the value (== the graph run from it, onnxruntime on the
    model whose input is t); capture returns t as computed."""
    model = dm.block()
    feeds = dm.inputs(model, 8, seed=9)
    mod = OnnxModule(model)
    with torch.no_grad():
        free = mod(feeds, capture=("h",))
        h = np.random.default_rng(3).standard_normal(free["h"].shape).astype(np.float32)
        forced = mod(feeds, capture=("h",), force={"h": torch.from_numpy(h)})
    assert torch.equal(forced["h"], free["h"])
    tail = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["h"], [o.name for o in model.graph.output])
    ref = session(tail).run(None, {"h": h})
    assert _rel([forced[o.name].numpy() for o in model.graph.output], ref) <= INTERPRETER_TOL
    assert _rel([forced[o.name].numpy() for o in model.graph.output],
                [free[o.name].numpy() for o in model.graph.output]) > 1e-2


@pytest.mark.parametrize("target", TARGETS)
def test_blockwise_then_end_to_end_lowers_the_output_error(tmp_path, target):
    model = dm.block()
    cal, data = _files(tmp_path, model)
    test = dm.inputs(model, 128, seed=3)
    ref = session(model).run(None, test)
    planned, _ = bfc.optimize(model, _cfg(cal, target))
    kw = {"distill": data, "distill_lr": 3e-3, "distill_match": ("op:LayerNormalization",)}
    blockwise, report = bfc.optimize(model, _cfg(cal, target, distill_steps=1, distill_blockwise_steps=60, **kw))
    assert any("(61 steps (60 block-wise)" in n for n in report.notes), report.notes
    before = _rel(session(planned).run(None, test), ref)
    assert _rel(session(blockwise).run(None, test), ref) <= DISTILL_GAIN * before
    both, _ = bfc.optimize(model, _cfg(cal, target, distill_steps=60, distill_blockwise_steps=40, **kw))
    assert _rel(session(both).run(None, test), ref) <= DISTILL_GAIN * before


def test_blockwise_needs_match(tmp_path):
    model = dm.mlp()
    cal, data = _files(tmp_path, model)
    with pytest.raises(ConfigError, match="distill_blockwise_steps needs distill_match"):
        bfc.optimize(model, _cfg(cal, "portable", distill=data, distill_blockwise_steps=10))
    with pytest.raises(ConfigError, match="distill_blockwise_steps"):
        OptimizeConfig(distill_blockwise_steps=-1, distill_match=("h",))
    cfg = OptimizeConfig.from_dict({"distillation": {"blockwise-steps": 5, "match": ["op:LayerNormalization"]}})
    assert cfg.distillation.blockwise_steps == 5
