"""The rooms above the engine keep to their floors: the scheduler, the server, the tokenizer
and sampling import neither pyopencl nor onnxruntime, and the server nothing below the
scheduler (checked in a subprocess with a bare ``kvcl`` package and both blocked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

KVCL_DIR = Path(__file__).resolve().parents[2] / "kvcl"


@pytest.mark.parametrize("module,forbidden", [
    ("kvcl.sampling", ["kvcl.engine", "kvcl.onnx"]),
    ("kvcl.tokenizer", ["kvcl.engine", "kvcl.onnx"]),
    ("kvcl.scheduler", ["kvcl.engine", "kvcl.onnx", "kvcl.runtime"]),
    ("kvcl.server", ["kvcl.engine", "kvcl.onnx", "kvcl.runtime", "kvcl.paging"]),
])
def test_imports_without_pyopencl_or_onnxruntime(module, forbidden):
    if module == "kvcl.server":
        pytest.importorskip("starlette")
    code = f"""
import sys, types
sys.modules["pyopencl"] = None            # importing them now raises ImportError
sys.modules["onnxruntime"] = None
sys.modules["onnxruntime_extensions"] = None
pkg = types.ModuleType("kvcl")
pkg.__path__ = [{str(KVCL_DIR)!r}]          # bare package: kvcl/__init__.py is not executed
sys.modules["kvcl"] = pkg
import {module}
loaded = sorted(m for m in sys.modules if m.startswith("kvcl") and sys.modules[m] is not None)
bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in {forbidden!r})]
assert not bad, bad
print("ok", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
