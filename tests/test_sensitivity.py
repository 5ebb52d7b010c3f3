"""bfc.passes.sensitivity: one-session sensitivities against brute-force rebuilt models."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bfc.passes.guard import output_error
from bfc.passes.model_io.session import run, session
from bfc.passes.model_io.stream import graphs
from bfc.passes.sensitivity import PerturbedModel, layer_sensitivity, measure_sensitivity, noise

EXACT = 1e-6            # measured vs brute force (float32: the runs agree to the bit here)
FP16 = 0.02            # fp16: measured vs brute force and vs the fp32 model (measured <= 0.005: fp16 output rounding)
ADDITIVITY = 0.15       # |e12^2 / (e1^2 + e2^2) - 1| on the wider MLP (measured 0.02, 0.003, 0.10)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _mlp(dims=(16, 32, 32, 8), dtype=np.float32, seed=0):
    """3 x (MatMul + bias), ReLU between, seeded."""
    rng = np.random.default_rng(seed)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits, nodes, x = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(dtype)
        b = (0.1 * rng.standard_normal(dims[i + 1])).astype(dtype)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]), helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", t, [None, dims[0]])], [helper.make_tensor_value_info("y", t, None)],
                  inits)


def _feeds(n_in, dtype=np.float32, rows=64):
    return {"x": np.random.default_rng(1).standard_normal((rows, n_in)).astype(dtype)}


def _brute(model, feeds, scales: dict, seed=0) -> float:
    """Rebuild ``model`` with W + s * noise(W) as constants; its relative output error."""
    ref = [np.asarray(r, np.float64) for r in run(session(model), feeds)]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for g in graphs(m.graph):
        for t in g.initializer:
            if t.name in scales:
                w = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(w + np.asarray(scales[t.name], w.dtype) * noise(t.name, w, seed), t.name))
    return output_error(ref, run(session(m), feeds))


def _values(model, feeds, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return dict(zip(names, (np.asarray(v, np.float64) for v in run(session(m), feeds, names))))


def _check_brute(model, feeds, res, names):
    for name in names:
        r = res[name]
        assert r.sensitivity is not None, r.reason
        assert _brute(model, feeds, {name: r.scale}) / r.layer_error == pytest.approx(r.sensitivity, rel=EXACT)


def test_mlp_matches_brute_force():
    model, feeds = _mlp(), _feeds(16)
    res = measure_sensitivity(model, ["W0", "W1", "W2"], feeds)
    assert res.groups == 1 and [r.name for r in res.layers] == ["W0", "W1", "W2"]
    _check_brute(model, feeds, res, ["W0", "W1", "W2"])
    # the layer error is the relative output error ||X (s D)|| / ||X W|| at eps, X the layer's input
    acts = _values(model, feeds, ["r0", "r1"])
    for name, x in (("W0", feeds["x"]), ("W1", acts["r0"]), ("W2", acts["r1"])):
        r = res[name]
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).astype(np.float64)
        d = noise(name, w.astype(np.float32)).astype(np.float64)
        assert r.relative_to == "output" and r.reason is None
        assert r.layer_error == pytest.approx(r.scale * np.linalg.norm(x @ d) / np.linalg.norm(x @ w), rel=1e-9)
        assert r.layer_error == pytest.approx(1e-2, rel=1e-6)
        assert 0.3 < r.sensitivity < 3


def test_weight_normalization_and_groups():
    model, feeds = _mlp(), _feeds(16)
    res = measure_sensitivity(model, ["W0", "W1", "W2"], feeds, relative_to="weight")
    for r in res.layers:
        assert r.relative_to == "weight"
        assert r.layer_error == pytest.approx(1e-2, rel=1e-6)
    _check_brute(model, feeds, res, ["W0", "W1", "W2"])
    one = measure_sensitivity(model, ["W0", "W1", "W2"], feeds)
    grouped = measure_sensitivity(model, ["W0", "W1", "W2", "W1"], feeds, max_bytes=1)   # one weight's operands per run
    assert grouped.groups == 3 and len(grouped.layers) == 3
    for a, b in zip(one.layers, grouped.layers):
        assert a.name == b.name and b.sensitivity == pytest.approx(a.sensitivity, rel=EXACT)
    # X of W0 is 64 x 16 float32 = 4096 bytes: then groups of two
    assert measure_sensitivity(model, ["W0", "W1", "W2"], feeds, max_bytes=8192).groups == 2


def test_additivity():
    """Independent perturbations add in quadrature (the allocator's model), to ADDITIVITY."""
    dims = (64, 128, 128, 32)
    model, feeds = _mlp(dims), _feeds(dims[0])
    res = measure_sensitivity(model, ["W0", "W1", "W2"], feeds)
    pm = PerturbedModel(model, ["W0", "W1", "W2"], feeds)
    s = {r.name: r.scale for r in res.layers}
    for a, b in (("W0", "W1"), ("W0", "W2"), ("W1", "W2")):
        e1, e2, e12 = pm.error({a: s[a]}), pm.error({b: s[b]}), pm.error({a: s[a], b: s[b]})
        assert e1 == pytest.approx(res[a].model_error, rel=1e-12)
        assert abs(e12 ** 2 / (e1 ** 2 + e2 ** 2) - 1) < ADDITIVITY
        assert e12 == pytest.approx(_brute(model, feeds, {a: s[a], b: s[b]}), rel=EXACT)


def test_gemm_trans_b():
    rng = np.random.default_rng(2)
    w0 = (rng.standard_normal((24, 16)) / 4).astype(np.float32)         # [out, in]: transB=1
    w1 = (rng.standard_normal((24, 8)) / 5).astype(np.float32)          # [in, out]
    b0 = np.zeros(24, np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W1"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(b0, "b0"), numpy_helper.from_array(w1, "W1")])
    feeds = {"x": rng.standard_normal((32, 16)).astype(np.float32)}
    res = measure_sensitivity(model, ["W0", "W1"], feeds)
    _check_brute(model, feeds, res, ["W0", "W1"])
    x = feeds["x"].astype(np.float64)
    d = noise("W0", w0).astype(np.float64)
    r = res["W0"]
    assert r.relative_to == "output"
    assert r.layer_error == pytest.approx(r.scale * np.linalg.norm(x @ d.T) / np.linalg.norm(x @ w0.astype(np.float64).T),
                                          rel=1e-9)


def test_shared_weight_perturbed_once():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    feeds = _feeds(16)
    res = measure_sensitivity(model, ["W"], feeds)
    _check_brute(model, feeds, res, ["W"])          # both uses see the same W + s D
    r = res["W"]
    x, h = feeds["x"].astype(np.float64), _values(model, feeds, ["r"])["r"]
    d, w64 = noise("W", w).astype(np.float64), w.astype(np.float64)
    want = r.scale * np.sqrt((np.linalg.norm(x @ d) ** 2 + np.linalg.norm(h @ d) ** 2) /
                             (np.linalg.norm(x @ w64) ** 2 + np.linalg.norm(h @ w64) ** 2))
    assert r.layer_error == pytest.approx(want, rel=1e-9)


def test_subgraph_weights_and_unmeasured():
    """An outer weight read inside an If branch and an initializer of the branch: measured, relative to
    the weight norm (the branch's operands cannot be captured); unknown and integer names: None."""
    rng = np.random.default_rng(4)
    wo = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    ws = (rng.standard_normal((16, 8)) / 4).astype(np.float32)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "Wo"], ["t1"]), helper.make_node("MatMul", ["t1", "Ws"], ["t"])],
                             "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(ws, "Ws")])
    other = helper.make_graph([helper.make_node("Slice", ["x", "st", "en", "ax"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    inits = [numpy_helper.from_array(wo, "Wo"), numpy_helper.from_array(np.array([0], np.int64), "st"),
             numpy_helper.from_array(np.array([8], np.int64), "en"), numpy_helper.from_array(np.array([1], np.int64), "ax")]
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16]),
                    helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    feeds = {**_feeds(16), "c": np.array(True)}
    res = measure_sensitivity(model, ["Wo", "Ws", "nope", "st"], feeds)
    _check_brute(model, feeds, res, ["Wo", "Ws"])
    for name in ("Wo", "Ws"):
        assert res[name].relative_to == "weight" and "subgraph" in res[name].reason
    assert res["nope"].sensitivity is None and "no initializer" in res["nope"].reason
    assert res["st"].sensitivity is None and "not a float" in res["st"].reason
    assert layer_sensitivity(model, ["Wo", "nope"], feeds).keys() == {"Wo"}


def test_gather_table_and_other_consumer():
    rng = np.random.default_rng(5)
    table = rng.standard_normal((50, 16)).astype(np.float32)
    w = (rng.standard_normal((8, 16)) / 4).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("Transpose", ["W"], ["wt"]),
             helper.make_node("MatMul", ["h", "wt"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(table, "E"), numpy_helper.from_array(w, "W")])
    feeds = {"ids": rng.integers(0, 50, (2, 5)).astype(np.int64)}
    res = measure_sensitivity(model, ["E", "W"], feeds)
    _check_brute(model, feeds, res, ["E", "W"])
    rows, d = table[feeds["ids"]].astype(np.float64), noise("E", table)[feeds["ids"]].astype(np.float64)
    assert res["E"].relative_to == "output"
    assert res["E"].layer_error == pytest.approx(res["E"].scale * np.linalg.norm(d) / np.linalg.norm(rows), rel=1e-9)
    assert res["W"].relative_to == "weight" and "Transpose" in res["W"].reason


def test_fp16():
    model16, feeds16 = _mlp(dtype=np.float16), _feeds(16, np.float16)
    res16 = measure_sensitivity(model16, ["W0", "W1", "W2"], feeds16)
    w = numpy_helper.to_array(model16.graph.initializer[0])
    assert noise("W0", w).dtype == np.float16
    pm = PerturbedModel(model16, ["W0"], feeds16)
    assert pm.perturbed("W0", 0.01).dtype == np.float16 and pm.ref[0].dtype == np.float64
    for r in res16.layers:
        assert r.layer_error == pytest.approx(1e-2, rel=1e-3)       # s rounded to fp16, the exact eps_l kept
        brute = _brute(model16, feeds16, {r.name: r.scale}) / r.layer_error
        assert brute == pytest.approx(r.sensitivity, rel=FP16)
    res32 = measure_sensitivity(_mlp(), ["W0", "W1", "W2"], _feeds(16))
    for a, b in zip(res16.layers, res32.layers):
        assert a.sensitivity == pytest.approx(b.sensitivity, rel=FP16)


def test_model_untouched_and_initializer_already_an_input():
    model, feeds = _mlp(), _feeds(16)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    model.graph.input.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, list(w1.dims)))   # IR < 4 style
    before = model.SerializeToString()
    res = measure_sensitivity(model, ["W0", "W1"], feeds)
    assert model.SerializeToString() == before
    _check_brute(model, feeds, res, ["W0", "W1"])


def test_checks():
    model, feeds = _mlp(), _feeds(16)
    with pytest.raises(ValueError, match="relative_to"):
        measure_sensitivity(model, ["W0"], feeds, relative_to="input")
    with pytest.raises(ValueError, match="eps"):
        measure_sensitivity(model, ["W0"], feeds, eps=0)
