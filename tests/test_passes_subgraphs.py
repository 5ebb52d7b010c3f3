"""Sites inside If/Loop bodies are rewritten like top-level sites, for both targets.

Weights live in the body (a body initializer) or in the outer scope (a main-graph
initializer the body reads).  The reference is the original model with each rewritten
node reading its plan's dense W_hat (``test_passes_weight_forms.reference_model``); the
optimized model must compute the same function in onnxruntime and in onnx's
ReferenceEvaluator.  Calibration cannot see a body's activations: such sites are planned
with the weight error and their note says so.  A model whose every MatMul is in a body
optimizes end to end (file in, file out, verified).
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from test_passes_weight_forms import CFG, TARGETS, check, model, vi, w

from bfc.cli import main
from bfc.passes.find_sites import NO_CALIBRATION
from bfc.passes.pipeline import optimize


def if_model():
    """then: x @ Wi (a body initializer); else: x @ W (outer scope), then Relu; y = If(cond)."""
    then = h.make_graph([h.make_node("MatMul", ["x", "Wi"], ["z"], name="then_mm")], "then", [],
                        [vi("z", [3, 64])], [nh.from_array(w((64, 64)), "Wi")])
    other = h.make_graph([h.make_node("MatMul", ["x", "W"], ["e"], name="else_mm"), h.make_node("Relu", ["e"], ["z2"])],
                         "else", [], [vi("z2", [3, 64])])
    nodes = [h.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    return model(nodes, [vi("x", [3, 64]), vi("cond", [], T.BOOL)], [vi("y", [3, 64])],
                 [nh.from_array(w((64, 64)), "W")], opset=17)


def loop_model(outer: bool):
    """v <- tanh(v @ W) three times; W in the body or in the outer scope."""
    body_inits = [] if outer else [nh.from_array(w((64, 64)) * 0.2, "Wb")]
    wname = "W" if outer else "Wb"
    body = h.make_graph([h.make_node("MatMul", ["v_in", wname], ["t"], name="body_mm"),
                         h.make_node("Tanh", ["t"], ["v_out"]), h.make_node("Identity", ["c_in"], ["c_out"])],
                        "body", [vi("i", [], T.INT64), vi("c_in", [], T.BOOL), vi("v_in", [3, 64])],
                        [vi("c_out", [], T.BOOL), vi("v_out", [3, 64])], body_inits)
    nodes = [h.make_node("Loop", ["n", "c", "x"], ["y"], name="loop", body=body)]
    inits = [nh.from_array(np.array(3, np.int64), "n"), nh.from_array(np.array(True), "c")]
    if outer:
        inits.append(nh.from_array(w((64, 64)) * 0.2, "W"))
    return model(nodes, [vi("x", [3, 64])], [vi("y", [3, 64])], inits, opset=17)


@pytest.mark.parametrize("target", TARGETS)
def test_if_branches_rewritten(target):
    m = if_model()
    for cond in (True, False):
        out, plans, _ = check(m, {"x": w((3, 64)), "cond": np.array(cond)}, CFG.replace(target=target))
    assert sorted(p.site.name for p in plans if p.rewritten) == ["else_mm", "then_mm"]
    assert all(NO_CALIBRATION in p.note for p in plans)
    bodies = [a.g for a in out.graph.node[0].attribute]
    assert all(n.name.startswith("bfc/") or n.op_type == "Relu" for g in bodies for n in g.node)
    assert not any(t.name == "Wi" for g in bodies for t in g.initializer)


@pytest.mark.parametrize("outer", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_loop_body_rewritten(outer, target):
    out, plans, _ = check(loop_model(outer), {"x": w((3, 64))}, CFG.replace(target=target))
    assert [p.site.name for p in plans if p.rewritten] == ["body_mm"]
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "body")
    assert "MatMul" not in {n.op_type for n in body.node if not n.name.startswith("bfc/")}


@pytest.mark.parametrize("target", TARGETS)
def test_all_matmuls_in_subgraphs_optimize_end_to_end(target, tmp_path):
    """File in, file out, verified; with calibration the body sites say they were not calibrated."""
    src = tmp_path / "if.onnx"
    onnx.save(if_model(), str(src))
    np.savez(tmp_path / "calib.npz", x=w((3, 64)), cond=np.array(True))
    cfg = CFG.replace(target=target, verify=True, calibration=tmp_path / "calib.npz")
    _, report = optimize(src, cfg, output=tmp_path / "out.onnx")
    assert report.not_verified is None
    assert sorted(r.layer for r in report.layers if r.reason is None) == ["else_mm", "then_mm"]
    assert all(NO_CALIBRATION in r.note and r.error_kind == "weight" for r in report.layers)
    domains = {i.domain for i in onnx.load(str(tmp_path / "out.onnx")).opset_import}
    assert ("ai.bfc" in domains) == (target == "custom-op")
    assert main(["optimize", str(src), "-o", str(tmp_path / "cli.onnx"), "--structure", "monarch",
                 "--min-size", "0", "--target", target]) == 0
