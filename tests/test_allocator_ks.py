"""The allocator's KS-chain candidates (``passes.candidates._ks_forms``): offered where a weight has KS
structure and chosen when they are the smallest that keeps the budget; pruned where they cannot help."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bfc.config import OptimizeConfig
from bfc.factorize import chain_for, relative_error
from bfc.passes.pipeline import run_passes
from bfc.runtime import library_path

K = 256
BUDGET = 0.2            # the default whole-model budget (config.DEFAULT_MAX_OUTPUT_ERROR)


def _model(tmp_path, monarch: bool):
    """Two chained 256x256 MatMuls whose weights are exact Monarch rank-1 products (``monarch``) or dense
    Gaussian; calibration inputs N(0, I)."""
    rng = np.random.default_rng(7)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        if monarch:
            ch = chain_for("monarch", K, K, 1)
            w = ch.to_dense(ch.random_values(rng))
        else:
            w = rng.standard_normal((K, K))
        inits.append(numpy_helper.from_array((w / np.linalg.norm(w, 2)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", K])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    path, cal = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(m, str(path))
    xs = rng.standard_normal((64, K)).astype(np.float32)
    np.savez(cal, x=xs)
    return path, cal, xs


def _run(model, xs):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library_path()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": xs})[0]


@pytest.mark.parametrize("target", ["ort", "portable", "custom-op"])
def test_monarch_weights_get_a_monarch_candidate(tmp_path, target):
    path, cal, xs = _model(tmp_path, monarch=True)
    done = run_passes(str(path), OptimizeConfig(calibration=cal, target=target, min_size=0))
    for p in done.plans:
        assert any(a[0].startswith("monarch") for a in p.alternatives), p.alternatives
        assert p.rewritten and p.precision.startswith("monarch"), (p.precision, p.reason)
        assert p.bytes_after < p.bytes_before / 20          # a rank-1 Monarch of 256x256: 1/8 of the values
    ref = _run(onnx.load(str(path)), xs)
    got = _run(done.output, xs)
    err = relative_error(ref, got)
    assert err <= BUDGET, err


def test_dense_weights_prune_the_ks_family(tmp_path):
    """Gaussian weights have no KS structure (the best Monarch chain loses most of the output): the family is
    pruned after one factorization and the allocator picks from the other families."""
    path, cal, _ = _model(tmp_path, monarch=False)
    done = run_passes(str(path), OptimizeConfig(calibration=cal, min_size=0))
    for p in done.plans:
        assert not any(a[0].startswith("monarch") for a in p.alternatives), p.alternatives
        assert p.rewritten and not p.precision.startswith("monarch")
