"""Bounded calibration statistics: exact Gram up to GRAM_EXACT_MAX, the diagonal beyond (its effect
on the planner's error estimate measured), and grouped passes that give the same statistics."""
import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc.factorize import chain_for, factorize
from bfc.passes import calibrate as C
from bfc.passes.find_sites import find_sites
from bfc.passes.model_io.stream import import_graph

K = 256                 # a moderate width: the exact Gram is cheap, the diagonal is the bounded form
IID_TOLERANCE = 0.05    # independent features: the diagonal estimate within 5% of the exact one


def two_layer_model(k=K, n=64):
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "W1"),
             nh.from_array((rng.standard_normal((n, k)) / np.sqrt(n)).astype(np.float32), "W2"),
             nh.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "W3")]
    nodes = [h.make_node("MatMul", ["x", "W1"], ["a"], name="l1"), h.make_node("MatMul", ["x", "W3"], ["c"], name="l3"),
             h.make_node("MatMul", ["a", "W2"], ["b"], name="l2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", k])],
                     [h.make_tensor_value_info("b", T.FLOAT, ["n", k]), h.make_tensor_value_info("c", T.FLOAT, ["n", n])],
                     inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def stats(model, feeds, **kw):
    sites = find_sites(import_graph(model))
    return C.collect(model, sites, feeds, 8192, 0, **kw)


def test_grouped_passes_give_the_same_statistics():
    model = two_layer_model()
    x = np.random.default_rng(1).standard_normal((40, K)).astype(np.float32)
    one = stats(model, {"x": x}, group_bytes=1 << 40, spill=False)       # every site in one pass
    many = stats(model, {"x": x}, group_bytes=1)                           # one unit per pass, spilled
    assert one.keys() == many.keys() == {"W1", "W2", "W3"}
    for k in one:
        np.testing.assert_array_equal(np.asarray(many[k].gram), one[k].gram)
        np.testing.assert_array_equal(np.asarray(many[k].sample), one[k].sample)
    xx = x.astype(np.float64)
    np.testing.assert_allclose(one["W1"].gram, (xx.T @ xx).astype(np.float32), rtol=1e-5)


def test_wide_inputs_keep_the_diagonal(monkeypatch):
    model = two_layer_model()
    x = np.random.default_rng(1).standard_normal((40, K)).astype(np.float32)
    exact = stats(model, {"x": x}, spill=False)
    monkeypatch.setattr(C, "GRAM_EXACT_MAX", K - 1)
    bounded = stats(model, {"x": x}, spill=False)
    assert bounded["W1"].gram.shape == (K,) and bounded["W2"].gram.shape == (64, 64)
    np.testing.assert_allclose(bounded["W1"].gram, np.diag(exact["W1"].gram), rtol=1e-6)
    np.testing.assert_array_equal(bounded["W2"].gram, exact["W2"].gram)


def test_diagonal_error_estimate_measured():
    """The planner's error estimate ||X E|| / ||X W|| from diag(G) vs from G, for a Monarch fit of a
    K x 64 weight: within IID_TOLERANCE on independent features; on strongly correlated features
    (X = Z A, A mixing every feature) the measured deviation is printed (the approximation's cost)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((K, 64)) / np.sqrt(K)
    w_hat = factorize(w, chain_for("monarch", K, 64, 2)).to_dense()
    z = rng.standard_normal((4096, K))
    e_exact, e_diag = C.diagonal_error(z.T @ z, w, w_hat)
    assert abs(e_diag / e_exact - 1) < IID_TOLERANCE, (e_exact, e_diag)
    a = np.eye(K) + 0.5 * rng.standard_normal((K, K)) / np.sqrt(K)
    xc = z @ a
    c_exact, c_diag = C.diagonal_error(xc.T @ xc, w, w_hat)
    print(f"diagonal Gram: error estimate {e_diag:.4f} vs exact {e_exact:.4f} (independent features), "
          f"{c_diag:.4f} vs {c_exact:.4f} (correlated: {c_diag / c_exact - 1:+.1%})")
    assert np.isfinite(c_diag) and c_diag > 0


def test_shared_input_shares_one_accumulator_and_selection_limits_collection():
    """W1 and W3 both read x: one LayerStats (same object, the exact X^T X); with --include only
    the selected site's statistics are collected."""
    from bfc.config import OptimizeConfig
    model = two_layer_model()
    x = np.random.default_rng(1).standard_normal((40, K)).astype(np.float32)
    both = stats(model, {"x": x}, spill=False)
    assert both["W1"] is both["W3"]
    xx = x.astype(np.float64)
    np.testing.assert_allclose(both["W1"].gram, (xx.T @ xx).astype(np.float32), rtol=1e-5)
    only = stats(model, {"x": x}, spill=False, config=OptimizeConfig(include=("l2",), min_size=0))
    assert only.keys() == {"W2"}
    np.testing.assert_array_equal(only["W2"].gram, both["W2"].gram)
