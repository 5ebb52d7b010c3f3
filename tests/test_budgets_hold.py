"""Issue 21 items 2, 4, 5: every stated budget holds, slowdowns and extra FLOPs are said, reasons name the
target in use and rotated layers upgrade an opset-17 model to 18 (saying so)."""
from importlib.resources import files

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bfc
from bfc.cli import main
from bfc.factorize import relative_error
from bfc.report import OutputRow, Report

DEMO = str(files("bfc") / "data" / "demo_mlp.onnx")
DATA = dict(np.load(str(files("bfc") / "data" / "demo_data.npz")))


def test_no_max_error_keeps_the_whole_model_budget(tmp_path, capsys):
    """--no-max-error with --max-output-error 0.01: the measured error on fresh images stays within it."""
    out = tmp_path / "o.onnx"
    assert main(["optimize", DEMO, "-o", str(out), "--structure", "monarch", "--rank", "4", "--precision", "int4",
                 "--no-max-error", "--max-output-error", "0.01", "--no-verify", "-q"]) == 0
    x = DATA["test_images"][:256]
    y0 = ort.InferenceSession(DEMO).run(None, {"image": x})[0]
    y1 = ort.InferenceSession(str(out)).run(None, {"image": x})[0]
    assert relative_error(y0, y1) <= 0.01 * 1.5          # bfc measured on its own (generated) inputs


def test_summary_warns_about_flops_and_slowdowns():
    r = Report(model="m", target="ort", objective="size", latency_ms=(1.0, 1.5), outputs=[OutputRow("y", 0.1, 0.99)],
               verified_on="calibration")
    warnings = r.warnings()
    assert any("slower" in w and "--objective size" in w for w in warnings)
    assert "latency 1 -> 1.5 ms" in r.summary() and "output error 0.1" in r.summary()
    assert Report(model="m", target="ort", latency_ms=(1.0, 1.05)).warnings() == []


def _opset17_mlp():
    rng = np.random.default_rng(5)
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), h.make_node("Relu", ["h"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 128])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["B", 64])],
                     [nh.from_array((rng.standard_normal((128, 128)) / 11).astype(np.float32), "W1"),
                      nh.from_array((rng.standard_normal((128, 64)) / 11).astype(np.float32), "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_rotated_layers_upgrade_opset_17_and_say_so(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_opset17_mlp(), str(src))
    _, rep = bfc.optimize(str(src), bfc.OptimizeConfig(structure="rotated", bits=3, max_error=None,
                                                       max_output_error=None, min_size=0, target="portable"),
                          output=out)
    assert all(r.rewritten for r in rep.layers)
    assert any("opset 17 to 18" in n for n in rep.notes)
    assert onnx.load(str(out)).opset_import[0].version == 18


def test_reasons_name_the_target_in_use():
    from bfc.passes.targets import get_target
    assert "target custom-op" in get_target("custom-op").lowbit_support(5, 21) or \
        "custom-op" in get_target("custom-op").lowbit_support(5, 21)
    assert "ort target" in get_target("ort").lowbit_support(3, 17)


def test_other_large_constants_are_reported_with_a_reason():
    """Issue 19 item 4: a large constant that is no MatMul/Gemm weight or Gather table is named in the report."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", ["x", "W"], ["a"], name="mm"), h.make_node("Conv", ["img", "K"], ["c"], name="conv")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 64]),
                                  h.make_tensor_value_info("img", T.FLOAT, [1, 8, 16, 16])],
                     [h.make_tensor_value_info("a", T.FLOAT, [2, 128]), h.make_tensor_value_info("c", T.FLOAT, None)],
                     [nh.from_array(rng.standard_normal((64, 128)).astype(np.float32), "W"),
                      nh.from_array(rng.standard_normal((64, 8, 3, 3)).astype(np.float32), "K")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    _, rep = bfc.optimize(m, bfc.OptimizeConfig(verify=False))
    assert [n for n in rep.notes if n.startswith("constant K [64, 8, 3, 3]") and "Conv" in n]
    assert not [n for n in rep.notes if n.startswith("constant W ")]
