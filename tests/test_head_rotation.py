"""passes/head_rotation.py: the output projection's per-head rotation folded into the value projection.

On the fused BERT-like encoder of tests/test_fuse.py: the fold computes the same function (onnxruntime, float32
rounding only), the folded weights are the algebra's (W_v Q, b_v Q, Q^T W_o with Q = I_H (x) P), and the
allocator then gives the output projections no rotation of their own: two MatMuls fewer per attention.
"""
import numpy as np
import pytest
from onnx import numpy_helper

import bfc
from bfc.config import OptimizeConfig
from bfc.lowbit.kron_rotation import KroneckerRotation
from bfc.passes.fuse import fuse_stage
from bfc.passes.head_rotation import fold_head_rotations
from bfc.passes.load import load
from bfc.passes.normalize import normalize
from bfc.passes.pipeline import run_passes

pytest.importorskip("onnxruntime.transformers.optimizer")
from test_fuse import HEADS, HIDDEN, LAYERS, _bert_like, _feed, _run  # noqa: E402

FOLD_TOL = 1e-5          # relative: the folded model against the fused one (float32 rounding of the new weights)


@pytest.fixture(scope="module")
def fused():
    loaded = fuse_stage(normalize(load(_bert_like(), None), 18), True, "ort")
    assert any(n.op_type == "MultiHeadAttention" for n in loaded.model.graph.node)
    return loaded


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_fold_is_exact_and_is_the_algebra(fused):
    folded = fold_head_rotations(fused, True, seed=3)
    assert len(folded.prerotated) == LAYERS and folded.upgraded
    feed = _feed()
    for a, b in zip(_run(fused.model, feed), _run(folded.model, feed)):
        assert np.linalg.norm(a - b) <= FOLD_TOL * np.linalg.norm(a)
    before, after = _inits(fused.model), _inits(folded.model)
    q = KroneckerRotation.block_diagonal(HIDDEN, HIDDEN // HEADS, 3)
    changed = sorted(n for n in before if not np.array_equal(before[n], after[n]))
    assert len(changed) == 3 * LAYERS                     # W_v, b_v, W_o per attention, nothing else
    dense = q.to_dense()
    for n in changed:
        w0, w1 = before[n].astype(np.float64), after[n].astype(np.float64)
        want = [w0 @ dense, dense.T @ w0] if w0.ndim == 2 else [w0 @ dense]
        assert min(np.abs(w1 - x).max() for x in want) <= 1e-6 * np.abs(w0).max()
    assert fold_head_rotations(fused, False, 3) is fused   # off: the model as it is


def test_allocator_gives_output_projections_no_rotation(tmp_path):
    """bfc optimize (the allocator, ort): the output projections' forms carry no rotation, the attention outputs
    feed no rotation MatMul in the written model, and the verified output error is within the budget."""
    model = _bert_like()
    np.savez(tmp_path / "cal.npz", **_feed(batch=16, seq=11, seed=5))
    cfg = OptimizeConfig(calibration=tmp_path / "cal.npz", min_size=0, seed=0, max_output_error=0.2)
    planned = run_passes(model, cfg)
    assert len(planned.loaded.prerotated) == LAYERS
    readers = [p for p in planned.plans if p.rewritten and p.site.nodes[0].input in planned.loaded.prerotated]
    assert len(readers) == LAYERS
    assert all(getattr(p.weights, "rotation", None) is None for p in readers)
    assert any(getattr(p.weights, "codes", None) is not None for p in readers), [p.precision for p in readers]
    out, rep = bfc.optimize(model, cfg)
    assert any(n.startswith("head rotations:") for n in rep.notes), rep.notes
    assert max(o.rel_error for o in rep.outputs) <= 0.2
    mha = [n.output[0] for n in out.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == LAYERS
    for name in mha:
        assert {n.op_type for n in out.graph.node if name in n.input} <= {"DynamicQuantizeLinear", "MatMulInteger",
                                                                         "MatMul", "Reshape"}
        assert not any(n.op_type == "Reshape" for n in out.graph.node if name in n.input)
