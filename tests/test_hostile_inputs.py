"""Hostile files: one line on stderr, exit 2, no traceback, no input changed."""
import hashlib
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc.cli import main

RNG = np.random.default_rng(11)


def _model(weight):
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["B", 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["B", 64])], [weight])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _weight():
    return nh.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "W")


def _digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _external(folder, location="p.bin"):
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_model(_weight()), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return folder / "m.onnx"


def case(name, tmp_path):
    if name == "dims_larger_than_data":
        t = onnx.TensorProto(name="W", data_type=T.FLOAT, dims=[100000, 100000])
        t.raw_data = b"\0" * 16
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "m.onnx").write_bytes(_model(t).SerializeToString())
        return tmp_path / "in" / "m.onnx", tmp_path / "out.onnx", "too small"
    if name == "truncated_tensor":
        t = onnx.TensorProto(name="W", data_type=T.FLOAT, dims=[64, 64])
        t.raw_data = _weight().raw_data[:100]
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "m.onnx").write_bytes(_model(t).SerializeToString())
        return tmp_path / "in" / "m.onnx", tmp_path / "out.onnx", "too small"
    if name == "output_onto_external_data":
        src = _external(tmp_path / "in", "weights/params.bin") if (tmp_path / "in" / "weights").mkdir(
            parents=True) is None else None
        return src, tmp_path / "in" / "weights" / "params.bin", "external data"
    if name == "output_link_to_input":
        src = _external(tmp_path / "in")
        os.symlink(src, tmp_path / "link.onnx")
        return src, tmp_path / "link.onnx", "input model"
    if name == "symlinked_external_data":
        outside = _external(tmp_path / "outside")
        (tmp_path / "in").mkdir()
        shutil.copy(outside, tmp_path / "in" / "m.onnx")
        os.symlink(tmp_path / "outside" / "p.bin", tmp_path / "in" / "p.bin")
        return tmp_path / "in" / "m.onnx", tmp_path / "out.onnx", "escapes"
    if name == "missing_external_data":
        src = _external(tmp_path / "in")
        (tmp_path / "in" / "p.bin").unlink()
        return src, tmp_path / "out.onnx", "missing"
    if name == "truncated_external_data":
        src = _external(tmp_path / "in")
        data = (tmp_path / "in" / "p.bin").read_bytes()
        (tmp_path / "in" / "p.bin").write_bytes(data[:1000])
        return src, tmp_path / "out.onnx", ""
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["dims_larger_than_data", "truncated_tensor", "output_onto_external_data",
                                  "output_link_to_input", "symlinked_external_data", "missing_external_data",
                                  "truncated_external_data"])
def test_hostile_file_exits_2_with_one_line(name, tmp_path, capsys):
    src, out, words = case(name, tmp_path)
    before = _digests(tmp_path / "in")
    rc = main(["optimize", str(src), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("bfc: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err
    assert _digests(tmp_path / "in") == before
