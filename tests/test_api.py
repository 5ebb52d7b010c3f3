"""bfc.optimize / OptimizeConfig: budgets, reasons, determinism, idempotence, calibration."""
import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bfc
from bfc.config import OptimizeConfig, Precision, Structure
from bfc.errors import ConfigError, UnsupportedError
from bfc.ks import monarch_chain
from bfc.passes.model_io.session import session

RNG = np.random.default_rng(2)
INT8_BUDGET = 0.02        # int8 factors of an exactly-Monarch weight stay within 2% (rtn/optimal scales)


def monarch_weight(m, n, rank=1, noise=0.0):
    ch = monarch_chain(m, n, rank=rank)
    w = ch.to_dense(ch.random_values(RNG))
    return (w + noise * np.abs(w).mean() * RNG.standard_normal(w.shape)).astype(np.float32)


def mlp(w1, w2, names=("fc1", "fc2")):
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["h"], name=names[0]), h.make_node("Relu", ["h"], ["r"]),
                      h.make_node("MatMul", ["r", "W2"], ["y"], name=names[1])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", w1.shape[0]])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", w2.shape[1]])],
                     [nh.from_array(w1, "W1"), nh.from_array(w2, "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_auto_rewrites_structured_layers_and_keeps_random_ones_dense():
    m = mlp(monarch_weight(64, 128, rank=2), RNG.standard_normal((128, 64)).astype(np.float32))
    out, rep = bfc.optimize(m, OptimizeConfig(precision="int8", max_error=0.05, min_size=0))
    a, b = rep.layers
    assert a.rewritten and a.structure.startswith("monarch") and a.precision == "int8" and a.error < 0.05
    assert not b.rewritten and "error budget not met" in b.reason
    assert rep.outputs[0].rel_error < 0.05 and rep.verified_on == "random"
    assert rep.totals()["bytes_after"] < rep.totals()["bytes_before"]


def test_precision_auto_picks_lowest_meeting_budget():
    m = mlp(monarch_weight(64, 64, rank=1), monarch_weight(64, 64, rank=1))
    _, rep = bfc.optimize(m, OptimizeConfig(structure="monarch", rank=1, precision="auto", max_error=0.05, min_size=0))
    assert [r.precision for r in rep.layers] == ["int8", "int8"]
    _, rep = bfc.optimize(m, OptimizeConfig(structure="monarch", rank=1, precision="auto", max_error=1e-5, min_size=0))
    assert [r.precision for r in rep.layers] == ["fp32", "fp32"]     # int8/fp8/fp16 all miss 1e-5


def test_reasons_min_size_include_exclude():
    m = mlp(monarch_weight(64, 64), monarch_weight(64, 64), names=("enc.fc1", "head.fc2"))
    _, rep = bfc.optimize(m, OptimizeConfig(min_size=10_000, verify=False))
    assert all("too small" in r.reason for r in rep.layers)
    _, rep = bfc.optimize(m, OptimizeConfig(min_size=0, exclude=("head.*",), verify=False))
    assert rep.layers[0].rewritten and "exclude" in rep.layers[1].reason
    _, rep = bfc.optimize(m, OptimizeConfig(min_size=0, include=("head.*",), verify=False))
    assert "include" in rep.layers[0].reason and rep.layers[1].rewritten


def test_target_size_stops_compressing():
    m = mlp(monarch_weight(128, 128), monarch_weight(128, 64))
    full = m.ByteSize()
    _, rep = bfc.optimize(m, OptimizeConfig(precision="int8", min_size=0, max_error=0.05, target_size=full - 40_000,
                                                verify=False))
    assert [r.rewritten for r in rep.layers] == [True, False]
    assert "target size" in rep.layers[1].reason


def test_same_input_and_seed_give_identical_bytes():
    m = mlp(monarch_weight(64, 64, noise=0.01), monarch_weight(64, 64, noise=0.01))
    cfg = OptimizeConfig(min_size=0, max_error=0.1, precision="auto")
    a, _ = bfc.optimize(m, cfg)
    b, _ = bfc.optimize(m, cfg)
    assert a.SerializeToString() == b.SerializeToString()


def test_optimizing_twice_does_not_refactorize():
    m = mlp(monarch_weight(64, 64), RNG.standard_normal((64, 64)).astype(np.float32))
    cfg = OptimizeConfig(precision="int8", min_size=0, max_error=0.05, quant_method="rtn")
    once, rep1 = bfc.optimize(m, cfg)
    twice, rep2 = bfc.optimize(once, cfg)
    assert rep1.totals()["rewritten"] == 1 and rep2.totals()["rewritten"] == 0
    assert any("already a bfc layer" in r.reason for r in rep2.layers)
    assert "fc1" in {p.key: p.value for p in twice.metadata_props}["bfc.layers"]
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(session(twice).run(None, {"x": x})[0], session(once).run(None, {"x": x})[0], rtol=1e-6)


def test_calibration_measures_output_error(tmp_path):
    m = mlp(monarch_weight(64, 64, noise=0.05), monarch_weight(64, 64, noise=0.05))
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=RNG.standard_normal((32, 64)).astype(np.float32))
    _, rep = bfc.optimize(m, OptimizeConfig(min_size=0, max_error=0.2, calibration=cal))
    assert rep.verified_on == "calibration"
    assert all(r.error_kind == "output" and r.error <= 0.2 for r in rep.layers)
    np.savez(cal, wrong=np.zeros((2, 64), np.float32))
    with pytest.raises(ConfigError, match="lacks model inputs"):
        bfc.optimize(m, OptimizeConfig(calibration=cal))


def test_input_model_not_modified():
    m = mlp(monarch_weight(64, 64), monarch_weight(64, 64))
    before = m.SerializeToString()
    bfc.optimize(m, OptimizeConfig(min_size=0))
    assert m.SerializeToString() == before


def test_nothing_to_rewrite_is_written_unchanged(tmp_path):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [2])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    out, report = bfc.optimize(m)
    bfc.save(out, tmp_path / "a.onnx")
    bfc.save(m, tmp_path / "plain.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    assert report.rewritten == [] and report.outputs[0].rel_error == 0.0
    with pytest.raises(UnsupportedError, match="nothing to rewrite"):
        bfc.optimize(m, OptimizeConfig(strict=True))


@pytest.mark.parametrize("kw,field", [({"precision": "int2"}, "precision"), ({"structure": "tt"}, "structure"),
                                      ({"rank": 0}, "rank"), ({"max_error": -1.0}, "max_error"),
                                      ({"max_error": float("nan")}, "max_error"), ({"min_size": -5}, "min_size"),
                                      ({"seed": 1.5}, "seed"), ({"include": [""]}, "include")])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        OptimizeConfig(**kw)


def test_config_enums_and_frozen():
    c = OptimizeConfig(structure="MONARCH", precision="fp8-e4m3")
    assert c.structure is Structure.MONARCH and c.precision is Precision.FP8_E4M3
    with pytest.raises(AttributeError):
        c.rank = 3
    with pytest.raises(ConfigError, match="needs a budget"):
        OptimizeConfig(structure="auto", precision="int8", max_error=None)
    with pytest.raises(ConfigError, match="needs a budget"):
        OptimizeConfig(max_output_error=None)            # the allocator: no whole-model or per-layer budget


def test_config_toml(tmp_path):
    p = tmp_path / "bfc.toml"
    p.write_text('structure = "monarch"\nrank = 2\nmax-error = 0.2\nexclude = ["head.*"]\nno-verify = true\n')
    c = OptimizeConfig.from_toml(p, rank=4)
    assert (c.structure, c.rank, c.max_error, c.exclude, c.verification.enabled) == (Structure.MONARCH, 4, 0.2, ("head.*",), False)
    p.write_text("colour = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        OptimizeConfig.from_toml(p)
    p.write_text("rank = = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        OptimizeConfig.from_toml(p)


def test_custom_op_without_its_library_is_written_but_not_verified(monkeypatch):
    """The custom-op model is still a valid result when the library is missing: "not verified: <why>"."""
    from bfc import runtime
    monkeypatch.setattr(runtime, "is_available", lambda: False)
    m = mlp(monarch_weight(64, 64), monarch_weight(64, 64))
    out, report = bfc.optimize(m, OptimizeConfig(target="custom-op", structure="monarch", min_size=0,
                                                 max_output_error=None))
    assert any(n.domain == "ai.bfc" for n in out.graph.node)
    assert report.verified_on is None and "custom-op library" in report.not_verified
    assert "not verified:" in report.table()


def test_unknown_target_names_the_registry():
    with pytest.raises(ConfigError, match="custom-op.*portable"):
        bfc.optimize(mlp(monarch_weight(64, 64), monarch_weight(64, 64)), OptimizeConfig(target="gpu"))
