"""The ONNX bridge cases of ``kvcl bench``: which models (``--onnx-model``), their rows, and
the table of where a bridge step's time goes (:mod:`kvcl.onnx.timing`); the perplexity rows
(``--perplexity MODEL``, :mod:`kvcl.onnx.perplexity`)."""

from __future__ import annotations

from .bench import Record
from .dtypes import KV_DTYPES
from .errors import InvalidArgument
from .table import format_table

__all__ = ["bridge_model", "bridge_records", "format_bridge", "check_perplexity_options", "perplexity_records",
           "format_perplexity"]


#: the per-phase fields of a bridge row (kvcl.onnx.timing)
_BREAKDOWN = ("graph_ms", "op_ms", "prepare_ms", "plan_ms", "device_ms", "python_us_per_layer", "hook_us",
              "fixed_us_per_layer", "inline", "speedup_ceiling")


def bridge_model(spec, contexts, print_fn):
    """(ModelProto, label) of one ``--onnx-model`` spec: ``"synthetic"``, a known real model's
    name (:mod:`kvcl.onnx.models`; (None, None) with a message when it is not exported), a path
    or a ModelProto. Checked to be a decoder the bridge can take (RewriteError otherwise)."""
    from .onnx.models import EXPORT_HINT, KNOWN_MODELS, find_model
    from .onnx.modelio import load_model
    from .onnx.rewrite import rewrite
    if isinstance(spec, str) and spec == "synthetic":
        from .onnx.benchmodel import gqa_decoder
        label = "synthetic: gqa_decoder(), 32/8 heads x 128"
        model = gqa_decoder(max_positions=max(8192, max(contexts) + 64))
    elif isinstance(spec, str) and spec in KNOWN_MODELS:
        path = find_model(spec)
        if path is None:
            print_fn(f"kvcl bench: skipping the {spec} bridge case: the model is not exported yet; "
                     f"make it with {EXPORT_HINT}")
            return None, None
        label = f"{spec}: {KNOWN_MODELS[spec][1]}"
        model = load_model(path)
    else:
        label = str(spec) if not hasattr(spec, "graph") else spec.graph.name
        model = load_model(spec)
    rewrite(model)
    return model, label


def bridge_records(model, label, contexts, dev, read_gbps) -> list[Record]:
    """The ONNX bridge rows: one per context (peer: the model fed past_key_values) + the hook."""
    from .onnx.timing import bench_step, hook_overhead_us

    out = []
    for row in bench_step(model, contexts=contexts, device=dev):
        seconds = row["bridge_ms"] / 1e3
        shape = {"context": row["context"], "batch": row["batch"], "layers": row["layers"], "model": label}
        out.append(Record("onnx_bridge", row["kv_dtype"], shape, seconds, row["kv_bytes"],
                          row["kv_bytes"] / seconds / 1e9, read_gbps, float("nan"),
                          peer="past_key_values", speedup=row["reference_ms"] / row["bridge_ms"],
                          note="one decode step of the whole model (utilisation not meaningful); "
                               "speedup = the same model fed past_key_values / the bridge, each "
                               "timed on its own, median of the steps",
                          extra={"reference_seconds": row["reference_ms"] / 1e3,
                                 **{k: row[k] for k in _BREAKDOWN}}))
    hook = hook_overhead_us()
    out.append(Record("onnx_hook_overhead", "-", {"q_shape": list(hook["q_shape"])},
                      hook["hook_overhead_us"] / 1e6, 0, float("nan"), read_gbps, float("nan"),
                      note="kvcl::Attention with its body swapped for identity, minus a native "
                           "Identity node: the Python custom-op bridge's cost per call",
                      extra={"op_call_us": hook["op_call_us"], "identity_call_us": hook["identity_call_us"]}))
    return out


def format_bridge(records: list[Record]) -> str:
    """Where the bridge rows' steps go (kvcl.onnx.timing), one line per model and context."""
    rows = []
    for r in records:
        if r.case != "onnx_bridge" or "graph_ms" not in r.extra:
            continue
        e = r.extra

        def f(key, fmt="{:.2f}"):
            v = e.get(key, float("nan"))
            return "-" if v != v else fmt.format(v)
        rows.append((str(r.shape.get("model", "")).split(":")[0], str(r.shape["context"]), f"{r.seconds * 1e3:.2f}",
                     f"{e['reference_seconds'] * 1e3:.2f}", f"{r.speedup:.2f}x", f("speedup_ceiling", "{:.2f}x"),
                     f("graph_ms"), f("op_ms"), f("prepare_ms", "{:.3f}"),
                     f("plan_ms", "{:.3f}"), f("device_ms"), f("python_us_per_layer", "{:.0f}"),
                     f("hook_us", "{:.0f}"), f("fixed_us_per_layer", "{:.0f}"), "yes" if e.get("inline") else "no"))
    if not rows:
        return ""
    return ("\n\nONNX bridge, per decode step (ms) and per layer (µs): graph = the rewritten model with the op "
            "bodies stubbed (onnxruntime + hook); ceiling = original / graph, the speedup with ops that cost "
            "nothing; ops = inside the kvcl ops, of which device (kernels + blocking reads); prepare = before the "
            "graph runs: the step planned (plan) and every layer's launches readied; python = ops + prepare - "
            "device, per layer; fixed = python + hook per layer (P8 <= 60 µs); inline = PoCL's in-thread device\n"
            + format_table(["model", "context", "bridge", "original", "speedup", "ceiling", "graph", "ops", "prepare",
                            "plan", "device", "python/layer", "hook", "fixed/layer", "inline"], rows,
                           align="llrrrrrrrrrrrrl"))


PERPLEXITY_KV_DTYPES = tuple(KV_DTYPES)


def check_perplexity_options(kv_dtypes, chunk) -> "tuple[list[str], int]":
    """(KV dtypes with fp32 first, chunk) of the perplexity case, refused with the option named
    (the CLI checks them before any case runs)."""
    from .validate import check_int
    if isinstance(kv_dtypes, str) or not isinstance(kv_dtypes, (list, tuple)) or not kv_dtypes:
        raise InvalidArgument(f"perplexity_kv_dtypes: expected a non-empty list of KV dtypes, got {kv_dtypes!r}")
    bad = [d for d in kv_dtypes if not isinstance(d, str) or d.lower() not in KV_DTYPES]
    if bad:
        raise InvalidArgument(f"perplexity_kv_dtypes: expected names among {', '.join(KV_DTYPES)}, got {bad}")
    dtypes = list(dict.fromkeys(d.lower() for d in kv_dtypes))
    if "fp32" not in dtypes:   # every delta is against the bridge's fp32
        dtypes.insert(0, "fp32")
    return dtypes, check_int("perplexity_chunk", chunk, low=1)


def perplexity_records(spec, dev, *, kv_dtypes=PERPLEXITY_KV_DTYPES, chunk: int = 128,
                       print_fn=print) -> list[Record]:
    """The perplexity rows of ``kvcl bench --perplexity MODEL``: the English segments of
    :func:`kvcl.onnx.perplexity.english_corpus` teacher forced through the original export fed
    past_key_values (the ``past_key_values`` row), then through the bridge per KV dtype, each
    dtype's pooled delta against the bridge's fp32 (with each segment's delta and the standard
    error of their mean) and the bound of issue 19. ``spec``: a known model's
    name (skipped with a message, [] returned, when it is not exported), a path or a folder
    holding ``tokenizer.json`` beside the model."""
    from .onnx.models import EXPORT_HINT, KNOWN_MODELS, find_model, resolve_model
    from .tokenizer import Tokenizer, find_tokenizer
    dtypes, chunk = check_perplexity_options(kv_dtypes, chunk)
    if isinstance(spec, str) and spec in KNOWN_MODELS and find_model(spec) is None:
        print_fn(f"kvcl bench: skipping the {spec} perplexity case: the model is not exported yet; "
                 f"make it with {EXPORT_HINT}")
        return []
    from .onnx import Generator, ReferenceRunner
    from .onnx.perplexity import BOUNDS, english_corpus, perplexity, reference_perplexity, within_bound
    from .onnx.modelio import load_model
    from .onnx.rewrite import rewrite
    path = resolve_model(spec)
    folder = find_tokenizer(path)
    if folder is None:
        raise InvalidArgument(f"perplexity: no tokenizer.json beside {path}: the text cannot be tokenized")
    label = f"{spec}: {KNOWN_MODELS[spec][1]}" if isinstance(spec, str) and spec in KNOWN_MODELS else str(spec)
    text = english_corpus()
    tok = Tokenizer(folder)
    ids = [tok.encode(t.text, add_special_tokens=False) for t in text.texts]
    total = sum(len(seg) for seg in ids)
    print_fn(f"kvcl bench: perplexity of {text.name} ({total} tokens) on {label}: past_key_values")
    original = load_model(path)
    results = [reference_perplexity(ReferenceRunner(original), ids, chunk=chunk)]
    rewritten = rewrite(original)
    del original
    for dt in dtypes:
        print_fn(f"kvcl bench: perplexity, kvcl {dt}")
        gen = Generator(rewritten, kv_dtype=dt, device=dev, max_tokens=max(map(len, ids)) + chunk, tokenizer=None)
        try:
            results.append(perplexity(gen, ids, chunk=chunk))
        finally:
            gen.close()
    base = next(r for r in results if r.route == "bridge" and r.kv_dtype == "fp32")
    out = []
    for r in results:
        delta, bound, ok = within_bound(r, base)
        shape = {"model": label, "text": text.name, "text_sha256": text.sha256, "text_source": text.source,
                 "segments": [t.name for t in text.texts], "scored_tokens": r.tokens, "chunk": chunk,
                 "route": r.route}
        out.append(Record(
            "perplexity", r.kv_dtype, shape, r.seconds, r.kv_bytes_per_token * max(map(len, ids)), float("nan"),
            float("nan"), float("nan"), peer="past_key_values" if r.route == "past_key_values" else None,
            note="teacher-forced perplexity of each segment in chunks of prefill, pooled; delta vs the bridge's "
                 "fp32 KV, with each segment's and the standard error of their mean; bytes = KV bytes of the "
                 "longest segment",
            extra={"ppl": r.ppl, "nll_sum": r.nll_sum, "delta_vs_fp32": delta, "ppl_bound": bound, "within_bound": ok,
                   "segment_deltas": r.segment_deltas(base), "delta_stderr": r.delta_stderr(base),
                   "kv_bytes_per_token": r.kv_bytes_per_token, "ids_sha256": r.ids_sha256,
                   "bounds": dict(BOUNDS)}))
    return out


def format_perplexity(records: list[Record]) -> str:
    """The perplexity table of ``kvcl bench --perplexity``."""
    rows = []
    for r in records:
        if r.case != "perplexity":
            continue
        e = r.extra
        bound, ok = e.get("ppl_bound"), e.get("within_bound")
        if r.shape.get("route") == "past_key_values":
            kind, verdict = "original (past_key_values)", ("pass" if abs(e["delta_vs_fp32"]) <= 1e-4 else "FAIL")
            bound_text = "±0.01% (harness)"
        else:
            kind, verdict = f"kvcl {r.kv_dtype}", "-" if ok is None else ("pass" if ok else "FAIL")
            bound_text = "-" if bound is None else f"+{100 * bound:.1f}%"
        delta = 100 * e["delta_vs_fp32"]
        delta_text = f"{delta:+.1e}%" if 0 < abs(delta) < 1e-3 else f"{delta:+.3f}%"
        segs, se = e.get("segment_deltas") or [], e.get("delta_stderr")
        seg_text = f"{100 * min(segs):+.2f}..{100 * max(segs):+.2f}%" if len(segs) > 1 else "-"
        se_text = "-" if se is None else f"±{100 * se:.2f}%"
        rows.append((kind, f"{e['ppl']:.4f}", delta_text, se_text, seg_text, bound_text, verdict,
                     str(e["kv_bytes_per_token"]), f"{r.seconds:.1f}"))
    if not rows:
        return ""
    first = next(r for r in records if r.case == "perplexity")
    return (f"\n\nPerplexity (issue 19): {first.shape['text']} ({first.shape['scored_tokens']} tokens scored, sha256 "
            f"{first.shape['text_sha256'][:12]}), each segment its own sequence, chunks of {first.shape['chunk']}; "
            "pooled delta vs kvcl fp32 KV, the standard error of the segments' mean, their range\n"
            + format_table(["KV", "ppl", "delta", "± s.e.", "segments", "bound", "result", "KV bytes/token", "s"],
                           rows, align="lrrrrrlrr"))
