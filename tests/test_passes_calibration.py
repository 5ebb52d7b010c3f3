"""Calibration: every site gets its activations (also when several share one input, as Q/K/V do),
and --reconstruct lowers the planned layers' output error on them."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bfc
from bfc.errors import ConfigError


def qkv_model(tmp_path, m=64, n=64):
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((m, m)) * np.exp(-np.arange(m) / 6)
    nodes, inits = [], [numpy_helper.from_array(mix.astype(np.float32), "mix")]
    nodes.append(helper.make_node("MatMul", ["x", "mix"], ["h"], name="mixer"))
    outs = []
    for name in ("q", "k", "v"):
        inits.append(numpy_helper.from_array((rng.standard_normal((m, n)) / 8).astype(np.float32), f"W{name}"))
        nodes.append(helper.make_node("MatMul", ["h", f"W{name}"], [name], name=f"proj_{name}"))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", n]))
    g = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", m])], outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "qkv.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((256, m)).astype(np.float32))
    return path, calib


def test_sites_sharing_an_input_all_get_activations(tmp_path):
    path, calib = qkv_model(tmp_path)
    cfg = bfc.OptimizeConfig(structure="monarch", rank=2, precision="int8", max_error=None, min_size=0,
                             include=("proj_*",), calibration=calib, verify=False)
    _, report = bfc.optimize(str(path), cfg)
    rows = {r.layer: r for r in report.layers}
    assert {rows[f"proj_{n}"].error_kind for n in "qkv"} == {"output"}


def test_reconstruct_lowers_layer_errors(tmp_path):
    path, calib = qkv_model(tmp_path)
    base = dict(structure="monarch", rank=2, precision="fp8-e4m3", max_error=None, min_size=0,
                include=("proj_*",), calibration=calib, verify=False)
    _, plain = bfc.optimize(str(path), bfc.OptimizeConfig(**base))
    _, rec = bfc.optimize(str(path), bfc.OptimizeConfig(**base, reconstruct=True, reconstruct_steps=60))
    for a, b in zip(plain.layers, rec.layers):
        if a.error is not None:
            assert b.error < a.error, (a.layer, a.error, b.error)
            assert b.note and b.note.startswith("reconstructed")


def test_reconstruct_needs_calibration():
    with pytest.raises(ConfigError, match="calibration"):
        bfc.OptimizeConfig(reconstruct=True)
