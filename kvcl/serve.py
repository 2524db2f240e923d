"""``kvcl serve MODEL``: wires an exported model to the HTTP server.

The one place that knows both sides: a :class:`kvcl.onnx.Generator` (onnxruntime + the paged
cache, prefix caching on) hands its :meth:`~kvcl.onnx.Generator.scheduler` and tokenizer to
:func:`kvcl.server.create_app`, and uvicorn serves the app.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .dtypes import KV_DTYPES

__all__ = ["add_command", "build_app"]


def build_app(model, *, kv_dtype: "str | None" = None, device=None, max_tokens: int = 8192,
              block_size: int = 16, max_batch_tokens: int = 256, max_num_seqs: int = 32,
              tokenizer="auto", model_name: "str | None" = None, default_max_tokens: int = 512):
    """(app, generator) for ``model`` (a folder, a model file or a known model's name)."""
    from .onnx import Generator
    from .onnx.models import resolve_model
    from .server import create_app
    path = resolve_model(model)
    gen = Generator(path, kv_dtype=kv_dtype, device=device, max_tokens=max_tokens, block_size=block_size,
                    tokenizer=tokenizer, prefix_caching=True)
    sched = gen.scheduler(max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs)
    if model_name is None:
        p = Path(path) if isinstance(path, (str, Path)) else None
        model_name = (p.parent.name if p is not None and p.name == "model.onnx" else p.stem) if p else "kvcl"
    app = create_app(sched, tokenizer=gen.tokenizer, model_name=model_name,
                     default_max_tokens=default_max_tokens)
    return app, gen


def _cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("kvcl: kvcl serve needs starlette and uvicorn: pip install 'kvcl[serve]'", file=sys.stderr)
        return 2
    app, gen = build_app(args.model, kv_dtype=args.kv_dtype, device=args.device, max_tokens=args.max_tokens,
                         block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
                         max_num_seqs=args.max_num_seqs, tokenizer=args.tokenizer or "auto",
                         model_name=args.name)
    srv = app.state.kvcl
    cache = gen.cache
    print(f"kvcl serve: {srv.model_name} on {cache.device.info.name}, kv {cache.dtype.name}, "
          f"{cache.num_blocks} blocks of {cache.block_size} ({cache.memory_bytes() / 2**20:.0f} MiB), "
          f"tokenizer {'yes' if gen.tokenizer else 'no (token-id prompts only)'}; "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        gen.close()
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server for an exported model "
                                            "(continuous batching over the paged cache)")
    p.add_argument("model", help="a folder holding model.onnx and its tokenizer, a model file, or 'smollm2'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default=None,
                   help="KV storage (default: the one a rewritten model records, else fp32)")
    p.add_argument("--max-tokens", type=int, default=8192, help="cache capacity in tokens, all requests together")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=256,
                   help="rows x longest chunk per step (chunked prefill budget)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests batched per step")
    p.add_argument("--tokenizer", metavar="FOLDER", default=None, help="default: the model's folder")
    p.add_argument("--device", default=None, help="device index 'P:D' or name substring")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
