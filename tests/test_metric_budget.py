"""Accuracy-aware mode: the allocator searches its budget against the user's metric (issue 19 item 3)."""
from importlib.resources import files

import numpy as np
import onnxruntime as ort
import pytest

import bfc
from bfc.cli import main
from bfc.errors import ConfigError

MODEL = str(files("bfc") / "data" / "demo_mlp.onnx")
DATA = dict(np.load(str(files("bfc") / "data" / "demo_data.npz")))


def top1(path) -> float:
    """Top-1 accuracy in percent on the bundled 1000 held-out Fashion-MNIST images."""
    y = ort.InferenceSession(str(path)).run(None, {"image": DATA["test_images"]})[0]
    return 100.0 * float((y.argmax(1) == DATA["test_labels"]).mean())


def test_budget_is_searched_against_the_metric(tmp_path):
    out = tmp_path / "o.onnx"
    drop = 0.5
    calls = []

    def metric(path):
        calls.append(path)
        return top1(path)
    _, report = bfc.optimize(MODEL, bfc.OptimizeConfig(max_metric_drop=drop), output=out, evaluate=metric)
    assert len(calls) >= 3                                  # the input and at least two budgets
    assert top1(MODEL) - top1(out) <= drop                   # measured here, not by bfc
    assert any(n.startswith("accuracy-aware:") for n in report.notes)
    assert report.model_bytes_after < report.model_bytes_before / 4


def test_both_or_neither():
    with pytest.raises(ConfigError, match="both"):
        bfc.optimize(MODEL, bfc.OptimizeConfig(max_metric_drop=0.5))
    with pytest.raises(ConfigError, match="both"):
        bfc.optimize(MODEL, bfc.OptimizeConfig(), evaluate=top1)


def test_cli_evaluate_file_function(tmp_path):
    metric = tmp_path / "metric.py"
    metric.write_text(f"import sys\nsys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})\n"
                      "from test_metric_budget import top1\n\ndef accuracy(path):\n    return top1(path)\n")
    out = tmp_path / "o.onnx"
    assert main(["optimize", MODEL, "-o", str(out), "--evaluate", f"{metric}:accuracy", "--max-metric-drop", "0.5",
                 "-q", "--no-verify"]) == 0
    assert top1(MODEL) - top1(out) <= 0.5
