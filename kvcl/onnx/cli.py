"""``kvcl onnx rewrite``, ``kvcl onnx generate`` / ``kvcl generate`` and ``kvcl onnx bench``.

``kvcl.cli`` wires these in with :func:`add_commands` (each sets ``func`` on its parser, which
returns the exit code).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..dtypes import KV_DTYPES

__all__ = ["add_commands", "id_flags_with_negative_values"]


def _ids(flag: str, text: str) -> list[int]:
    """Comma- (or space-) separated token ids >= 0, strictly: ``1,,2`` and ``-5`` are refused."""
    parts = re.split(r"\s*,\s*|\s+", text.strip())
    ids = []
    for t in parts:
        if not t:
            raise argparse.ArgumentTypeError(f"{flag}: an empty token id in {text!r} (two commas, or a comma at an end)")
        if not re.fullmatch(r"[+-]?\d+", t):
            raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated integers, got {t!r} in {text!r}")
        if int(t) < 0:
            raise argparse.ArgumentTypeError(f"{flag}: token ids are >= 0, got {t} in {text!r}")
        ids.append(int(t))
    return ids


def _prompts(values: list[str]) -> list[list[int]]:
    prompts = []
    for v in values:
        for part in v.split(";"):
            if part.strip():
                prompts.append(_ids("--prompt-ids", part))
    if not prompts:
        raise argparse.ArgumentTypeError("--prompt-ids: no prompt given")
    return prompts


def id_flags_with_negative_values(argv: list[str]) -> list[str]:
    """``--prompt-ids -5,2`` as ``--prompt-ids=-5,2``: argparse would take ``-5,2`` for an
    option and say the flag has no value; joined, the value reaches :func:`_ids`, which says
    what is wrong with it."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] in _ID_FLAGS and re.match(r"-\d", out[i + 1]):
            out[i:i + 2] = [f"{out[i]}={out[i + 1]}", None]
    return [a for a in out if a is not None]


_ID_FLAGS = ("--prompt-ids", "--stop")


def _cmd_rewrite(args) -> int:
    from .modelio import check_model_paths, data_files, load_model, save_model
    from .rewrite import model_info, rewrite
    model = load_model(args.input)
    # refused before the rewrite runs: OUT may not replace IN or a data file IN reads
    check_model_paths(args.output, [args.input, *data_files(model)])
    model = rewrite(model, kv_dtype=args.kv_dtype)
    written = save_model(model, args.output)
    info = model_info(model)
    print(f"{' + '.join(str(p) for p in written)}: {info['num_layers']} layers rewritten to kvcl::Attention "
          f"(kv heads {info['num_kv_heads']}, head dim {info['head_dim']}, scales {info['scales']}, "
          f"kv dtype {info['kv_dtype']})")
    return 0


def _stop_arg(values: "list[str] | None"):
    """``--stop``: None (the model's own ids), [] for ``none``, else the ids given."""
    if values is None:
        return "auto"
    ids = []
    for v in values:
        if v.strip().lower() == "none":
            return None
        ids += _ids("--stop", v)
    return ids


def _cmd_generate(args) -> int:
    from .generate import Generator
    if (args.prompt_ids is None) == (args.prompt is None):
        print("kvcl: give the prompt as text (--prompt) or as token ids (--prompt-ids), one of them",
              file=sys.stderr)
        return 2
    try:
        prompts = _prompts(args.prompt_ids) if args.prompt_ids is not None else None
        stop = _stop_arg(args.stop)
    except argparse.ArgumentTypeError as exc:
        print(f"kvcl: {exc}", file=sys.stderr)
        return 2
    gen = Generator(args.model, kv_dtype=args.kv_dtype, device=args.device, max_tokens=args.max_tokens,
                    tokenizer=args.tokenizer or "auto")
    try:
        if prompts is None:
            prompts = gen.encode_prompts(args.prompt, chat=args.chat)
        need = sum(len(p) for p in prompts) + len(prompts) * args.max_new_tokens
        if need > gen.max_tokens:   # the cache is sized by the request, as before
            gen.close()
            gen = Generator(args.model, kv_dtype=args.kv_dtype, device=args.device, max_tokens=need,
                            tokenizer=args.tokenizer or "auto")
        options = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                       stop_ids=stop)
        live = gen.tokenizer is not None and len(prompts) == 1 and not args.json
        if live:   # one prompt, a tokenizer: stream the text as it comes
            return _stream_text(gen, prompts[0], args.max_new_tokens, options)
        res = gen.generate(prompts, args.max_new_tokens, progress=not args.quiet, **options)
    finally:
        gen.close()
    if args.json:
        out = {"tokens": res.tokens.tolist(), "lengths": res.lengths, "prompt_lengths": res.prompt_lengths,
               "seconds": res.seconds, "kv_dtype": gen.kv_dtype}
        if res.texts is not None:
            out["texts"] = res.texts
        print(json.dumps(out))
    else:
        for i, (row, n) in enumerate(zip(res.tokens.tolist(), res.lengths)):
            print(f"[{i}] " + (res.texts[i] if res.texts is not None else " ".join(str(t) for t in row[:n])))
        steps = res.tokens.shape[1]
        if steps:
            print(f"{steps} tokens x {len(prompts)} prompts in {res.seconds:.2f} s "
                  f"({res.seconds / steps * 1e3:.1f} ms/step, kv {gen.kv_dtype})", file=sys.stderr)
    return 0


def _stream_text(gen, prompt: "list[int]", max_new_tokens: int, options: dict) -> int:
    """Print the continuation of one prompt token by token (whole characters only)."""
    import time

    from ..tokenizer import IncrementalDecoder
    dec = IncrementalDecoder(gen.tokenizer)
    stops = gen._stop_set(options["stop_ids"])
    t0, n = time.perf_counter(), 0
    for out in gen.stream([prompt], max_new_tokens, **options):
        tok = int(out.tokens[0])
        n += 1
        if tok in stops:
            break
        sys.stdout.write(dec.push(tok))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    sys.stdout.flush()
    dt = time.perf_counter() - t0
    if n:
        print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s, kv {gen.kv_dtype})", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    from .timing import bench_step
    rows = bench_step(args.model, contexts=args.contexts, batch=args.batch, steps=args.steps,
                      kv_dtype=args.kv_dtype, device=args.device)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'context':>8} {'batch':>5} {'bridge ms':>10} {'original ms':>12} {'speedup':>8} {'in op ms':>9}")
    for r in rows:
        print(f"{r['context']:>8} {r['batch']:>5} {r['bridge_ms']:>10.3f} {r['reference_ms']:>12.3f} "
              f"{r['speedup']:>8.2f} {r['op_ms']:>9.3f}")
    return 0


def _add_generate_args(p) -> None:
    p.add_argument("model", help="an ONNX export with past_key_values I/O, a rewritten model, a folder "
                                 "holding model.onnx (and its tokenizer), or a known model's name (smollm2)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text (needs tokenizer.json beside the model or --tokenizer; repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each --prompt as a user message with the model's chat template")
    p.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="token ids of one prompt, comma-separated (repeat the flag, or separate "
                        "prompts with ';', for a batch)")
    p.add_argument("--tokenizer", metavar="FOLDER", default=None,
                   help="folder with tokenizer.json (default: the model's folder)")
    p.add_argument("--stop", action="append", metavar="IDS",
                   help="stop at these token ids (comma-separated; 'none': never stop early; "
                        "default: the model's eos_token_id from generation_config.json / config.json)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default=None,
                   help="KV storage (default: the one a rewritten model records, else fp32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=4096, help="cache capacity in tokens")
    p.add_argument("--device", default=None, help="device index 'P:D' or name substring")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


def add_commands(subparsers) -> None:
    """Register ``onnx {rewrite,generate,bench}`` and ``generate`` on ``kvcl``'s subparsers."""
    onnx_p = subparsers.add_parser("onnx", help="the ONNX bridge: rewrite an export, generate, bench")
    sub = onnx_p.add_subparsers(dest="onnx_command", required=True)
    p = sub.add_parser("rewrite", help="replace each layer's attention core with kvcl::Attention")
    p.add_argument("input", help="an ONNX export with past_key_values.N.key/value inputs")
    p.add_argument("output", help="where to write the rewritten model")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="fp32",
                   help="default KV storage recorded in the model")
    p.set_defaults(func=_cmd_rewrite)
    _add_generate_args(sub.add_parser("generate", help="generate tokens for prompts through the bridge"))
    p = sub.add_parser("bench", help="per-step time: the bridge vs the model fed past_key_values")
    p.add_argument("model")
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)
    _add_generate_args(subparsers.add_parser("generate", help="generate tokens with an ONNX export through kvcl"))
