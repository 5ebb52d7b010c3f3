"""Native (C++, ORT-free) kernel tests: builds runtime_ops with -DBFC_BUILD_TESTS=ON and runs ctest.

The binary (runtime_ops/tests/test_ks_kernels.cc) checks build_plan/run_chain against a
plain reference loop (int8 bit-exact, float within a named tolerance) and that the one
validation function rejects bad shapes and attributes.  Skipped without cmake or a C++
compiler.  CI runs the same three commands directly (see runtime_ops/library.cmake).
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 900  # two shared cores: the AVX2 and portable kernel units take a while


def _compiler():
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(shutil.which("cmake") is None or _compiler() is None, reason="needs cmake and a C++ compiler")
def test_native_kernel_tests_pass(tmp_path):
    build = tmp_path / "native-tests"
    steps = [["cmake", "-S", str(ROOT / "runtime_ops"), "-B", str(build), "-DBFC_BUILD_TESTS=ON"],
             ["cmake", "--build", str(build), "-j2"],
             ["ctest", "--test-dir", str(build), "--output-on-failure"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = subprocess.run([str(build / "bfc_ks_tests")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and ", 0 failures" in out.stdout, out.stdout[-4000:]
