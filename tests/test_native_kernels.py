"""Native (C++, ORT-free) kernel tests: runs the binary CTest built, never builds anything.

The binary (runtime_ops/tests/test_ks_kernels.cc) checks build_plan/run_chain and the
LowBitMatMul kernels against plain reference loops (int8 bit-exact, float within a named
tolerance) and that the validation functions reject bad shapes and attributes.  It is built
and run by CI step 2 (.ci/run):

    cmake -S runtime_ops -B build/native-tests -DBFC_BUILD_TESTS=ON
    cmake --build build/native-tests -j2 && ctest --test-dir build/native-tests --output-on-failure

This test reruns that binary when it exists and is newer than every runtime_ops source, and
skips (saying which command builds it) otherwise.  The onnxruntime-facing library is tested
through the installed ``bfc.runtime.library_path()`` by test_runtime_kernels.py.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "native-tests"
BINARY = BUILD_DIR / ("bfc_ks_tests.exe" if sys.platform.startswith("win") else "bfc_ks_tests")
RUN_TIMEOUT_S = 300
BUILD_HINT = ("cmake -S runtime_ops -B build/native-tests -DBFC_BUILD_TESTS=ON && "
              "cmake --build build/native-tests -j2 (CI step 2 of .ci/run)")


def _newest_source_mtime() -> float:
    srcs = [p for p in (ROOT / "runtime_ops").rglob("*")
            if p.is_file() and p.suffix in (".cc", ".h", ".cmake", ".txt")]
    return max((p.stat().st_mtime for p in srcs), default=0.0)


def _binary_or_skip() -> Path:
    if not BINARY.is_file() or not os.access(BINARY, os.X_OK):
        pytest.skip(f"native test binary {BINARY.relative_to(ROOT)} not built; build it with: {BUILD_HINT}")
    if BINARY.stat().st_mtime < _newest_source_mtime():
        pytest.skip(f"native test binary {BINARY.relative_to(ROOT)} is older than the runtime_ops sources; "
                    f"rebuild it with: {BUILD_HINT}")
    return BINARY


def test_native_kernel_tests_pass():
    binary = _binary_or_skip()
    out = subprocess.run([str(binary)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0 and ", 0 failures" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]
