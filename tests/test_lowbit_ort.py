"""GroupQuantized -> com.microsoft.MatMulNBits: onnxruntime's output equals x @ dequantize()."""
import numpy as np
import pytest

from bfc.errors import UnsupportedError
from bfc.lowbit import ORT_BITS, quantize_groups, to_matmulnbits

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper

REL_TOL = 1e-5           # float32 accumulation in onnxruntime vs float64 reference


def matmulnbits_model(m, accuracy_level=0, bits_override=None):
    inits = [numpy_helper.from_array(m.B, "B"), numpy_helper.from_array(m.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if m.zero_points is not None:
        inits.append(numpy_helper.from_array(m.zero_points, "zero_points"))
        inputs.append("zero_points")
    attrs = m.attributes(accuracy_level)
    if bits_override is not None:
        attrs["bits"] = bits_override
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, m.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, m.N])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,block", [(128, 32), (96, 64), (200, 16), (256, 128)])
def test_matmulnbits_matches_dequantize(bits, symmetric, k, block):
    rng = np.random.default_rng(bits * 100 + k)
    n = 24
    w = rng.standard_normal((k, n))
    gq = quantize_groups(w, bits=bits, group_size=block, symmetric=symmetric)
    m = to_matmulnbits(gq)
    assert m.B.shape == (n, -(-k // block), block * bits // 8) and m.B.dtype == np.uint8
    assert m.scales.shape == (n * -(-k // block),)
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = run(matmulnbits_model(m), x)
    ref = x.astype(np.float64) @ gq.dequantize()
    np.testing.assert_allclose(y, ref, rtol=REL_TOL, atol=REL_TOL * np.abs(ref).max())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_default_zero_point_equals_explicit(bits):
    rng = np.random.default_rng(7)
    gq = quantize_groups(rng.standard_normal((64, 8)), bits=bits, group_size=32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y0 = run(matmulnbits_model(to_matmulnbits(gq)), x)
    y1 = run(matmulnbits_model(to_matmulnbits(gq, explicit_zero_points=True)), x)
    np.testing.assert_array_equal(y0, y1)


def test_only_2_4_8_bits():
    """onnxruntime 1.32 rejects every other width; the converter refuses int3 with a reason."""
    assert ORT_BITS == (2, 4, 8)
    rng = np.random.default_rng(0)
    gq = quantize_groups(rng.standard_normal((64, 8)), bits=3, group_size=32)
    with pytest.raises(UnsupportedError, match="bits"):
        to_matmulnbits(gq)
    m = to_matmulnbits(quantize_groups(rng.standard_normal((64, 8)), bits=4, group_size=32))
    with pytest.raises(Exception, match="2b, 4b and 8b"):
        run(matmulnbits_model(m, bits_override=3), np.ones((1, 64), np.float32))
    with pytest.raises(UnsupportedError, match="block_size"):
        to_matmulnbits(quantize_groups(rng.standard_normal((96, 8)), bits=4, group_size=48))
