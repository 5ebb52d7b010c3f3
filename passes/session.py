"""onnxruntime sessions and model inputs for calibration and verification (no graph change).

Feeds come from a calibration ``.npz`` (keys = model input names) or are generated:
float inputs standard normal, integer inputs in [0, 100) (all ones for names
containing "mask"), dynamic dimensions 2 (first) and 8 (others).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from bfc.errors import ConfigError, ModelError, NativeLibraryError

_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
       onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
       onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


def session(model, threads: int = 0, arena: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session from a ModelProto or a model path (read by onnxruntime itself);
    ``arena=False`` returns activation memory after each run (calibration probes)."""
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    _register_bfc_ops(so)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        if "ai.bfc" in str(e):
            raise NativeLibraryError("the model uses bfc's ai.bfc custom ops but the bfc custom-op library is "
                                     "not available; reinstall bfc with a C++17 compiler, or use --target portable"
                                     ) from None
        raise ModelError(f"onnxruntime cannot load the model ({str(e).splitlines()[0][:300]}); "
                         "check that it runs in onnxruntime before optimizing it") from None


def _register_bfc_ops(so) -> None:
    """Register the ai.bfc custom-op library when it is built (custom-op target models need it)."""
    try:
        from bfc import runtime
        if runtime.is_available():
            so.register_custom_ops_library(str(runtime.library_path()))
    except ImportError:
        pass


def graph_inputs(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def load_feeds(path, model: onnx.ModelProto) -> dict:
    try:
        data = np.load(path)
        feeds = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ConfigError(f"calibration file {path} does not exist; check the --calibration path") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"calibration file {path} is not a readable .npz ({e}); save it with numpy.savez") from None
    names = [i.name for i in graph_inputs(model)]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ConfigError(f"calibration file {path} lacks model inputs {missing} (it has {sorted(feeds)}); "
                          "save one array per model input, keyed by input name")
    out = {}
    for vi in graph_inputs(model):
        want = _NP.get(vi.type.tensor_type.elem_type)
        arr = np.asarray(feeds[vi.name])
        out[vi.name] = arr.astype(want) if want is not None else arr
    return out


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        t = vi.type.tensor_type
        dt = _NP.get(t.elem_type)
        if dt is None:
            raise ModelError(f"model input {vi.name!r} has an element type bfc cannot generate; "
                             "give inputs with --calibration FILE.npz")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (2 if i == 0 else 8)
                 for i, d in enumerate(t.shape.dim)]
        if np.issubdtype(dt, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        elif dt is np.bool_:
            feeds[vi.name] = np.ones(shape, dt)
        elif "mask" in vi.name.lower():
            feeds[vi.name] = np.ones(shape, dt)
        else:
            feeds[vi.name] = rng.integers(0, 100, shape).astype(dt)
    return feeds


def run(model_or_sess, feeds: dict, outputs=None) -> list[np.ndarray]:
    sess = model_or_sess if isinstance(model_or_sess, ort.InferenceSession) else session(model_or_sess)
    try:
        return sess.run(outputs, feeds)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"onnxruntime failed to run the model on the given inputs "
                         f"({str(e).splitlines()[0][:300]}); check the input shapes and types") from None
