"""Fixtures of the ONNX bridge tests: exported tiny decoders under tests/fixtures/onnx/.

The tier needs onnx, onnxruntime and onnxruntime-extensions (``kvcl[onnx]``) and one OpenCL
device; without them every test here is skipped with the reason (each test module calls
:func:`bridge_fixtures.require_onnx`). No torch is needed: the
models were exported by ``tools/export_fixtures.py`` and are committed.
"""

from __future__ import annotations

import os

import pytest

_DEVICE: dict = {}


@pytest.fixture(scope="session")
def onnx_device():
    """One OpenCL device for the whole tier (the first usable one, PoCL preferred)."""
    if "dev" not in _DEVICE:
        import kvcl
        try:
            found = kvcl.devices()
        except Exception as exc:  # pragma: no cover - no pyopencl / ICD
            found, _DEVICE["err"] = [], exc
        found = sorted(found, key=lambda d: "portable" not in d.platform.lower())
        _DEVICE["dev"] = None
        for d in found:
            try:
                _DEVICE["dev"] = kvcl.Device(d.index)
                break
            except Exception as exc:  # pragma: no cover
                _DEVICE["err"] = exc
    if _DEVICE["dev"] is None:
        pytest.skip(f"no usable OpenCL device ({_DEVICE.get('err', 'none found')}); install kvcl[pocl]")
    return _DEVICE["dev"]


@pytest.fixture(scope="session")
def real_model():
    """The real-weights model's export (SmolLM2-135M-Instruct, ``tools/export_real_model.sh``):
    its tests are skipped with the reason when it is absent, failed under
    ``KVCL_REQUIRE_REAL_MODEL=1`` (CI)."""
    from kvcl.onnx.models import EXPORT_HINT, find_model, model_dir
    path = find_model("smollm2")
    if path is None:
        msg = f"SmolLM2 not exported ({model_dir('smollm2')}): run {EXPORT_HINT}"
        if os.environ.get("KVCL_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
