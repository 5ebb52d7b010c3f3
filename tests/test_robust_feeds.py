"""Generated inputs (``random_feeds``) and calibration values (``load_feeds``) on real-shaped models:
one size per dimension name across inputs, declared ranks and types, recurrent states shaped
as their op needs; NaN/inf/huge calibration values rejected in one line, without numpy warnings."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc.errors import ConfigError, ModelError
from bfc.passes.model_io.feeds import MAX_ABS_VALUE, load_feeds, random_feeds

RNG = np.random.default_rng(5)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _run(m, feeds):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def lstm_model(op="LSTM", hidden=6, direction="forward", layout=0, x_from_input=True, state_dims=None,
               seq_lens=False):
    """tokens [batch, seq] -> embedding -> (transpose to [seq, batch, E]) -> op with initial_h/initial_c
    graph inputs whose dims are named independently of the tokens' (the common exporter form)."""
    E, V = 5, 11
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    nd = 2 if direction == "bidirectional" else 1
    inits = [nh.from_array(_w(V, E), "table"), nh.from_array(_w(nd, gates * hidden, E), "W"),
             nh.from_array(_w(nd, gates * hidden, hidden), "R"), nh.from_array(_w(nd, 2 * gates * hidden), "B")]
    nodes = [h.make_node("Gather", ["table", "tokens"], ["emb"])]     # [batch, seq, E]
    if layout == 0:
        nodes.append(h.make_node("Transpose", ["emb"], ["x"], perm=[1, 0, 2]))   # [seq, batch, E]
    else:
        nodes.append(h.make_node("Identity", ["emb"], ["x"]))
    state_dims = state_dims or (["num_dir", "batch", "hidden"] if layout == 0 else ["batch", "num_dir", "hidden"])
    ins = [h.make_tensor_value_info("tokens", T.INT64, ["batch", "seq"])]
    rnn_in = ["x", "W", "R", "B", "seq_lens" if seq_lens else "", "h0"]
    ins.append(h.make_tensor_value_info("h0", T.FLOAT, state_dims))
    if op == "LSTM":
        rnn_in.append("c0")
        ins.append(h.make_tensor_value_info("c0", T.FLOAT, state_dims))
    if seq_lens:
        ins.append(h.make_tensor_value_info("seq_lens", T.INT32, ["batch"]))
    attrs = dict(hidden_size=hidden, direction=direction)
    if layout:
        attrs["layout"] = 1
    nodes.append(h.make_node(op, rnn_in, ["y", "y_h"], **attrs))
    outs = [h.make_tensor_value_info("y", T.FLOAT, None), h.make_tensor_value_info("y_h", T.FLOAT, None)]
    return _model(nodes, ins, outs, inits, opset=14 if layout else 13)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_recurrent_initial_states_follow_the_op(op, direction):
    """The state is [num_directions, batch, hidden_size] with the batch of the op's X (computed
    here, by a Gather and a Transpose), whatever the state's own dim names say."""
    m = lstm_model(op, hidden=6, direction=direction)
    feeds = random_feeds(m, 0)
    nd = 2 if direction == "bidirectional" else 1
    assert feeds["tokens"].shape == (2, 8)
    assert feeds["h0"].shape == (nd, 2, 6)
    if op == "LSTM":
        assert feeds["c0"].shape == (nd, 2, 6)
    y, _ = _run(m, feeds)
    assert y.shape == (8, nd, 2, 6) and np.isfinite(y).all()


def test_recurrent_state_with_unrelated_names():
    """Exporter-style unrelated dim names ('unk__3') on the states: sized from the op, not the names."""
    m = lstm_model("LSTM", hidden=4, direction="bidirectional", state_dims=["unk__1", "unk__2", "unk__3"])
    feeds = random_feeds(m, 1)
    assert feeds["h0"].shape == (2, 2, 4) and feeds["c0"].shape == (2, 2, 4)
    _run(m, feeds)


def test_recurrent_state_batch_first_layout():
    """layout=1 (opset 14): X is [batch, seq, input], the state [batch, num_directions, hidden]
    (onnxruntime's CPU LSTM refuses layout 1, so the shapes are checked against the op's spec)."""
    m = lstm_model("LSTM", hidden=4, layout=1, state_dims=["unk__1", "unk__2", "unk__3"])
    feeds = random_feeds(m, 1)
    assert feeds["tokens"].shape == (2, 8)                  # X = embedding of tokens: [2, 8, E]
    assert feeds["h0"].shape == (2, 1, 4) and feeds["c0"].shape == (2, 1, 4)


def test_recurrent_sequence_lens_are_the_full_length():
    m = lstm_model("GRU", hidden=3, seq_lens=True)
    feeds = random_feeds(m, 2)
    assert feeds["seq_lens"].shape == (2,) and (feeds["seq_lens"] == 8).all()
    _run(m, feeds)


def test_recurrent_x_is_a_graph_input():
    """X itself an input named [seq, batch, E]; the state's batch is named differently ('N')."""
    hidden, E = 5, 3
    inits = [nh.from_array(_w(1, 4 * hidden, E), "W"), nh.from_array(_w(1, 4 * hidden, hidden), "R")]
    m = _model([h.make_node("LSTM", ["x", "W", "R", "", "", "h0", "c0"], ["y"], hidden_size=hidden)],
               [h.make_tensor_value_info("x", T.FLOAT, ["seq", "batch", E]),
                h.make_tensor_value_info("h0", T.FLOAT, [1, "N", hidden]),
                h.make_tensor_value_info("c0", T.FLOAT, ["d", "M", "H"])],
               [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    feeds = random_feeds(m, 0)
    b = feeds["x"].shape[1]
    assert feeds["h0"].shape == (1, b, hidden) and feeds["c0"].shape == (1, b, hidden)
    _run(m, feeds)


def test_shared_dim_names_across_inputs_of_different_rank():
    """'batch' is axis 0 of a rank-2 input and axis 1 of a rank-3 one, 'seq' axis 1 of one and
    axis 0 of another; a rank-1 input shares 'feat' with a rank-4 one: one size per name."""
    nodes = [h.make_node("Transpose", ["b"], ["bt"], perm=[1, 0, 2]),          # [batch, seq, feat]
             h.make_node("Unsqueeze", ["a", "ax2"], ["a3"]),                   # [batch, seq, 1]
             h.make_node("Mul", ["bt", "a3"], ["p"]),
             h.make_node("Add", ["p", "c"], ["q"]),                              # c: [feat]
             h.make_node("Unsqueeze", ["q", "ax0"], ["q4"]),                    # [1, batch, seq, feat]
             h.make_node("Add", ["q4", "d"], ["y"])]                            # d: [1, batch, seq, feat]
    ins = [h.make_tensor_value_info("a", T.FLOAT, ["batch", "seq"]),
           h.make_tensor_value_info("b", T.FLOAT, ["seq", "batch", "feat"]),
           h.make_tensor_value_info("c", T.FLOAT, ["feat"]),
           h.make_tensor_value_info("d", T.FLOAT, [1, "batch", "seq", "feat"])]
    inits = [nh.from_array(np.array([2], np.int64), "ax2"), nh.from_array(np.array([0], np.int64), "ax0")]
    m = _model(nodes, ins, [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    feeds = random_feeds(m, 4)
    assert feeds["a"].shape == (2, 2) and feeds["b"].shape == (2, 2, 8)   # seq is a first axis (of b): 2
    assert feeds["c"].shape == (8,) and feeds["d"].shape == (1, 2, 2, 8)
    (y,) = _run(m, feeds)
    assert y.shape == (1, 2, 2, 8)


def test_declared_types_and_ranks_are_kept():
    """Each element type bfc generates comes back in that type, at the declared rank (a scalar
    input stays a scalar); integer inputs feeding a Gather stay within the table's rows."""
    types = [T.FLOAT, T.FLOAT16, T.DOUBLE, T.INT64, T.INT32, T.INT16, T.INT8, T.UINT8, T.UINT16, T.BOOL]
    ins, outs, nodes = [], [], []
    for i, t in enumerate(types):
        dims = [[], ["n"], ["n", 3], [2, "n", 1]][i % 4]
        ins.append(h.make_tensor_value_info(f"x{i}", t, dims))
        nodes.append(h.make_node("Identity", [f"x{i}"], [f"y{i}"]))
        outs.append(h.make_tensor_value_info(f"y{i}", t, None))
    ins.append(h.make_tensor_value_info("ids", T.INT32, ["n", "m"]))
    nodes.append(h.make_node("Gather", ["tab", "ids"], ["g"]))
    outs.append(h.make_tensor_value_info("g", T.FLOAT, None))
    m = _model(nodes, ins, outs, [nh.from_array(_w(3, 2), "tab")])
    feeds = random_feeds(m, 0)
    for i, t in enumerate(types):
        want = onnx.helper.tensor_dtype_to_np_dtype(t)
        assert feeds[f"x{i}"].dtype == want and feeds[f"x{i}"].ndim == [0, 1, 2, 3][i % 4]
    assert feeds["x3"].shape == (2, 2, 1)                   # 'n' is a first axis elsewhere: 2
    assert feeds["ids"].shape == (2, 8) and feeds["ids"].max() < 3
    _run(m, feeds)


def test_input_without_shape_or_with_unknown_type_is_a_model_error():
    m = _model([h.make_node("Identity", ["x"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, None)],
               [h.make_tensor_value_info("y", T.FLOAT, None)])
    with pytest.raises(ModelError, match="'x' declares no shape.*--calibration"):
        random_feeds(m, 0)
    m = _model([h.make_node("Identity", ["x"], ["y"])], [h.make_tensor_value_info("x", T.STRING, ["n"])],
               [h.make_tensor_value_info("y", T.STRING, None)])
    with pytest.raises(ModelError, match="'x' has an element type bfc cannot generate \\(string\\)"):
        random_feeds(m, 0)


# ---- calibration values ---------------------------------------------------------------------
def _mlp():
    W = _w(16, 16)
    return _model([h.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                  [h.make_tensor_value_info("x", T.FLOAT, ["N", 16]), h.make_tensor_value_info("k", T.INT64, ["N"])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])], [nh.from_array(W, "W")])


@pytest.mark.parametrize("value,shown", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf"), (1e30, "+1e+30"),
                                         (-2e15, "-2e+15")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_calibration_nan_inf_huge_one_line_first_index(tmp_path, value, shown, dtype):
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(dtype)
    if dtype is np.float16 and np.isfinite(value):
        x = x.astype(np.float64)          # a huge value float16 cannot hold: saved as float64
    x[4, 9] = value
    x[5, 1] = value                          # a second bad value: the first one is named
    np.savez(tmp_path / "c.npz", x=x, k=np.arange(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError) as e:
            load_feeds(tmp_path / "c.npz", _mlp())
    msg = str(e.value)
    assert "\n" not in msg and "'x'" in msg and f"holds {shown} at index (4, 9)" in msg
    assert "and 1 more" in msg and f"{MAX_ABS_VALUE:g}" in msg


def test_calibration_bound_is_inclusive_and_integers_checked(tmp_path):
    x = np.zeros((3, 16), np.float64)
    x[1, 2] = MAX_ABS_VALUE                  # the bound itself is accepted
    np.savez(tmp_path / "ok.npz", x=x, k=np.arange(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feeds = load_feeds(tmp_path / "ok.npz", _mlp())
    assert feeds["x"].dtype == np.float32 and feeds["x"][1, 2] == np.float32(MAX_ABS_VALUE)
    xi = np.zeros((3, 16), np.int64)
    xi[2, 15] = 10 ** 16                     # integer data for a float input: huge too
    np.savez(tmp_path / "bad.npz", x=xi, k=np.arange(3))
    with pytest.raises(ConfigError, match=r"holds 10000000000000000 at index \(2, 15\)"):
        load_feeds(tmp_path / "bad.npz", _mlp())


def test_calibration_nan_through_the_cli_is_exit_2_without_warnings(tmp_path):
    """The whole path (load, then nothing else runs): exit 2, one line on stderr, no RuntimeWarning."""
    import subprocess
    import sys
    m = _mlp()
    onnx.save(m, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    x[2, 3] = np.nan
    np.savez(tmp_path / "c.npz", x=x, k=np.arange(8))
    p = subprocess.run([sys.executable, "-W", "error", "-m", "bfc.cli", "optimize", str(tmp_path / "m.onnx"),
                        "-o", str(tmp_path / "o.onnx"), "--calibration", str(tmp_path / "c.npz")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds NaN at index (2, 3)" in lines[0] and "Warning" not in p.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_generated_inputs_that_do_not_run_point_to_calibration():
    """A model whose declared shapes cannot be honoured (a fixed Reshape): the failed run's message
    is addressed to a user who gave no inputs (--calibration), not 'check the input shapes'."""
    from bfc.passes.model_io.session import run
    m = _model([h.make_node("Reshape", ["x", "shape"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, ["N", 5])],
               [h.make_tensor_value_info("y", T.FLOAT, [3, "k"])], [nh.from_array(np.array([3, -1], np.int64), "shape")])
    feeds = random_feeds(m, 0)
    with pytest.raises(ModelError, match="inputs bfc generated.*--calibration FILE.npz"):
        run(m, feeds)
    with pytest.raises(ModelError, match="given inputs.*check the input shapes"):
        run(m, dict(feeds))
