"""Model inputs a newcomer brings: calibration files with mistakes are one-line ConfigErrors
that name the file, the input and the fix; generated inputs run the model without index errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bfc.errors import ConfigError
from bfc.passes.model_io.feeds import index_bounds, load_feeds, random_feeds

ROWS, TYPES, POS, HID, OUT = 4, 2, 16, 8, 6


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def embedding_model(seed: int = 0) -> onnx.ModelProto:
    """A BERT-like front: word (4 rows), token type (2 rows) and position (16 rows) embeddings,
    the mask as a float multiplier, then a dense layer.  int32 token types pass through Cast and
    Unsqueeze/Reshape before their Gather; the words table is also read by a second Gather."""
    rng = np.random.default_rng(seed)
    word = rng.standard_normal((ROWS, HID)).astype(np.float32)
    word2 = rng.standard_normal((ROWS + 3, HID)).astype(np.float32)      # bound = the smaller table
    types = rng.standard_normal((TYPES, HID)).astype(np.float32)
    pos = rng.standard_normal((POS, HID)).astype(np.float32)
    w = rng.standard_normal((HID, OUT)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["e_word"]),
        helper.make_node("Gather", ["word2", "input_ids"], ["e_word2"]),
        helper.make_node("Cast", ["token_type_ids"], ["tt64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["tt64", "ax0"], ["tt_u"]),
        helper.make_node("Reshape", ["tt_u", "shape_bs"], ["tt_r"]),
        helper.make_node("Gather", ["types", "tt_r"], ["e_type"], axis=0),
        helper.make_node("Gather", ["pos", "position_ids"], ["e_pos"]),
        helper.make_node("Sum", ["e_word", "e_word2", "e_type", "e_pos"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "ax_last"], ["mask_u"]),
        helper.make_node("Mul", ["e", "mask_u"], ["e_masked"]),
        helper.make_node("MatMul", ["e_masked", "w"], ["y"], name="dense"),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    inits = [numpy_helper.from_array(word, "word"), numpy_helper.from_array(word2, "word2"),
             numpy_helper.from_array(types, "types"), numpy_helper.from_array(pos, "pos"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax_last")]
    nodes.insert(0, helper.make_node("Shape", ["input_ids"], ["shape_bs"]))     # (1, b, s) -> (b, s)
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT])],
                  inits)


def test_index_bounds_follow_gathers_through_casts_and_reshapes():
    m = embedding_model()
    assert index_bounds(m) == {"input_ids": ROWS, "token_type_ids": TYPES, "position_ids": POS}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_feeds_run_the_embedding_model(seed):
    m = embedding_model()
    feeds = random_feeds(m, seed)
    assert feeds["input_ids"].dtype == np.int64 and feeds["token_type_ids"].dtype == np.int32
    assert feeds["input_ids"].shape == (2, 8)
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < ROWS
    assert set(np.unique(feeds["token_type_ids"])) <= {0, 1}
    assert feeds["position_ids"].max() < POS
    assert np.array_equal(feeds["attention_mask"], np.ones((2, 8), np.int64))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, feeds)
    assert y.shape == (2, 8, OUT) and np.isfinite(y).all() and np.abs(y).max() > 0
    # the same seed gives the same feeds
    again = random_feeds(m, seed)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_random_feeds_bool_and_bounds_from_shape_inference():
    """A bool input is ones; a Gather whose table is computed (not an initializer) is bounded by
    the inferred table shape; an integer input with no Gather keeps [0, 100)."""
    table = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    nodes = [helper.make_node("Neg", ["table"], ["t"]),                         # computed table: 3 rows
             helper.make_node("Gather", ["t", "ids"], ["g"]),
             helper.make_node("Cast", ["flag"], ["flag_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["flag_f", "count_f"], ["fc"]),
             helper.make_node("Unsqueeze", ["fc", "axes"], ["fcu"]),
             helper.make_node("Mul", ["g", "fcu"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, ["n"]),
                       helper.make_tensor_value_info("flag", TensorProto.BOOL, ["n"]),
                       helper.make_tensor_value_info("count", TensorProto.INT64, ["n"])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
               [numpy_helper.from_array(table, "table"),
                numpy_helper.from_array(np.array([1], np.int64), "axes")])
    feeds = random_feeds(m, 3)
    assert feeds["ids"].max() < 3 and feeds["flag"].dtype == np.bool_ and feeds["flag"].all()
    assert feeds["count"].max() < 100
    (y,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(y, -table[feeds["ids"]] * feeds["count"][:, None])


# ---- calibration files --------------------------------------------------------------------
def _good(n=5, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, ROWS, (n, 8)), "token_type_ids": np.zeros((n, 8), np.int32),
            "position_ids": np.tile(np.arange(8), (n, 1)), "attention_mask": np.ones((n, 8), np.int64)}


def _one_line_error(path, model, *needles) -> str:
    with pytest.raises(ConfigError) as e:
        load_feeds(path, model)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_good_calibration_file_is_cast_and_runs(tmp_path):
    m = embedding_model()
    data = _good()
    data["input_ids"] = data["input_ids"].astype(np.float64)          # integral floats are accepted
    data["token_type_ids"] = data["token_type_ids"].astype(np.int64)  # in-range int64 -> int32
    np.savez(tmp_path / "c.npz", extra=np.zeros(3), **data)
    feeds = load_feeds(tmp_path / "c.npz", m)
    assert set(feeds) == set(data)
    assert feeds["input_ids"].dtype == np.int64 and feeds["token_type_ids"].dtype == np.int32
    (y,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert y.shape == (5, 8, OUT) and np.isfinite(y).all()


@pytest.mark.parametrize("case, needles", [
    ("zero_rows", ["'input_ids'", "empty", "at least one row"]),
    ("float_ids", ["'input_ids'", "int64", "float64", "whole numbers", "astype"]),
    ("out_of_range", ["'token_type_ids'", "int32", "range"]),
    ("rank", ["'attention_mask'", "rank 3", "rank 2"]),
    ("batch", ["'input_ids'", "'position_ids'", "first (batch) dimension", "same number of rows"]),
    ("missing", ["['attention_mask']", "keyed by input name"]),
    ("strings", ["'position_ids'", "numeric"]),
])
def test_bad_calibration_file_is_a_one_line_config_error(tmp_path, case, needles):
    m = embedding_model()
    data = _good()
    if case == "zero_rows":
        data = {k: v[:0] for k, v in data.items()}
    elif case == "float_ids":
        data["input_ids"] = data["input_ids"] + 0.5
    elif case == "out_of_range":
        data["token_type_ids"] = np.full((5, 8), 2 ** 40, np.int64)
    elif case == "rank":
        data["attention_mask"] = data["attention_mask"][:, :, None]
    elif case == "batch":
        data["position_ids"] = data["position_ids"][:3]
    elif case == "missing":
        del data["attention_mask"]
    elif case == "strings":
        data["position_ids"] = np.full((5, 8), "a")
    np.savez(tmp_path / "c.npz", **data)
    _one_line_error(tmp_path / "c.npz", m, *needles)


def test_calibration_path_mistakes(tmp_path):
    m = embedding_model()
    np.save(tmp_path / "ids.npy", _good()["input_ids"])
    _one_line_error(tmp_path / "ids.npy", m, ".npy", "numpy.savez(path, input_ids=..., token_type_ids=...")
    (tmp_path / "folder.npz").mkdir()
    _one_line_error(tmp_path / "folder.npz", m, "is a folder", ".npz file")
    _one_line_error(tmp_path / "nope.npz", m, "does not exist", "--calibration")
    (tmp_path / "empty.npz").write_bytes(b"")
    _one_line_error(tmp_path / "empty.npz", m, "not a readable .npz", "numpy.savez")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04garbage")
    _one_line_error(tmp_path / "torn.npz", m, "not a readable .npz")


def test_calibration_values_for_bool_float16_and_fixed_dims(tmp_path):
    """bool inputs take 0/1 data; float16 inputs reject values beyond its range; a fixed
    non-batch dimension must match."""
    nodes = [helper.make_node("Cast", ["keep"], ["k"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["x", "k"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 4]),
                       helper.make_tensor_value_info("keep", TensorProto.BOOL, ["n", 4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4])], [])
    x = np.random.default_rng(5).standard_normal((3, 4))
    np.savez(tmp_path / "ok.npz", x=x, keep=np.array([[0, 1, 1, 0]] * 3))
    feeds = load_feeds(tmp_path / "ok.npz", m)
    assert feeds["keep"].dtype == np.bool_ and feeds["x"].dtype == np.float16
    (y,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(y, (x * [0, 1, 1, 0]).astype(np.float16), rtol=1e-3)
    np.savez(tmp_path / "b.npz", x=x, keep=np.full((3, 4), 2))
    _one_line_error(tmp_path / "b.npz", m, "'keep'", "0 and 1")
    np.savez(tmp_path / "h.npz", x=x * 1e6, keep=np.ones((3, 4), bool))
    _one_line_error(tmp_path / "h.npz", m, "'x'", "float16")
    np.savez(tmp_path / "d.npz", x=x[:, :3], keep=np.ones((3, 3), bool))
    _one_line_error(tmp_path / "d.npz", m, "'x'", "axis 1", "fixes it to 4", "(3, 4)")
