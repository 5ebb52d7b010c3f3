"""Finding and loading bfc's native custom-op library (``ai.bfc`` ops for onnxruntime).

The library (``libbfc_ops.so`` / ``.dylib`` / ``bfc_ops.dll``) is built by CMake during
``pip install`` and installed inside the ``bfc`` package.  :func:`library_path` looks,
in order:

1. next to the installed ``bfc`` package files (every ``bfc`` folder on ``sys.path``,
   which also covers scikit-build-core editable installs);
2. the path in the environment variable ``BFC_RUNTIME_LIB``;
3. the development build folder ``<repo>/build/runtime_ops`` (``cmake -S runtime_ops
   -B build/runtime_ops && cmake --build build/runtime_ops``).

:func:`session` creates an ``onnxruntime.InferenceSession`` with the library
registered.  A missing or unloadable library raises :class:`bfc.errors.NativeLibraryError`.
Models using ``ai.bfc`` ops also run without the library through the numpy reference
in :mod:`bfc.ops` (``onnx.reference.ReferenceEvaluator``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from bfc.errors import ModelError, NativeLibraryError

ENV_VAR = "BFC_RUNTIME_LIB"
_PKG_DIR = Path(__file__).resolve().parent
_REPO_BUILD = _PKG_DIR.parent / "build" / "runtime_ops"


def library_filename() -> str:
    if sys.platform.startswith("win"):
        return "bfc_ops.dll"
    if sys.platform == "darwin":
        return "libbfc_ops.dylib"
    return "libbfc_ops.so"


def _candidates() -> list[Path]:
    name = library_filename()
    out: list[Path] = [_PKG_DIR / name]
    for entry in sys.path:
        try:
            p = Path(entry or ".") / "bfc" / name
        except (TypeError, ValueError):
            continue
        if p not in out:
            out.append(p)
    env = os.environ.get(ENV_VAR)
    if env:
        out.append(Path(env))
    out.append(_REPO_BUILD / name)
    return out


def library_path() -> Path:
    """Path of the ai.bfc custom-op library; raises NativeLibraryError if none exists."""
    env = os.environ.get(ENV_VAR)
    for p in _candidates():
        if p.is_file():
            return p
    if env:
        raise NativeLibraryError(
            f"{ENV_VAR}={env} does not point to a file, and no bfc custom-op library "
            f"({library_filename()}) is installed; fix the variable or reinstall bfc with a C++17 compiler")
    raise NativeLibraryError(
        f"the bfc custom-op library ({library_filename()}) is not installed: reinstall bfc with a "
        "C++17 compiler and CMake available (pip install .), or build it with "
        "'cmake -S runtime_ops -B build/runtime_ops && cmake --build build/runtime_ops', "
        f"or set {ENV_VAR} to its path; without it, run ai.bfc models with "
        "bfc.ops.reference_evaluator(model)")


def is_available() -> bool:
    try:
        library_path()
    except NativeLibraryError:
        return False
    return True


def supported_isas() -> list[str]:
    """Kernel ISAs this build of the library runs on this CPU (portable, avx2, avx512, avx512bf16: the
    AVX-512 path with fp8 factors through bf16 dot products), asked from the
    library itself (``BfcKsIsa`` answers the ISA it picks for each ``BFC_KS_ISA`` request)."""
    import ctypes

    fn = ctypes.CDLL(str(library_path())).BfcKsIsa
    fn.restype = ctypes.c_char_p
    old = os.environ.get("BFC_KS_ISA")
    out = []
    try:
        for isa in ("portable", "avx2", "avx512", "avx512bf16"):
            os.environ["BFC_KS_ISA"] = isa
            if fn() == isa.encode():
                out.append(isa)
    finally:
        if old is None:
            os.environ.pop("BFC_KS_ISA", None)
        else:
            os.environ["BFC_KS_ISA"] = old
    return out


def session_options(threads: int = 1, *, arena: bool = True, optimization_level=None):
    """``onnxruntime.SessionOptions``: ``threads`` intra-op threads (0 = onnxruntime's default),
    quiet logging, the bfc library registered when it is built."""
    import onnxruntime as ort

    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise NativeLibraryError(f"threads={threads!r} must be a non-negative integer (0 = onnxruntime default)")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 4          # onnxruntime's own messages do not leak into bfc's output (errors raise)
    if optimization_level is not None:
        so.graph_optimization_level = optimization_level
    if is_available():
        path = library_path()
        try:
            so.register_custom_ops_library(str(path))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises RuntimeError / Fail subclasses
            raise NativeLibraryError(
                f"onnxruntime could not load the bfc custom-op library {path}: {exc}; rebuild it for this "
                f"platform and onnxruntime {ort.__version__} (needs >= 1.17)") from None
    return so


def session(model, threads: int = 1, *, arena: bool = True, providers=None, optimization_level=None,
            external_folder=None):
    """The one onnxruntime session factory of bfc, for ``model`` (ModelProto, bytes or path).

    ``threads`` is the intra-op thread count (the ai.bfc kernels parallelize only through
    onnxruntime's intra-op pool; 0 lets onnxruntime decide); ``arena=False`` returns
    activation memory after each run.  ``external_folder``: where the external data of an
    in-memory model lies (a weightless skeleton, ``bfc.passes.model_io.stream``).  A model onnxruntime
    refuses raises ModelError, one that needs the missing bfc library NativeLibraryError.
    """
    import onnxruntime as ort

    so = session_options(threads, arena=arena, optimization_level=optimization_level)
    if external_folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(external_folder))
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(model, sess_options=so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        if "ai.bfc" in str(e) and not is_available():
            raise NativeLibraryError("the model uses bfc's ai.bfc custom ops but the bfc custom-op library is "
                                     "not installed; reinstall bfc with a C++17 compiler, or use --target "
                                     "portable") from None
        raise ModelError(f"onnxruntime cannot load the model ({str(e).splitlines()[0][:300]})") from None


def latency_ms(sess, feeds: dict, repeats: int = 30, warmup: int = 1) -> float:
    """Median wall time of ``sess.run(None, feeds)`` in milliseconds (the one latency helper)."""
    import time

    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]
