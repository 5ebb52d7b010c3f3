"""Safe load and atomic save."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc.errors import ModelError, UnsupportedError
from bfc.passes.model_io import files as L


def tiny(opset=21, ir=None, n=64):
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2, n])], [h.make_tensor_value_info("y", T.FLOAT, [2, n])],
                     [nh.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    if ir is not None:
        m.ir_version = ir
    return m


def write_external(m, folder, location):
    t = m.graph.initializer[0]
    data = nh.to_array(t).tobytes()
    target = (folder / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    t.ClearField("raw_data")
    t.data_location = T.EXTERNAL
    t.external_data.add(key="location", value=location)
    p = folder / "model.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def test_roundtrip_and_ir_cap(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(tiny(ir=14).SerializeToString())   # onnx 1.23's default IR, which onnxruntime 1.31 rejects
    m = L.load_model(src)
    out = L.save_model(m, tmp_path / "out.onnx", src)
    assert onnx.load(str(out)).ir_version <= L.MAX_IR
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bfc-")] == []


def test_external_data_inside_folder_loads(tmp_path):
    p = write_external(tiny(), tmp_path, "weights/w.bin")
    m = L.load_model(p)
    assert m.graph.initializer[0].data_location != T.EXTERNAL


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_external_data_escaping_folder_is_rejected(tmp_path, location):
    inner = tmp_path / "model"
    inner.mkdir()
    m = tiny()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = T.EXTERNAL
    t.external_data.add(key="location", value=location)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64 * 64 * 4)
    p = inner / "model.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="outside|escapes"):
        L.load_model(p)


def test_symlink_escape_is_rejected(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64 * 64 * 4)
    os.symlink(tmp_path / "secret.bin", inner / "w.bin")
    m = tiny()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = T.EXTERNAL
    t.external_data.add(key="location", value="w.bin")
    (inner / "model.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="escapes"):
        L.load_model(inner / "model.onnx")


def test_missing_external_file(tmp_path):
    p = write_external(tiny(), tmp_path, "w.bin")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelError, match="missing"):
        L.load_model(p)


def test_bad_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        L.load_model(tmp_path / "nope.onnx")
    txt = tmp_path / "notes.onnx"
    txt.write_text("hello, this is not a model\n" * 10)
    with pytest.raises(ModelError, match="not an ONNX model"):
        L.load_model(txt)
    full = tiny().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(ModelError, match="not an ONNX model"):
        L.load_model(cut)


def test_opset_range(tmp_path):
    p = tmp_path / "old.onnx"
    p.write_bytes(tiny(opset=6).SerializeToString())
    with pytest.raises(UnsupportedError, match="opset 6"):
        L.load_model(p)


def test_output_path_checks(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(tiny().SerializeToString())
    before = src.read_bytes()
    with pytest.raises(ModelError, match="never overwrites"):
        L.save_model(tiny(), src, src)
    with pytest.raises(ModelError, match="does not exist"):
        L.save_model(tiny(), tmp_path / "no" / "out.onnx", src)
    assert src.read_bytes() == before


def test_large_models_use_external_data(tmp_path, monkeypatch):
    """The >2 GB path, exercised with a lowered limit: external data out, and back in."""
    monkeypatch.setattr(L, "PROTO_LIMIT", 1000)
    out = L.save_model(tiny(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == 64 * 64 * 4
    assert out.stat().st_size < 1000
    m = L.load_model(out)
    np.testing.assert_array_equal(nh.to_array(m.graph.initializer[0]), nh.to_array(tiny().graph.initializer[0]))
