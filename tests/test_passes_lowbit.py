"""The rotated low-bit family through the pipeline: plan -> rewrite (portable, ort) -> onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bfc
from bfc.config import OptimizeConfig
from bfc.errors import ConfigError
from bfc.factorize import relative_error
from bfc.lowbit import RotatedLayer
from bfc.passes.pipeline import run_passes

K, N, T = 96, 80, 6          # K = 3 * 2^5: a 3x3 block stage and five butterfly stages


def _model(tmp_path, names=("q", "k", "v"), inputs=1, opset=20, outliers=False, seed=0):
    """``inputs`` tensors x0.. of shape [b, T, K]; MatMul(x, W_n) for each weight (x1 for "w" when there are
    two inputs, else x0), outputs summed."""
    rng = np.random.default_rng(seed)
    ws = {}
    for n in names:
        w = rng.standard_normal((K, N)) * 0.05
        if outliers:                                   # a few rows with huge weights: group scales blow up
            w[rng.choice(K, 3, replace=False)] *= 25.0
        ws[n] = w.astype(np.float32)
    nodes, outs = [], []
    for j, n in enumerate(names):
        x = "x1" if n == "w" and inputs > 1 else "x0"
        nodes.append(helper.make_node("MatMul", [x, n], [f"y_{n}"], name=f"mm_{n}"))
        outs.append(f"y_{n}")
    acc = outs[0]
    for j, o in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [acc, o], [f"s{j}"], name=f"add{j}"))
        acc = f"s{j}"
    nodes.append(helper.make_node("Identity", [acc], ["y"], name="out"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["b", T, K])
                                       for i in range(inputs)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", T, N])],
                          [numpy_helper.from_array(w, n) for n, w in ws.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    x = {}
    for i in range(inputs):
        v = rng.standard_normal((24, T, K)).astype(np.float32)
        v[..., rng.choice(K, 4, replace=False)] *= 8.0          # outlier channels in the activations
        x[f"x{i}"] = v
    np.savez(tmp_path / "cal.npz", **x)
    return path, tmp_path / "cal.npz", x


def _cfg(cal, **kw):
    base = {"structure": "rotated", "calibration": cal, "max_error": 10.0, "max_output_error": None, "min_size": 0, "verify": False}
    return OptimizeConfig(**{**base, **kw})


def _run(model: onnx.ModelProto, feeds):
    """The model in a plain onnxruntime session (no bfc library registered)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_onnxruntime_computes_the_planned_layer(tmp_path, target, bits):
    path, cal, x = _model(tmp_path, names=("q",))
    st = run_passes(str(path), _cfg(cal, bits=bits, target=target, correction_rank=4 if bits == 3 else 0))
    (plan,) = st.plans
    layer = plan.weights
    assert isinstance(layer, RotatedLayer) and plan.structure == "rotated"
    q = layer.rotation.to_dense()
    assert np.abs(q.T @ q - np.eye(K)).max() < 5e-3           # fp16-stored 3x3 blocks; stages exactly orthogonal
    got = _run(st.output, x)
    want = layer.apply(x["x0"].reshape(-1, K)).reshape(got.shape)
    assert relative_error(want, got) < 1e-5
    ops = {n.op_type for n in st.output.graph.node}
    assert ("MatMulNBits" in ops) == (target == "ort" and bits != 3)


def test_rotation_beats_plain_int4_with_outliers(tmp_path):
    """Planted outlier weight rows: rotated int4 (Hadamard-like butterfly + GPTQ) vs onnxruntime's own RTN
    int4 (MatMulNBits, same block size), output error end to end in onnxruntime."""
    from bfc.study.baselines import nbits
    path, cal, x = _model(tmp_path, names=("q",), outliers=True)
    ref = _run(onnx.load(str(path)), x)
    st = run_passes(str(path), _cfg(cal, bits=4, group_size=64, target="ort"))
    rot = _run(st.output, x)
    plain = _run(onnx.load(str(nbits(path, tmp_path / "plain.onnx", bits=4, block_size=64))), x)
    e_rot = relative_error(ref, rot)
    e_plain = relative_error(ref, plain)
    assert e_rot * 3.0 < e_plain, (e_rot, e_plain)


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_one_rotation_per_input_tensor(tmp_path, target):
    """Q, K, V read x0 and W reads x1: two rotations (Cos nodes: one per butterfly stage), counted once each."""
    path, cal, x = _model(tmp_path, names=("q", "k", "v", "w"), inputs=2)
    st = run_passes(str(path), _cfg(cal, bits=4, target=target))
    layers = [p.weights for p in st.plans]
    assert layers[0].rotation is layers[1].rotation is layers[2].rotation
    assert layers[3].rotation is not layers[0].rotation
    stages = len(layers[0].rotation.params.angles)
    assert stages == 5
    ops = [n.op_type for n in st.output.graph.node]
    assert ops.count("Cos") == 2 * stages and ops.count("ReduceSum") == 2      # one 3x3 block stage per rotation
    assert [lay.owns_rotation for lay in layers] == [True, False, False, True]
    got = _run(st.output, x)
    want = sum(lay.apply(x[f"x{0 if i < 3 else 1}"].reshape(-1, K)) for i, lay in enumerate(layers))
    assert relative_error(want.reshape(got.shape), got) < 1e-5


@pytest.mark.parametrize("target", ["portable", "ort", "custom-op"])
def test_report_bytes_are_the_initializers_written(tmp_path, target):
    path, cal, _x = _model(tmp_path, names=("q", "k"))
    out = tmp_path / "out.onnx"
    _, report = bfc.optimize(str(path), _cfg(cal, bits=4, target=target, correction_rank=8), output=out)
    m = onnx.load(str(out))
    payload = overhead = 0
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in ("q", "k"):
            continue
        if a.dtype in (np.int64, np.int32) or a.size == 1:   # shapes, slice bounds, scalar constants
            overhead += a.nbytes
        else:
            payload += a.nbytes
    assert payload == sum(r.bytes_after for r in report.layers)
    assert overhead < 0.05 * payload
    # and the layer's bytes are what the planner said: b bits per code + fp16 scales + int8 correction + rotation
    lay = report.layers[0]
    assert lay.bytes_after < 0.3 * lay.bytes_before


def test_custom_op_emits_the_family_as_one_node(tmp_path):
    """custom-op: one ai.bfc.LowBitMatMul per layer (rotation fused; tests/test_custom_op_lowbit.py runs it)."""
    path, cal, _ = _model(tmp_path, names=("q",))
    st = run_passes(str(path), _cfg(cal, target="custom-op"))
    (plan,) = st.plans
    assert plan.rewritten and plan.structure == "rotated"
    ops = [n.op_type for n in st.output.graph.node]
    assert ops.count("LowBitMatMul") == 1 and "Cos" not in ops and "MatMul" not in ops


def test_auto_chooses_rotated_int4_when_it_is_smallest(tmp_path):
    """A dense random layer has no KS structure: the allocator (precision=auto + structure=auto) takes the
    smallest rotated low-bit candidate within the per-layer cap."""
    path, cal, _x = _model(tmp_path, names=("q",))
    cfg = OptimizeConfig(structure="auto", precision="auto", max_error=0.12, max_output_error=None, min_size=0,
                         calibration=cal, target="ort", verify=False)
    st = run_passes(str(path), cfg)
    (plan,) = st.plans
    assert plan.precision.startswith("rotated int"), (plan.structure, plan.precision, plan.reason)
    assert plan.error <= 0.12 and plan.bytes_after < plan.bytes_before / 4
    cfg_op = cfg.replace(target="custom-op")                   # scored with its kernel's int8 activations
    (plan_op,) = run_passes(str(path), cfg_op).plans
    assert plan_op.precision.startswith("rotated int") and plan_op.error <= 0.12


def test_config_validates_the_family_keys():
    with pytest.raises(ConfigError, match="bits"):
        OptimizeConfig(bits=5)
    with pytest.raises(ConfigError, match="group_size"):
        OptimizeConfig(group_size=48)
    cfg = OptimizeConfig.from_dict({"structure": "rotated", "bits": 3, "group-size": 128, "learn-rotation": True,
                                    "correction-rank": 8})
    assert (cfg.lowbit.bits, cfg.lowbit.group_size, cfg.lowbit.learn_rotation, cfg.lowbit.correction_rank) == (3, 128, True, 8)


def test_cli_structure_rotated(tmp_path):
    from bfc.cli import main
    path, cal, x = _model(tmp_path, names=("q",))
    out = tmp_path / "cli.onnx"
    rc = main(["optimize", str(path), "-o", str(out), "--structure", "rotated", "--bits", "2", "--target", "ort",
               "--calibration", str(cal), "--max-error", "10", "--no-max-output-error", "--min-size", "0", "-q"])
    assert rc == 0
    m = onnx.load(str(out))
    assert any(n.op_type == "MatMulNBits" for n in m.graph.node)
    assert _run(m, x).shape == (24, T, N)
