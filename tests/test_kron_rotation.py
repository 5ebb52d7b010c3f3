"""Kronecker rotations (bfc.lowbit.kron_rotation) and their graph emission (passes/rotation_emit.py):
index convention vs np.kron, orthogonality, Hadamard factors, storage rounding, the numpy learner,
the duck-typed use in rotate_quantize, and the emitted subgraph in onnxruntime (fp32 and fp16 factors)."""
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from bfc.errors import InvalidInputError
from bfc.factorize import relative_error
from bfc.lowbit import LowBitFormat, quantize_groups, rotate_quantize, weighted_error
from bfc.lowbit.kron_rotation import KroneckerRotation, hadamard, kron_sizes
from bfc.lowbit.rotation import ButterflyRotation
from bfc.passes.graph_builder import GraphBuilder
from bfc.passes.rotation_emit import emit_rotation

SIZES = [96, 384, 768, 1536]
APPLY_TOL = 1e-10
EMIT_RTOL = 1e-5


def outlier_weight(k, n, seed=0):
    """Gaussian W with a few planted outlier rows and entries (what rotations are for)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    w[rng.choice(k, 4, replace=False)] *= 12.0
    idx = rng.choice(k * n, 20, replace=False)
    w.flat[idx] *= 25.0
    return w


def test_sizes():
    assert kron_sizes(384) == (16, 24)
    assert kron_sizes(768) == (24, 32)
    assert kron_sizes(1536) == (32, 48)
    assert kron_sizes(3072) == (48, 64)
    assert kron_sizes(96) == (8, 12)
    assert kron_sizes(97) == (1, 97)                      # prime: one dense factor
    assert kron_sizes(1536, 3) == (8, 12, 16)
    for k in (1, 2, 45, 97, 210, 384, 1000):
        for t in (1, 2, 3):
            assert int(np.prod(kron_sizes(k, t))) == k
    with pytest.raises(InvalidInputError):
        kron_sizes(0)


def test_hadamard_orders():
    built = [n for n in range(1, 130) if hadamard(n) is not None]
    for n in built:
        h = hadamard(n)
        assert set(np.unique(h)) <= {-1.0, 1.0}
        assert np.array_equal(h @ h.T, n * np.eye(n))
    for n in (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 44, 48, 64, 128):
        assert n in built


def test_index_convention_is_the_vec_trick():
    """x Q with Q = kron(P1, P2) equals P1^T X P2 with X = x.reshape(m, n) (row-major)."""
    rot = KroneckerRotation.random(384, seed=3)
    p1, p2 = rot.factors
    x = np.random.default_rng(0).standard_normal(384)
    want = (p1.T @ x.reshape(16, 24) @ p2).reshape(-1)
    np.testing.assert_allclose(x @ np.kron(p1, p2), want, atol=APPLY_TOL)
    np.testing.assert_allclose(rot.apply(x), want, atol=APPLY_TOL)
    np.testing.assert_allclose(rot.apply_transpose(x), (p1 @ x.reshape(16, 24) @ p2.T).reshape(-1), atol=APPLY_TOL)


@pytest.mark.parametrize("k", SIZES + [97, 210])
@pytest.mark.parametrize("build", ["kron2", "kron3", "dense", "block", "learned"])
def test_orthogonal_and_apply_matches_dense(k, build):
    rng = np.random.default_rng(k)
    if build == "block":
        if k % 32:
            pytest.skip("block 32 does not divide K")
        rot = KroneckerRotation.block_diagonal(k, 32, seed=1)
    elif build == "learned":
        rot = KroneckerRotation.learn(outlier_weight(k, 64), bits=3, group_size=32, steps=3)
    else:
        rot = KroneckerRotation.random(k, seed=1, n_factors={"kron2": 2, "kron3": 3, "dense": 1}[build])
    q = rot.to_dense()
    assert rot.size == k and q.shape == (k, k)
    assert np.abs(q.T @ q - np.eye(k)).max() < 1e-10
    assert np.allclose(q, np.kron(rot.factors[0], rot.factors[1]) if len(rot.factors) == 2 else q)
    x = rng.standard_normal((2, 3, k))
    np.testing.assert_allclose(rot.apply(x), x @ q, atol=APPLY_TOL)
    np.testing.assert_allclose(rot.apply_transpose(x), x @ q.T, atol=APPLY_TOL)
    w = rng.standard_normal((k, 5))
    np.testing.assert_allclose(rot.rotate_weight(w), q.T @ w, atol=APPLY_TOL)
    assert rot.n_params == sum(f.size for f in rot.factors if not np.array_equal(f, np.eye(f.shape[0])))
    assert rot.nbytes == 4 * rot.n_stored


def test_hadamard_factors_are_flat():
    """Both factors Hadamard: Q is a (scaled) Hadamard matrix of order K, every |entry| = K^-1/2."""
    for k in (96, 384, 768, 1536):
        q = KroneckerRotation.random(k, seed=0).to_dense()
        np.testing.assert_allclose(np.abs(q) * np.sqrt(k), 1.0, atol=1e-12)


def test_stored_as_keeps_the_stored_numbers():
    rot = KroneckerRotation.random(384, seed=2)
    r16 = rot.stored_as("float16")
    assert r16.storage == "float16" and r16.nbytes == 2 * (16 * 16 + 24 * 24)
    for f, f0 in zip(r16.factors, rot.factors):
        assert np.array_equal(f, f.astype(np.float16).astype(np.float64))
        assert np.abs(f - f0).max() < 1e-3
    x = np.random.default_rng(1).standard_normal((4, 384))
    np.testing.assert_allclose(r16.apply(x), x @ r16.to_dense(), atol=APPLY_TOL)
    r32 = rot.stored_as("float32")
    q = r32.to_dense()
    assert np.abs(q.T @ q - np.eye(384)).max() < 1e-6
    with pytest.raises(InvalidInputError):
        rot.stored_as("int8")


def test_spreads_outliers_and_beats_no_rotation():
    w = outlier_weight(384, 256)
    fmt = LowBitFormat(3, 64)
    plain = weighted_error(w, quantize_groups(w, fmt).dequantize())
    for rot in (KroneckerRotation.random(384, 0), KroneckerRotation.block_diagonal(384, 64, 0)):
        wr = rot.rotate_weight(w)
        assert np.abs(wr).max() < 0.5 * np.abs(w).max()
        err = weighted_error(w, rot.apply_transpose(quantize_groups(wr, fmt).dequantize().T).T)
        assert err < 0.7 * plain


def test_learn_never_worse_and_improves_outliers():
    w = outlier_weight(384, 512, seed=4)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 384)) * np.exp(rng.standard_normal(384))   # uneven channel scales
    gram = x.T @ x
    init = KroneckerRotation.random(384, 0)
    for g in (None, gram):
        rot, hist = KroneckerRotation.learn(w, g, bits=2, group_size=64, steps=8, init=init, return_history=True)
        assert min(hist) <= hist[0] and len(hist) == 9
        assert hist[0] == pytest.approx(KroneckerRotation.learn(w, g, 2, 64, steps=0, init=init, return_history=True)[1][0])
    # the learned Q lowers the searched-scale int2 error of Q^T W
    fmt = LowBitFormat(2, 64)

    def err(r):
        return weighted_error(w, r.apply_transpose(quantize_groups(r.rotate_weight(w), fmt).dequantize().T).T)
    learned = KroneckerRotation.learn(w, None, bits=2, group_size=64, steps=10, init=init)
    assert err(learned) < err(init)


def test_learn_needs_no_torch():
    code = ("import sys, numpy as np\n"
            "sys.modules['torch'] = None\n"                                    # any torch import fails
            "from bfc.lowbit.kron_rotation import KroneckerRotation\n"
            "w = np.random.default_rng(0).standard_normal((96, 40))\n"
            "KroneckerRotation.learn(w, w @ w.T, bits=4, group_size=32, steps=2)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_duck_typed_in_rotate_quantize():
    w = outlier_weight(384, 128)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 384))
    gram = x.T @ x
    rot = KroneckerRotation.random(384, 0)
    layer = rotate_quantize(w, gram, bits=3, group_size=64, rotation=rot)
    plain = rotate_quantize(w, gram, bits=3, group_size=64, rotate=False)
    assert layer.rotation is rot and layer.rotation_nbytes == rot.nbytes
    assert layer.error(w, gram) < plain.error(w, gram)
    xs = x[:3]
    np.testing.assert_allclose(layer.apply(xs), xs @ layer.to_dense(), rtol=1e-9, atol=1e-9)


# ---- emission ----------------------------------------------------------------------------------------
def emitted(rot, rows=7):
    k = rot.size
    x = gs.Variable("x", dtype=np.float32, shape=[rows, k])
    graph = gs.Graph(inputs=[x], opset=21)
    b = GraphBuilder(graph, "t", np.float32, 21)
    y = emit_rotation(b, x, rot)
    y.shape = [rows, k]
    graph.outputs = [y]
    model = gs.export_onnx(graph.cleanup())
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def run_ort(model, x, optimized_path=None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("build", ["kron2", "kron3", "block"])
def test_emitted_subgraph_matches_apply(k, storage, build, tmp_path):
    if build == "block":
        rot = KroneckerRotation.block_diagonal(k, 32, seed=1)
    else:
        rot = KroneckerRotation.random(k, seed=1, n_factors=3 if build == "kron3" else 2)
    rot = rot.stored_as(storage)
    model = emitted(rot)
    ops = [n.op_type for n in model.graph.node]
    n_mm = {"kron2": 2, "kron3": 3, "block": 1}[build]
    assert ops.count("MatMul") == n_mm
    assert set(ops) <= {"MatMul", "Reshape", "Cast"}
    assert len([o for o in ops if o != "Cast"]) <= 2 * n_mm + (1 if build == "block" else 0)
    x = np.random.default_rng(k).standard_normal((7, k)).astype(np.float32)
    y = run_ort(model, x, tmp_path / "opt.onnx")
    want = rot.apply(x.astype(np.float64))
    assert relative_error(want, y) < EMIT_RTOL
    assert np.abs(y - want).max() < EMIT_RTOL * np.abs(want).max() * 10
    # onnxruntime folds the fp16 -> fp32 Casts of the constant factors at load
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    assert "Cast" not in [n.op_type for n in opt.graph.node]


def test_emitted_dense_factor_is_one_matmul():
    rot = KroneckerRotation.random(97, seed=0)                      # prime K: (1, 97)
    model = emitted(rot)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    x = np.random.default_rng(0).standard_normal((7, 97)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, x), rot.apply(x.astype(np.float64)), rtol=1e-4, atol=1e-5)


def test_butterfly_and_kronecker_share_the_protocol():
    for rot in (ButterflyRotation.hadamard_like(384, 0), KroneckerRotation.random(384, 0)):
        for attr in ("size", "apply", "apply_transpose", "rotate_weight", "to_dense", "n_params",
                     "n_stored", "nbytes", "stored_as", "storage"):
            assert hasattr(rot, attr)
