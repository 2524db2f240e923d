"""The ONNX bridge cases of ``kvcl bench``: which models (``--onnx-model``), their rows, and
the table of where a bridge step's time goes (:mod:`kvcl.onnx.timing`)."""

from __future__ import annotations

from .bench import Record
from .table import format_table

__all__ = ["bridge_model", "bridge_records", "format_bridge"]


#: the per-phase fields of a bridge row (kvcl.onnx.timing)
_BREAKDOWN = ("graph_ms", "op_ms", "plan_ms", "device_ms", "python_us_per_layer", "hook_us",
              "fixed_us_per_layer", "inline", "speedup_ceiling")


def bridge_model(spec, contexts, print_fn):
    """(ModelProto, label) of one ``--onnx-model`` spec: ``"synthetic"``, a known real model's
    name (:mod:`kvcl.onnx.models`; (None, None) with a message when it is not exported), a path
    or a ModelProto. Checked to be a decoder the bridge can take (RewriteError otherwise)."""
    from .onnx.models import EXPORT_HINT, KNOWN_MODELS, find_model
    from .onnx.rewrite import _load, rewrite
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
        model = _load(path)
    else:
        label = str(spec) if not hasattr(spec, "graph") else spec.graph.name
        model = _load(spec)
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
                     f("graph_ms"), f("op_ms"),
                     f("plan_ms", "{:.3f}"), f("device_ms"), f("python_us_per_layer", "{:.0f}"),
                     f("hook_us", "{:.0f}"), f("fixed_us_per_layer", "{:.0f}"), "yes" if e.get("inline") else "no"))
    if not rows:
        return ""
    return ("\n\nONNX bridge, per decode step (ms) and per layer (µs): graph = the rewritten model with the op "
            "bodies stubbed (onnxruntime + hook); ceiling = original / graph, the speedup with ops that cost "
            "nothing; ops = inside the kvcl ops, of which plan and device (kernels + blocking reads); fixed = "
            "python + hook per layer (P8 <= 60 µs); inline = PoCL's in-thread device\n"
            + format_table(["model", "context", "bridge", "original", "speedup", "ceiling", "graph", "ops", "plan",
                            "device", "python/layer", "hook", "fixed/layer", "inline"], rows, align="llrrrrrrrrrrrl"))
