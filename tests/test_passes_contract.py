"""Pass contracts, the one pipeline, and one-way dependencies (core <- passes <- front door)."""
import ast
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

import bfc
from bfc.cli import main
from bfc.config import OptimizeConfig
from bfc.passes.contract import ContractError
from bfc.passes.pipeline import PASSES, State
from bfc.passes.targets import get_target

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)
CFG = OptimizeConfig(structure="monarch", rank=2, max_error=None, min_size=0, verify=False)


def two_layer_model():
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), h.make_node("Relu", ["h"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["B", 32])],
                     [nh.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "W1"),
                      nh.from_array(RNG.standard_normal((64, 32)).astype(np.float32), "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_each_pass_checks_requires_and_records_ensures():
    m = two_layer_model()
    before = m.SerializeToString()
    state = State(CFG, get_target("portable"), m, lambda e: None)
    for i, (stage, p) in enumerate(PASSES):
        if p.contract.requires:             # called too early: the contract refuses
            early = State(CFG, get_target("portable"), m, lambda e: None)
            with pytest.raises(ContractError, match=p.name):
                p(early)
        result = p(state)
        assert p.contract.ensures <= state.facts
        if not p.contract.in_place:         # only in-place passes touch the graph; none touches the input
            assert m.SerializeToString() == before
        if stage == "rewrite":
            assert result.changed and set(result.skipped) == set()
    assert state.output is not m and m.SerializeToString() == before


def test_skipped_sites_carry_reasons():
    m = two_layer_model()
    state = State(CFG.replace(exclude=("mm2",)), get_target("portable"), m, lambda e: None)
    results = {stage: p(state) for stage, p in PASSES}
    assert results["plan"].skipped == {"mm2": "matched by --exclude mm2"}
    assert results["rewrite"].changed


def test_cli_and_api_write_identical_bytes(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(two_layer_model().SerializeToString())
    assert main(["optimize", str(src), "-o", str(tmp_path / "cli.onnx"), "--structure", "monarch", "--rank", "2",
                 "--no-max-error", "--min-size", "0", "-q"]) == 0
    model, report = bfc.optimize(src, CFG.replace(verify=True))
    bfc.save(model, tmp_path / "api.onnx")
    assert (tmp_path / "cli.onnx").read_bytes() == (tmp_path / "api.onnx").read_bytes()
    assert report.verified_on == "random" and 0 < report.outputs[0].rel_error < 1.0   # random weights: lossy


def test_events_are_typed():
    from bfc.passes.events import LayerPlanned, SitesFound, StageStarted
    events = []
    bfc.optimize(two_layer_model(), CFG, on_event=events.append)
    assert [e.stage for e in events if isinstance(e, StageStarted)][:3] == ["load", "normalize", "sites"]
    assert [e for e in events if isinstance(e, SitesFound)] == [SitesFound(2, 2)]
    assert [e.done for e in events if isinstance(e, LayerPlanned)] == [1, 2]


CORE = ("bfc/ks", "bfc/factorize", "bfc/quant", "bfc/lowbit", "bfc/config.py", "bfc/errors.py", "bfc/ops.py",
        "bfc/runtime.py", "bfc/report.py", "bfc/reconstruct.py")
FRONT = ("bfc.api", "bfc.cli", "bfc.study", "bfc.torch")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("layer,forbidden", [(CORE, ("bfc.passes",) + FRONT), (("passes",), FRONT)])
def test_dependencies_point_one_way(layer, forbidden):
    files = [f for part in layer for f in ((ROOT / part).rglob("*.py") if (ROOT / part).is_dir() else [ROOT / part])]
    assert files
    bad = [(str(f.relative_to(ROOT)), mod) for f in files for mod in _imports(f)
           if any(mod == x or mod.startswith(x + ".") for x in forbidden)]
    assert bad == []
