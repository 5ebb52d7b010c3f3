"""Formats and rounding: checked against an enumeration of every representable value,
numpy's fp16 cast and the ONNX reference Cast (saturate=1)."""
import numpy as np
import pytest

from bfc.errors import ConfigError
from bfc.quant import FORMATS, get_format, round_nearest, round_stochastic
from bfc.quant.rounding import to_storage

FLOATS = ["fp16", "bf16", "fp8-e4m3", "fp8-e5m2"]


def all_finite_values(fmt):
    """Every finite non-negative value of the format and the parity of its code."""
    bits = np.arange(2 ** fmt.bits, dtype=np.uint64).astype(np.uint16 if fmt.bits == 16 else np.uint8)
    with np.errstate(invalid="ignore"):
        vals = bits.view(fmt.dtype).astype(np.float64)
    keep = np.isfinite(vals) & (vals >= 0) & ~np.signbit(vals)
    order = np.argsort(vals[keep])
    return vals[keep][order], (bits[keep][order] & 1).astype(bool)


def reference_round(fmt, v):
    """Brute-force nearest (ties to the even code) with saturation, from the enumeration."""
    grid, odd = all_finite_values(fmt)
    a = np.minimum(np.abs(v), grid[-1])
    i = np.clip(np.searchsorted(grid, a), 1, grid.size - 1)
    lo, hi = grid[i - 1], grid[i]
    pick_hi = (hi - a < a - lo) | ((hi - a == a - lo) & odd[i - 1])
    return np.copysign(np.where(pick_hi, hi, lo), v)


@pytest.mark.parametrize("name", FLOATS)
def test_round_nearest_matches_enumeration(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(0)
    grid, _ = all_finite_values(fmt)
    mids = 0.5 * (grid[1:] + grid[:-1])
    v = np.concatenate([rng.standard_normal(20000) * np.exp2(rng.integers(-30, 20, 20000)),
                        mids, -mids, grid, mids * (1 + 2.0 ** -40), mids * (1 - 2.0 ** -40),
                        [fmt.max * 1.01, -fmt.max * 3, 1e30]])
    np.testing.assert_array_equal(round_nearest(fmt, v), reference_round(fmt, v))


def test_table_and_index_are_inverse():
    for name in FLOATS:
        fmt = FORMATS[name]
        grid, _ = all_finite_values(fmt)
        np.testing.assert_array_equal(fmt.table()[:-1], grid)
        np.testing.assert_array_equal(fmt.grid_index(grid), np.arange(grid.size))
    assert FORMATS["fp8-e4m3"].table()[FORMATS["fp8-e4m3"].max_index] == 448.0


@pytest.mark.parametrize("name,onnx_type", [("fp8-e4m3", "FLOAT8E4M3FN"), ("fp8-e5m2", "FLOAT8E5M2")])
def test_fp8_saturation_matches_onnx_cast(name, onnx_type):
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator
    fmt = FORMATS[name]
    to = getattr(TensorProto, onnx_type)
    node = helper.make_node("Cast", ["x"], ["y"], to=to, saturate=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", to, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    grid, _ = all_finite_values(fmt)
    edge = np.array([fmt.max * 0.99, fmt.max, fmt.max * 1.02, fmt.max * 1.07, fmt.max * 1.5, 1e9,
                     grid[1], grid[1] / 2, grid[1] * 0.51, grid[1] * 1.5, 3 * grid[1] / 2], np.float32)
    x = np.concatenate([edge, -edge])
    want = ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float64)
    got = round_nearest(fmt, x.astype(np.float64))
    np.testing.assert_array_equal(got, want)
    stored = to_storage(fmt, got)
    assert stored.dtype == fmt.dtype and not np.any(np.isnan(stored.astype(np.float64)))


def test_int8_is_symmetric_and_saturates():
    fmt = get_format("int8")
    np.testing.assert_array_equal(round_nearest(fmt, np.array([0.5, 1.5, -2.5, 126.6, 300, -300])),
                                  [0, 2, -2, 127, 127, -127])


@pytest.mark.parametrize("name", FLOATS + ["int8"])
def test_stochastic_rounding_is_seeded_unbiased_and_on_grid(name):
    fmt = FORMATS[name]
    v = np.full(200000, 30.3 if name == "int8" else 0.3)
    a = round_stochastic(fmt, v, np.random.default_rng(1))
    b = round_stochastic(fmt, v, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    vals = np.unique(a)
    assert vals.size == 2 and vals[0] < v[0] < vals[1]                # the two neighbours only
    np.testing.assert_array_equal(round_nearest(fmt, vals), vals)
    spread = vals[1] - vals[0]
    assert abs(a.mean() - v[0]) < 5 * spread / np.sqrt(v.size)        # unbiased (5 sigma)


def test_unknown_format_names_the_allowed_set():
    with pytest.raises(ConfigError, match="fp8-e4m3"):
        get_format("fp8")
