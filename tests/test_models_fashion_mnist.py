"""models/fashion_mnist.py: one epoch on a subset reaches a sane accuracy; export matches torch."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import fashion_mnist as fm  # noqa: E402

torch = pytest.importorskip("torch", reason="training needs PyTorch (pip install torch==2.13.0)")


@pytest.fixture(scope="module")
def data():
    try:
        xtr, ytr = fm.load("train")
        xte, yte = fm.load("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST absent (apt-get install dataset-fashion-mnist): {e}")
    assert xtr.shape == (60000, 784) and xte.shape == (10000, 784) and xtr.dtype == np.uint8
    assert set(np.unique(ytr)) == set(range(10))
    return xtr[:8000], ytr[:8000], xte[:2000], yte[:2000]


@pytest.fixture(scope="module")
def trained(data):
    xtr, ytr, xte, yte = data
    out = {}
    for kind in ("dense", "ks"):
        model = fm.build_model(kind, seed=0)
        losses = fm.train(model, xtr, ytr, epochs=1, seed=0)
        out[kind] = (model, losses, fm.accuracy(fm.predict(model, xte), yte))
    return out


@pytest.mark.parametrize("kind", ["dense", "ks"])
def test_one_epoch_accuracy(trained, kind):
    _, losses, acc = trained[kind]
    assert np.isfinite(losses[0]) and acc > 0.75, (kind, acc)


def test_ks_model_is_smaller(trained):
    dense, ks = trained["dense"][0], trained["ks"][0]
    assert fm.n_weights(ks) < fm.n_weights(dense) / 3


def test_training_is_seeded(data):
    xtr, ytr, _, _ = data
    a, b = (fm.build_model("ks", seed=3) for _ in range(2))
    la = fm.train(a, xtr[:512], ytr[:512], epochs=1, seed=3)
    lb = fm.train(b, xtr[:512], ytr[:512], epochs=1, seed=3)
    assert la == lb


def test_ks_export_runs_in_onnxruntime(trained, data, tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from bfc.torch import ks_layers_metadata
    model = trained["ks"][0]
    path = fm.export(model, tmp_path / "ks.onnx")
    x = fm.normalize(data[2][:300])
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(logits, fm.predict(model, data[2][:300]), atol=1e-4, rtol=1e-4)
    meta = ks_layers_metadata(path)
    assert [r["module"] for r in meta] == ["0", "2"] and all(r["weight"] for r in meta)
    assert meta[0]["shape"] == [784, 1024] and meta[1]["chainable"]
