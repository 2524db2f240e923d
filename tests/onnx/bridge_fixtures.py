"""Paths of the exported fixtures (shared by the ONNX bridge tests; no onnx import here)."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text()) if (FIXTURES / "manifest.json").exists() else {}
ROUTES = sorted(r for r in MANIFEST if (FIXTURES / MANIFEST[r]["file"]).exists())


def fixture_path(route: str) -> Path:
    return FIXTURES / MANIFEST[route]["file"]


def require_onnx() -> None:
    """Skip the calling test module unless the ``onnx`` extra is installed."""
    import pytest
    for mod in ("onnx", "onnxruntime", "onnxruntime_extensions"):
        pytest.importorskip(mod, reason=f"the ONNX bridge tests need {mod} (pip install 'kvcl[onnx]')")
