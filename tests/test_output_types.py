"""Graph outputs keep their declared type and shape through every rewrite and opset upgrade (issue 21 item 1),
and a failed check leaves nothing at -o."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bfc
from bfc.cli import main
from bfc.passes import save as save_stage
from bfc.passes.find_sites import BFC_PREFIX

RNG = np.random.default_rng(11)
CFG = bfc.OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0,
                         verify=False)


def _vi(name, shape):
    """A float tensor value_info; ``shape`` None: no shape field, () : an empty shape {} (as paddle2onnx
    writes), else dims (ints, names, or None for an unknown dim)."""
    vi = h.make_tensor_value_info(name, T.FLOAT, None)
    if shape is not None:
        tshape = vi.type.tensor_type.shape
        tshape.SetInParent()
        for d in shape:
            dim = tshape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
    return vi


OUTPUT_FORMS = {"empty shape": (), "unknown dims": (None, None), "symbolic": ("B", 32),
                "fixed": (4, 32), "mixed": ("B", None)}


def _model(out_shape, opset):
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), h.make_node("Relu", ["h"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 64])], [_vi("y", out_shape)],
                     [nh.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "W1"),
                      nh.from_array(RNG.standard_normal((64, 32)).astype(np.float32), "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 7
    return m


@pytest.mark.parametrize("opset", [11, 17, 21])
@pytest.mark.parametrize("form", list(OUTPUT_FORMS))
def test_output_declaration_is_kept(tmp_path, form, opset):
    m = _model(OUTPUT_FORMS[form], opset)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, str(src))
    _, report = bfc.optimize(str(src), CFG, output=out)
    got = onnx.load(str(out))
    assert [o.type for o in got.graph.output] == [o.type for o in m.graph.output]
    assert sum(r.rewritten for r in report.layers) == 2
    onnx.checker.check_model(got)


def test_failed_check_leaves_nothing_at_the_output(tmp_path, monkeypatch):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_model(("B", 32), 17), str(src))

    def broken(path):
        raise RuntimeError("bfc's output fails the ONNX checker (injected); this is a bug in bfc")
    monkeypatch.setattr(save_stage, "check_file", broken)
    with pytest.raises(RuntimeError, match="injected"):
        bfc.optimize(str(src), CFG, output=out)
    assert not out.exists() and not (tmp_path / "o.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_guard_that_cannot_measure_leaves_the_model_unchanged(tmp_path, capsys):
    """No runnable inputs: the default whole-model budget cannot be checked, so nothing is rewritten and the
    reason names --calibration (issue 21 item 3); --no-max-output-error accepts the unmeasured model."""
    m = _model(("B", 32), 17)
    m.graph.input.append(h.make_tensor_value_info("tag", T.STRING, [1]))   # bfc cannot generate strings
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, str(src))
    args = ["optimize", str(src), "-o", str(out), "--structure", "monarch", "--rank", "2", "--no-max-error",
            "--min-size", "0", "--no-verify"]
    assert main(args) == 0
    assert out.read_bytes() == src.read_bytes()
    assert "--calibration" in capsys.readouterr().out
    assert main(args + ["-o", str(tmp_path / "o2.onnx"), "--no-max-output-error"]) == 0
    assert any(n.name.startswith(BFC_PREFIX) for n in onnx.load(str(tmp_path / "o2.onnx")).graph.node)
