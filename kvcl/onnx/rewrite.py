"""Rewrite an exported decoder so that kvcl owns its KV cache.

:func:`rewrite` takes a model with ``past_key_values.N.key/value`` inputs and
``present.N.key/value`` outputs and returns one where each layer's attention core
(``QK^T -> scale -> mask -> softmax -> ·V``, or an opset-23 ``Attention`` node) is a single
``kvcl::Attention`` node, the past inputs and present outputs are gone, and one int64 input
``kvcl_step`` [3, B] (sequence ids, past lengths, new lengths) is added.

How a layer is found, anchored on ``Concat(past, new) -> present.N.*``:

1. ``present.N.key`` / ``.value`` are produced by a Concat on the sequence axis whose one input
   comes (through Identity or one-input Concat) from ``past_key_values.N.*``; the other input is
   ``k_new`` / ``v_new``.
2. From the K concat, layout ops (Unsqueeze/Expand/Reshape/Transpose/Squeeze/Cast/Identity,
   scalar Mul/Div) lead to the score MatMul (K as its second operand) or to an ``Attention``
   node; from the V concat, to the MatMul that applies the probabilities.
3. Between the two MatMuls: scalar Mul/Div (scale), Add / Where (the mask, dropped), Cast,
   Softmax(axis=-1), ``Where(IsNaN(p), 0, p)``. Every scalar factor on the q, k and score paths
   folds into the op's ``scale``; q is what remains before the first scalar factor.
4. Dead nodes are pruned; a surviving ``Shape`` of a past or present tensor is re-derived from
   ``input_ids`` / ``attention_mask`` (or ``kvcl_step``). Any other surviving use is an error.

onnxruntime-genai exports (``com.microsoft.GroupQueryAttention`` reading ``past_key_values.N.*``
itself, packed QKV, RoPE inside) take a second route: each GQA node becomes
``kvcl::AttentionQKV`` (packed QKV in, RoPE applied by the cache's fused ``write_qkv``).

Computed scalars (e.g. ``1/sqrt(Shape(q)[-1])``) and every re-derived ``Shape`` are evaluated
by running the original model in onnxruntime at three tiny input shapes (so a rewrite needs
onnxruntime, and loads the model twice).

A model it cannot handle raises :class:`RewriteError` naming the pattern it did not find.
"""

from __future__ import annotations

from typing import Any

from ..dtypes import kv_dtype as _kv_dtype
from .customop import OP_DOMAIN, STEP_INPUT
from .graph import _PAST, _PRESENT, RewriteError, _Graph, _weightless
from .matching import _replace_cores, _replace_gqa
from .modelio import load_model
from .shapes import _rederive_shapes

__all__ = ["rewrite", "RewriteError", "is_rewritten", "model_info", "DEFAULT_HANDLE"]

DEFAULT_HANDLE = "kvcl"


def is_rewritten(model) -> bool:
    return any(p.key == "kvcl.rewritten" for p in model.metadata_props)


def model_info(model) -> dict:
    """The kvcl metadata a rewritten model carries (num_layers, num_kv_heads, head_dim, ...)."""
    meta = {p.key: p.value for p in model.metadata_props if p.key.startswith("kvcl.")}
    if "kvcl.rewritten" not in meta:
        raise RewriteError("model: not rewritten by kvcl.onnx.rewrite (no kvcl.* metadata)")
    out = {}
    for k, v in meta.items():
        k = k[len("kvcl."):]
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out




def rewrite(model_or_path: Any, *, kv_dtype: str = "fp32", handle: str = DEFAULT_HANDLE):
    """Replace every layer's attention core with ``kvcl::Attention``; return the new ModelProto.

    Parameters
    ----------
    model_or_path : str, Path or onnx.ModelProto
        An export with ``past_key_values.N.key/value`` inputs and ``present.N.*`` outputs.
    kv_dtype : str
        Recorded in the model's metadata (``kvcl.kv_dtype``): the storage a
        :class:`kvcl.onnx.Generator` uses by default.
    handle : str
        The cache registry key baked into each op (a Generator replaces it with its own).

    Raises
    ------
    RewriteError
        Naming the pattern that was not found.
    """
    import onnx
    from onnx import TensorProto, helper

    kv_name = _kv_dtype(kv_dtype).name
    model = load_model(model_or_path)
    if is_rewritten(model):
        raise RewriteError("model: already rewritten by kvcl (metadata kvcl.rewritten is set)")
    G = _Graph(model)
    g = G.g
    past_inputs = {i.name: i for i in g.input if _PAST.match(i.name)}
    present_outputs = {o.name for o in g.output if _PRESENT.match(o.name)}
    if not past_inputs:
        raise RewriteError("model: no past_key_values.N.key/value inputs (pattern past_key_values.<N>.key "
                           f"not found among inputs {[i.name for i in g.input]})")
    layers = sorted({int(_PAST.match(n).group(1)) for n in past_inputs})
    for layer in layers:
        for kind in ("key", "value"):
            if f"past_key_values.{layer}.{kind}" not in past_inputs or f"present.{layer}.{kind}" not in present_outputs:
                raise RewriteError(f"layer {layer}: past_key_values.{layer}.{kind} / present.{layer}.{kind} pair not found")
    if layers != list(range(len(layers))):
        raise RewriteError(f"model: layers {layers} are not numbered 0..N-1")
    gqa = [n for n in g.node if n.domain == "com.microsoft" and n.op_type == "GroupQueryAttention"]
    past_elem = past_inputs["past_key_values.0.key"].type.tensor_type.elem_type
    if gqa:
        kv_heads, head_dim, num_heads, scales = _replace_gqa(G, gqa, layers, kv_name, handle)
    else:
        for n in g.node:
            if n.domain == "com.microsoft" and "Attention" in n.op_type:
                raise RewriteError(f"model: {n.domain}.{n.op_type} ({n.name}) owns the KV cache itself; "
                                   "only GroupQueryAttention and Concat(past_key_values.N.*, new) -> present.N.* "
                                   "are supported")
        kv_heads, head_dim, num_heads, scales = _replace_cores(G, model, past_inputs, layers, handle)

    # I/O: drop past inputs / present outputs, add kvcl_step
    keep_in = [i for i in g.input if i.name not in past_inputs]
    del g.input[:]
    g.input.extend(keep_in)
    g.input.append(helper.make_tensor_value_info(STEP_INPUT, TensorProto.INT64, [3, "batch"]))
    keep_out = [o for o in g.output if o.name not in present_outputs]
    del g.output[:]
    g.output.extend(keep_out)

    _rederive_shapes(model, original=load_model(model_or_path), past=set(past_inputs), kv_heads=kv_heads,
                     head_dim=head_dim)

    # opset import for the kvcl domain; metadata
    if not any(o.domain == OP_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, 1))
    del g.value_info[:]  # stale after the rewrite; onnxruntime re-infers
    meta = {"kvcl.rewritten": "1", "kvcl.num_layers": str(len(layers)), "kvcl.num_kv_heads": str(kv_heads),
            "kvcl.head_dim": str(head_dim), "kvcl.kv_dtype": kv_name,
            "kvcl.num_heads": str(num_heads or 0), "kvcl.past_elem_type": str(past_elem),
            "kvcl.scales": ",".join(f"{x:.9g}" for x in scales), "kvcl.op": ",".join(sorted({n.op_type for n in g.node if n.domain == OP_DOMAIN}))}
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    try:   # weights aside: the checker serialises what it checks
        onnx.checker.check_model(_weightless(model))
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a bug in the rewrite
        try:  # exports with contrib ops in the default domain (genai) fail the checker anyway
            onnx.checker.check_model(_weightless(load_model(model_or_path)))
        except onnx.checker.ValidationError:
            pass
        else:
            raise RewriteError(f"the rewritten model does not validate: {exc}") from None
    return model
