"""Latency objective (bfc.passes.latency): the planner never keeps a rewrite slower than the dense layer.

* a 64x64 layer at batch 1 (one MatMul is a few microseconds; a Monarch rewrite is several
  nodes) stays dense under objective=latency with the reason "slower than dense (x ms vs y ms)",
  and is rewritten under objective=size;
* the measurement models are what the pipeline emits (the rewrite pass on a one-MatMul model)
  and are cached per (shape, structure, precision, target, rows);
* the bundled demo MLP optimized with objective=latency at batch 1 and at batch 256 is no slower
  than the original at that batch (interleaved minimum of samples, generous tolerance: the box
  is shared).
"""
from __future__ import annotations

import re
from importlib.resources import as_file, files

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bfc.config import OptimizeConfig
from bfc.errors import ConfigError
from bfc.passes import latency
from bfc.passes.pipeline import optimize


def _one_layer(m=64, n=64, seed=0):
    w = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", m])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _cfg(**kw):
    return OptimizeConfig(structure="monarch", precision="int8", max_error=None, max_output_error=None,
                          verify=False, **{"target": "portable", **kw})


def test_config_checks():
    assert OptimizeConfig().latency.objective == "size"
    assert OptimizeConfig(objective="LATENCY", latency_batch=4, latency_seq=8).latency.objective == "latency"
    for bad in ({"objective": "speed"}, {"latency_batch": 0}, {"latency_seq": -1}, {"objective": 3}):
        with pytest.raises(ConfigError):
            OptimizeConfig(**bad)


def test_tiny_layer_kept_dense_under_latency_rewritten_under_size():
    model = _one_layer()
    _, rep = optimize(model, _cfg(objective="size"))
    assert rep.layers[0].structure == "monarch"
    latency.clear_cache()
    _, rep = optimize(model, _cfg(objective="latency", latency_batch=1))
    row = rep.layers[0]
    assert row.structure == "dense"
    m = re.fullmatch(r"slower than dense \(([0-9.]+) ms vs ([0-9.]+) ms: .*\)", row.reason)
    assert m and float(m.group(1)) > float(m.group(2))
    key = ((64, 64), "monarch", "int8", "portable", 1, "float32", None)
    assert key in latency._CACHE
    before = dict(latency._CACHE)
    optimize(model, _cfg(objective="latency"))           # measured once per key
    assert latency._CACHE == before


def test_measurement_model_is_the_pipeline_rewrite():
    model = _one_layer(128, 128)
    out, _ = optimize(model, _cfg())
    import onnx_graphsurgeon as gs

    from bfc.passes.find_sites import find_sites
    from bfc.passes.schedule import plan_sites
    from bfc.passes.targets import get_target
    site = find_sites(gs.import_onnx(model))[0]
    plan = plan_sites([site], _cfg(), get_target("portable"), opset=17)[0]
    dense, cand = latency.layer_models(site.weight, plan.weights, plan.structure, plan.precision,
                                       get_target("portable"), rows=4, opset=17)
    assert [n.op_type for n in dense.graph.node] == ["MatMul"]
    assert sorted(n.op_type for n in cand.graph.node) == sorted(n.op_type for n in out.graph.node)
    from bfc.runtime import session
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    np.testing.assert_allclose(session(cand).run(None, {"x": x})[0], session(out).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 256])
def test_demo_mlp_latency_objective_no_slower(tmp_path, batch):
    with as_file(files("bfc") / "data" / "demo_mlp.onnx") as mpath, \
            as_file(files("bfc") / "data" / "demo_data.npz") as dpath:
        original = onnx.load(str(mpath))
        data = np.load(dpath)
    calib = tmp_path / "calibration.npz"
    np.savez(calib, image=data["calib_images"])
    cfg = OptimizeConfig(calibration=calib, max_error=0.2, max_output_error=0.15, objective="latency",
                         latency_batch=batch)
    out, rep = optimize(original, cfg)
    for row in rep.layers:
        assert row.structure == "dense" or "latency" in (row.note or ""), row
    x = data["test_images"][:batch]
    name = original.graph.input[0].name
    assert x.shape[0] == batch and name == "image"
    # the two whole models, interleaved minimum of samples (as the planner measures a layer)
    orig_ms, opt_ms = latency.time_pair(original, out, batch, None, x=x)
    assert opt_ms <= 1.5 * orig_ms + 0.02, (batch, orig_ms, opt_ms, [(r.layer, r.structure, r.reason, r.note)
                                                                      for r in rep.layers])
