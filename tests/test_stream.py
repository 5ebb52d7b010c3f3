"""Streaming load/save (bfc.passes.model_io.stream): the same bytes as an in-memory run, inputs untouched,
an aligned external-data layout above the size limit, and a peak memory below the weights' size."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bfc
from bfc.passes.model_io import files as L
from bfc.passes.model_io import stream as S

CFG = dict(structure="monarch", rank=2, precision="int8", max_error=None, max_output_error=None, workers=1, seed=3)


def fixture_model(with_chain=True) -> onnx.ModelProto:
    """MatMul, Gemm (transB, bias), a Transpose-folded weight, an untouched table read by Gather,
    small constants: every kind of initializer the streaming path handles."""
    rng = np.random.default_rng(7)
    def f(*s):
        return (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    inits = [nh.from_array(f(300, 64), "table"), nh.from_array(f(64, 128), "W1"), nh.from_array(f(64, 64), "B2"),
             nh.from_array(f(64).reshape(64), "c2"), nh.from_array(f(64, 128), "W3t"),
             nh.from_array(np.array([-1, 64], np.int64), "shape")]
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             h.make_node("Reshape", ["e", "shape"], ["x"], name="flat"),
             h.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("Transpose", ["W3t"], ["W3"], name="t3", perm=[1, 0]),
             h.make_node("MatMul", ["r", "W3"], ["b"], name="mm3"),
             h.make_node("Gemm", ["b", "B2", "c2"], ["y"], name="gemm2", transB=1)]
    g = h.make_graph(nodes, "fixture", [h.make_tensor_value_info("ids", T.INT64, ["n"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 64])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("layout", ["embedded", "external"])
def test_streamed_output_is_byte_identical_to_in_memory(tmp_path, layout):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    model = fixture_model()
    if layout == "external":
        onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, str(src))
    inputs = sorted(src.parent.iterdir())
    before = {p.name: (sha(p), p.stat().st_mtime_ns) for p in inputs}
    cfg = bfc.OptimizeConfig(**CFG)
    out = tmp_path / "out.onnx"
    _, report = bfc.optimize(str(src), cfg, output=out)
    assert sum(r.structure != "dense" for r in report.layers) == 3        # mm1, mm3 (folded), gemm2
    assert report.outputs and report.outputs[0].rel_error < 0.5
    in_memory, _ = bfc.optimize(onnx.load(str(src)), cfg)                  # the all-in-memory path
    assert out.read_bytes() == in_memory.SerializeToString()
    returned, _ = bfc.optimize(str(src), cfg)                              # a path, returned in memory
    assert returned.SerializeToString() == in_memory.SerializeToString()
    assert sorted(src.parent.iterdir()) == inputs
    assert {p.name: (sha(p), p.stat().st_mtime_ns) for p in inputs} == before   # the input is never modified


def test_skeleton_holds_references_not_weights(tmp_path):
    src = tmp_path / "model.onnx"
    onnx.save_model(fixture_model(), str(src))
    sk = L.open_skeleton(src)[0]
    refs = {t.name for t in S.refs(sk)}
    assert refs == {"table", "W1", "B2", "W3t"}                 # >= STREAM_MIN bytes; c2 and shape inline
    assert S.proto_size(sk) < 4096
    assert S.model_size(sk, src) == S.proto_size(onnx.load(str(src)))
    np.testing.assert_array_equal(S.file_array(next(t for t in sk.graph.initializer if t.name == "W1"), src).read(),
                                  nh.to_array(fixture_model().graph.initializer[1]))


def test_external_layout_above_the_limit_is_aligned(tmp_path, monkeypatch):
    src = tmp_path / "model.onnx"
    onnx.save_model(fixture_model(), str(src))
    monkeypatch.setattr(L, "PROTO_LIMIT", 20000)
    out = tmp_path / "big.onnx"
    cfg = bfc.OptimizeConfig(**CFG)
    _, report = bfc.optimize(str(src), cfg, output=out)
    data = tmp_path / "big.onnx.data"
    assert data.exists() and out.stat().st_size < 20000
    ext = [t for t in onnx.load(str(out), load_external_data=False).graph.initializer if S.is_ref(t)]
    assert ext and all(S.ref_of(t, out).offset % S.ALIGN == 0 for t in ext)
    assert all(S.ref_of(t, out).length >= S.EXTERNAL_MIN for t in ext)
    in_memory, _ = bfc.optimize(onnx.load(str(src)), cfg)
    got = {t.name: nh.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    want = {t.name: nh.to_array(t) for t in in_memory.graph.initializer}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert report.model_bytes_after == out.stat().st_size + data.stat().st_size


CHILD = r"""
import sys, bfc
cfg = bfc.OptimizeConfig(structure="monarch", rank=4, precision="int8", max_error=None, max_output_error=None,
                         workers=1, verify=False)
bfc.optimize(sys.argv[1], cfg, output=sys.argv[2])
# the peak of this process's own memory since exec (VmHWM): ru_maxrss of a forked child starts from
# its parent's peak at fork time, so it would measure the test runner, not this run
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""

TABLE_ROWS = 120_000      # 120000 x 1024 fp32 = 469 MiB of untouched weights


def test_streamed_peak_memory_is_below_the_weights(tmp_path):
    """A model whose weights (an untouched 469 MiB table + two 1024x1024 layers) exceed what the
    run may hold: the child's peak RSS (VmHWM) stays below the weight bytes."""
    rng = np.random.default_rng(0)
    src = tmp_path / "big.onnx"
    data = tmp_path / "big.onnx.data"
    k = 1024
    inits, offset = [], 0
    with open(data, "wb") as fh:
        for name, rows in (("table", TABLE_ROWS), ("W1", k), ("W2", k)):
            t = T(name=name, data_type=T.FLOAT, dims=[rows, k], data_location=T.EXTERNAL)
            for start in range(0, rows, 8192):
                fh.write((rng.standard_normal((min(8192, rows - start), k)) / 32).astype(np.float32).tobytes())
            t.external_data.add(key="location", value=data.name)
            t.external_data.add(key="offset", value=str(offset))
            t.external_data.add(key="length", value=str(rows * k * 4))
            offset += rows * k * 4
            inits.append(t)
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"]), h.make_node("MatMul", ["e", "W1"], ["a"], name="mm1"),
             h.make_node("MatMul", ["a", "W2"], ["y"], name="mm2")]
    g = h.make_graph(nodes, "big", [h.make_tensor_value_info("ids", T.INT64, ["n"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", k])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    src.write_bytes(m.SerializeToString())
    weights = data.stat().st_size
    out = tmp_path / "out.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    peak = int(proc.stdout.split()[-1])
    assert peak < 0.6 * weights, f"peak RSS {peak / 2**20:.0f} MiB vs weights {weights / 2**20:.0f} MiB"
    table = S.file_array(next(t for t in L.open_skeleton(out)[0].graph.initializer if t.name == "table"), out)
    np.testing.assert_array_equal(table.read()[-3:], np.fromfile(data, np.float32, 3 * k,
                                                                 offset=(TABLE_ROWS - 3) * k * 4).reshape(3, k))


def test_symlinked_model_file(tmp_path):
    """A model file that is a link into another folder (a download cache): its own bytes are read
    through the real file, and the result equals the in-memory run."""
    real = tmp_path / "blobs" / "abc123"
    real.parent.mkdir()
    onnx.save_model(fixture_model(), str(real))
    link = tmp_path / "snapshot" / "model.onnx"
    link.parent.mkdir()
    link.symlink_to(real)
    cfg = bfc.OptimizeConfig(**CFG)
    out = tmp_path / "out.onnx"
    _, report = bfc.optimize(str(link), cfg, output=out)
    assert report.not_verified is None
    assert out.read_bytes() == bfc.optimize(onnx.load(str(real)), cfg)[0].SerializeToString()
