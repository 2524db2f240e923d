#!/usr/bin/env python
"""Export tiny random-initialised decoders to ONNX for kvcl's ONNX bridge tests.

Runs in a separate venv holding torch (never a runtime dependency of kvcl)::

    python3 -m venv .venv-export
    .venv-export/bin/pip install /path/to/torch-2.13.0+cpu-*.whl transformers onnx onnxscript
    .venv-export/bin/python tools/export_fixtures.py            # every route
    .venv-export/bin/python tools/export_fixtures.py --only llama_dynamo18 --force

Each fixture is a self-contained ``.onnx`` (weights inside, < 1 MB) with the graph I/O that
real exports have: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.N.key/value`` [B, KVH, past, D] -> ``logits``, ``present.N.key/value``.
The script is idempotent: a fixture whose file exists is skipped unless ``--force``; the
weights come from a fixed seed, and ``tests/fixtures/onnx/README.md`` records the routes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "fixtures" / "onnx"

# The tiny shapes: GQA (4 q heads over 2 kv heads), head_dim 16, 2 layers, vocab 128.
# intermediate_size != vocab_size: onnxruntime-genai's builder takes any Linear whose out_features
# equals the vocab size for the LM head (with 128/128 it wired logits after layer 0's MLP gate).
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0,
              # The default init (std 0.02) gives near-uniform attention and a model that repeats
              # two tokens; std 0.2 gives peaky attention (max prob ~0.9) and varied greedy output,
              # so that matching logits actually tests the attention core.
              initializer_range=0.2)

ARCHES = {
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig", extra=dict(rope_theta=10000.0)),
    "qwen3": dict(cls="Qwen3ForCausalLM", config="Qwen3Config", extra=dict(rope_theta=1000000.0)),
}

# route name -> (arch, exporter, opset, attn_implementation)
ROUTES = {
    "llama_dynamo18": ("llama", "dynamo", 18, "sdpa"),
    "llama_torchscript": ("llama", "torchscript", 17, "eager"),
    "qwen3_dynamo18": ("qwen3", "dynamo", 18, "eager"),
    "qwen3_torchscript": ("qwen3", "torchscript", 17, "sdpa"),
    "llama_dynamo23": ("llama", "dynamo", 23, "sdpa"),
    # onnxruntime-genai's model builder: com.microsoft.GroupQueryAttention, packed QKV, RoPE inside
    "llama_genai_gqa": ("llama", "genai", 0, "eager"),
    # optimum-cli export onnx --task text-generation-with-past (its own venv: older transformers)
    "llama_optimum": ("llama", "optimum", 18, "sdpa"),  # optimum loads the folder itself: its default
}


# A bigger model for timing only (never committed): 7B-like attention shapes per layer
# (8 KV heads x 128, GQA 4), 4 layers, small MLP and vocab so that attention dominates.
BENCH = dict(vocab_size=256, hidden_size=1024, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, initializer_range=0.02)


def build_model(arch: str, attn: str, seed: int = 0, overrides: dict | None = None):
    import torch
    import transformers

    spec = ARCHES[arch]
    cfg = getattr(transformers, spec["config"])(**{**COMMON, **(overrides or {})}, **spec["extra"])
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(cfg)
    model.eval()
    return model, cfg


def make_wrapper(model, cfg):
    import torch
    from transformers import DynamicCache

    n_layers = cfg.num_hidden_layers

    class _Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=cfg)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = []
            for i in range(n_layers):
                layer = out.past_key_values.layers[i]
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return _Wrapper().eval()


def io_names(n_layers: int):
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(n_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def example_inputs(cfg, batch=2, seq=3, past=5):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = (torch.arange(seq) + past).unsqueeze(0).expand(batch, seq).contiguous()
    kv = []
    for _ in range(cfg.num_hidden_layers):
        for _ in range(2):
            kv.append(torch.randn(batch, cfg.num_key_value_heads, past, cfg.head_dim, generator=g))
    return (ids, mask, pos, *kv)


def export_genai(route: str, path: Path) -> dict:
    """Save the random model as a Hugging Face folder (with a word-level tokenizer.json written
    here: the builder insists on one) and run ``onnxruntime_genai.models.builder`` on it."""
    import subprocess
    import tempfile

    import onnx
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    arch, _, _, attn = ROUTES[route]
    model, cfg = build_model(arch, attn)
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "out"
        model.save_pretrained(hf)
        vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, cfg.vocab_size)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="t1", eos_token="t2",
                                pad_token="<unk>").save_pretrained(hf)
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                            "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp) / "cache")],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"onnxruntime_genai builder failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        m = onnx.load(str(out / "model.onnx"))  # weights come from model.onnx.data
        onnx.save(m, str(path))  # one self-contained file
    _check_prefill(path, model, cfg)
    return {"route": route, "arch": arch, "exporter": "onnxruntime-genai builder", "opset": 0,
            "attn_implementation": "GroupQueryAttention", "file": path.name, "size_bytes": path.stat().st_size,
            "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
            "num_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}


def _check_prefill(path: Path, model, cfg) -> None:
    """The exported model's prefill logits equal torch's (builders are easy to mislead)."""
    import numpy as np
    import torch
    try:
        import onnxruntime as ort
    except ImportError:
        return
    ids = np.array([[5, 17, 33, 9, 100, 4, 61]], np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]
    err = float(np.abs(got - ref).max())
    if err > 1e-4:
        raise SystemExit(f"{path.name}: the exported model differs from torch by {err}")


def _optimum_cli() -> str | None:
    import shutil
    exe = os.environ.get("KVCL_OPTIMUM_CLI") or shutil.which("optimum-cli")
    return exe if exe and Path(exe).exists() else None


def export_optimum(route: str, path: Path) -> dict:
    """``optimum-cli export onnx --task text-generation-with-past`` on the random model saved as
    a Hugging Face folder. optimum-onnx pins an older transformers, so it lives in its own venv:
    point ``KVCL_OPTIMUM_CLI`` (or ``--optimum-cli``) at that venv's ``optimum-cli``."""
    import subprocess
    import tempfile

    import onnx

    exe = _optimum_cli()
    if exe is None:
        raise RuntimeError("optimum-cli not found: make a venv with the torch CPU wheel + optimum-onnx and "
                           "pass --optimum-cli PATH (or set KVCL_OPTIMUM_CLI)")
    arch, _, _, attn = ROUTES[route]
    model, cfg = build_model(arch, attn)
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "out"
        model.save_pretrained(hf)
        r = subprocess.run([exe, "export", "onnx", "-m", str(hf), "--task", "text-generation-with-past", str(out)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"optimum-cli failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        onnx.save(onnx.load(str(out / "model.onnx")), str(path))
        version = subprocess.run([str(Path(exe).parent / "python"), "-c",
                                  "import optimum.onnx, transformers; print(transformers.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
    _check_prefill(path, model, cfg)
    return {"route": route, "arch": arch, "exporter": f"optimum-onnx (transformers {version})", "opset": 18,
            "attn_implementation": attn, "file": path.name, "size_bytes": path.stat().st_size,
            "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
            "num_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}


def export(route: str, path: Path, overrides: dict | None = None) -> dict:
    import torch

    arch, exporter, opset, attn = ROUTES[route]
    if exporter == "genai":
        return export_genai(route, path)
    if exporter == "optimum":
        return export_optimum(route, path)
    model, cfg = build_model(arch, attn, overrides=overrides)
    wrapper = make_wrapper(model, cfg)
    args = example_inputs(cfg)
    ins, outs = io_names(cfg.num_hidden_layers)
    with torch.no_grad():
        ref = wrapper(*args)
    if exporter == "torchscript":
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        for n in ins[3:]:
            axes[n] = {0: "batch", 2: "past"}
        for n in outs[1:]:
            axes[n] = {0: "batch", 2: "total"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), input_names=ins, output_names=outs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        seq = torch.export.Dim("seq", min=1, max=4096)
        past = torch.export.Dim("past", min=1, max=8192)
        total = torch.export.Dim.DYNAMIC
        shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                  tuple({0: batch, 2: past} for _ in ins[3:]))  # *past arrives as one tuple
        prog = torch.onnx.export(wrapper, args, input_names=ins, output_names=outs,
                                 dynamic_shapes=shapes, opset_version=opset, dynamo=True,
                                 optimize=True, verify=False, report=False)
        prog.save(str(path), external_data=False)
    _check(path, args, ref, ins, outs)
    return {"route": route, "arch": arch, "exporter": exporter, "opset": opset,
            "attn_implementation": attn, "file": path.name, "size_bytes": path.stat().st_size,
            "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
            "num_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size}


def _check(path: Path, args, ref, ins, outs) -> None:
    """The exported model reproduces torch on the example (and on a past of 0 tokens)."""
    import numpy as np
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime as ort
    except ImportError:  # onnxruntime is optional in the export venv
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: a.numpy() for n, a in zip(ins, args)}
    got = sess.run(None, feed)
    err = max(float(np.abs(g - r.numpy()).max() / max(1.0, np.abs(r.numpy()).max())) for g, r in zip(got, ref))
    if err > 1e-4:  # relative to the output's magnitude when that exceeds 1
        raise SystemExit(f"{path.name}: onnxruntime differs from torch by {err}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(ROUTES), help="routes to export (default: all)")
    ap.add_argument("--force", action="store_true", help="re-export existing files")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--optimum-cli", metavar="PATH", help="optimum-cli of a venv with optimum-onnx "
                    "(default: $KVCL_OPTIMUM_CLI or optimum-cli on PATH)")
    ap.add_argument("--bench-model", type=Path, metavar="PATH",
                    help="only export the bigger timing model (dynamo, opset 18; see BENCH) to PATH")
    args = ap.parse_args(argv)
    if args.optimum_cli:
        os.environ["KVCL_OPTIMUM_CLI"] = args.optimum_cli
    if args.bench_model:
        info = export("llama_dynamo18", args.bench_model, overrides=BENCH)
        print(f"{args.bench_model}: {info['size_bytes'] / 2**20:.1f} MiB")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    failed = []
    for route in args.only or list(ROUTES):
        path = args.out / f"{route}.onnx"
        if path.exists() and not args.force and route in manifest:
            print(f"{route}: exists, skipped (--force to redo)")
            continue
        print(f"{route}: exporting ...", flush=True)
        try:
            manifest[route] = export(route, path)
        except Exception as exc:  # keep going: report which routes failed
            failed.append(route)
            print(f"{route}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(f"{route}: {path.stat().st_size / 1024:.0f} KiB")
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    import torch
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
