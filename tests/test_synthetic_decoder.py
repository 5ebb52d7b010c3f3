"""models/synthetic_decoder.py: a tiny decoder runs in onnxruntime and matches a numpy
forward of the weights read back from its external-data file."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ort = pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from synthetic_decoder import EPS, MASK, build  # noqa: E402

from bfc.factorize import relative_error  # noqa: E402

REL = 1e-4           # float32 onnxruntime vs float64 numpy, 2 layers
LAYERS, HIDDEN, FFN, VOCAB, HEADS = 2, 64, 128, 100, 4


def rmsnorm(h, g):
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + EPS) * g


def numpy_forward(w, ids):
    h = w["model.embed_tokens.weight"][ids]
    b, s, _ = h.shape
    hd = HIDDEN // HEADS
    causal = np.triu(np.full((s, s), MASK), k=1)
    for l in range(LAYERS):
        p = f"layers.{l}"
        x = rmsnorm(h, w[f"{p}.input_layernorm.weight"])
        q, k, v = (np.moveaxis((x @ w[f"{p}.self_attn.{n}_proj.weight"]).reshape(b, s, HEADS, hd), 2, 1)
                   for n in "qkv")
        sc = q @ np.swapaxes(k, -1, -2) / np.sqrt(hd) + causal
        sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
        a = (sc / sc.sum(axis=-1, keepdims=True)) @ v
        h = h + np.moveaxis(a, 1, 2).reshape(b, s, HIDDEN) @ w[f"{p}.self_attn.o_proj.weight"]
        x = rmsnorm(h, w[f"{p}.post_attention_layernorm.weight"])
        g = x @ w[f"{p}.mlp.gate_proj.weight"]
        h = h + (g / (1 + np.exp(-g)) * (x @ w[f"{p}.mlp.up_proj.weight"])) @ w[f"{p}.mlp.down_proj.weight"]
    return rmsnorm(h, w["model.norm.weight"]) @ w["lm_head.weight"]


def test_tiny_decoder_matches_numpy(tmp_path):
    path = build(tmp_path / "dec.onnx", LAYERS, HIDDEN, FFN, VOCAB, HEADS, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx", "dec.onnx.data"]
    header = onnx.load(str(path), load_external_data=False)
    assert header.ir_version <= 10 and header.opset_import[0].version == 17
    big = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(big) == 1 + LAYERS * 9 + 2                      # every weight and gain is external
    model = onnx.load(str(path))
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    # scaled ~ 1/sqrt(fan_in)
    assert abs(w["layers.0.mlp.down_proj.weight"].std() * np.sqrt(FFN) - 1) < 0.05
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids})[0]
    assert got.shape == (2, 7, VOCAB) and np.isfinite(got).all()
    ref = numpy_forward(w, ids)
    assert relative_error(ref, got) < REL
    # causal: the first position does not see later tokens
    ids2 = ids.copy()
    ids2[:, 3:] = (ids2[:, 3:] + 1) % VOCAB
    got2 = sess.run(None, {"input_ids": ids2})[0]
    np.testing.assert_allclose(got2[:, :3], got[:, :3], rtol=1e-5, atol=1e-5)


def test_same_seed_same_bytes(tmp_path):
    a = build(tmp_path / "a.onnx", 1, 32, 48, 50, 2, seed=5)
    b = build(tmp_path / "b.onnx", 1, 32, 48, 50, 2, seed=5)
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    assert a.stat().st_size > 0 and b.stat().st_size > 0
