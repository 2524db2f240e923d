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

import re
from collections import defaultdict
from typing import Any

import numpy as np

from ..dtypes import kv_dtype as _kv_dtype
from ..errors import KvclError
from .modelio import configure_session, load_model, session_source, tensor_dims, tensor_value
from .customop import OP_DOMAIN, OP_TYPE, OP_TYPE_QKV, OP_TYPE_QKV_ROPE, STEP_INPUT

__all__ = ["rewrite", "RewriteError", "is_rewritten", "model_info", "DEFAULT_HANDLE"]

DEFAULT_HANDLE = "kvcl"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_LAYOUT = {"Unsqueeze", "Expand", "Reshape", "Transpose", "Squeeze", "Cast", "Identity", "Flatten"}


class RewriteError(KvclError, ValueError):
    """The model does not have a pattern the rewrite knows."""


class _Graph:
    def __init__(self, model):
        self.model = model
        self.g = model.graph
        for i, n in enumerate(self.g.node):
            if not n.name:
                n.name = f"_kvcl_node_{i}"
        self.init = {t.name: t for t in self.g.initializer}
        self.index()

    def const_dims(self, name):
        """The shape of an initializer or Constant output (without reading its data), else None."""
        if name in self.init:
            return tensor_dims(self.init[name])
        v = self.const_value(name) if self.prod.get(name) is not None else None
        return None if v is None else v.shape

    def index(self):
        self.prod = {}
        self.cons = defaultdict(list)
        for n in self.g.node:
            for o in n.output:
                if o:
                    self.prod[o] = n
            for i in n.input:
                if i:
                    self.cons[i].append(n)

    def const_value(self, name):
        """numpy value of an initializer or Constant output, else None."""
        from onnx import numpy_helper
        if name in self.init:
            return tensor_value(self.init[name])
        n = self.prod.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
                if a.name == "value_int":
                    return np.array(a.i, np.int64)
        return None


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Scalar:
    """A scalar factor on an attention path: tensor name, and +1 (Mul) or -1 (Div)."""

    def __init__(self, name, power, where):
        self.name, self.power, self.where = name, power, where


def _scalar_operand(G: _Graph, node, data_in: str, shapes: dict):
    """For a Mul/Div on the data path, the other operand if it is a scalar, else None."""
    other = [i for i in node.input if i != data_in]
    if len(other) != 1 or len(node.input) != 2:
        return None
    o = other[0]
    if node.op_type == "Div" and node.input[0] != data_in:
        return None  # data is the denominator
    dims = G.const_dims(o)
    if dims is not None:
        return o if int(np.prod(dims)) == 1 else None
    shp = shapes.get(o)
    if shp is not None and all(isinstance(d, int) and d == 1 for d in shp):
        return o
    # computed scalar (e.g. 1/sqrt(Shape(q)[-1])): accept if it does not depend on activations
    if _is_shape_only(G, o):
        return o
    return None


def _is_shape_only(G: _Graph, name: str, depth: int = 0) -> bool:
    """True if ``name`` is computed only from constants and Shape() of tensors."""
    if depth > 40:
        return False
    if G.const_dims(name) is not None:
        return True
    n = G.prod.get(name)
    if n is None:
        return False  # a graph input
    if n.op_type == "Shape":
        return True
    return all(_is_shape_only(G, i, depth + 1) for i in n.input if i)


def _walk_forward(G: _Graph, start: str, shapes, stop, what: str, layer: int):
    """From ``start`` through layout ops and scalar Mul/Div to nodes satisfying ``stop``.

    Returns (target node, the input name by which the path enters it, scalars on the way).
    """
    found = []
    seen = set()
    stack = [(start, [])]
    while stack:
        t, scalars = stack.pop()
        for c in G.cons.get(t, []):
            key = (c.name, t)
            if key in seen:
                continue
            seen.add(key)
            if stop(c, t):
                found.append((c, t, scalars))
            elif c.op_type in _LAYOUT and c.input[0] == t:
                stack.append((c.output[0], scalars))
            elif c.op_type in ("Mul", "Div"):
                s = _scalar_operand(G, c, t, shapes)
                if s is not None:
                    stack.append((c.output[0], scalars + [_Scalar(s, 1 if c.op_type == "Mul" else -1, c.name)]))
            # Shape and everything else: not on the data path (re-derived or dead after rewrite)
    uniq = {id(f[0]): f for f in found}
    if len(uniq) != 1:
        raise RewriteError(
            f"layer {layer}: expected exactly one {what} reached from the {'K' if 'score' in what else 'V'} "
            f"concat through layout ops, found {len(uniq)}")
    return next(iter(uniq.values()))


def _past_source(G: _Graph, name: str, depth=0):
    """The past_key_values input ``name`` derives from through Identity / one-input Concat."""
    if _PAST.match(name):
        return name
    n = G.prod.get(name)
    if n is None or depth > 4:
        return None
    if n.op_type == "Identity" or (n.op_type == "Concat" and len([i for i in n.input if i]) == 1):
        return _past_source(G, n.input[0], depth + 1)
    return None


def _concat_parts(G: _Graph, present: str, layer: int, kind: str):
    node = G.prod.get(present)
    if node is None or node.op_type != "Concat":
        raise RewriteError(
            f"layer {layer}: pattern Concat(past_key_values.{layer}.{kind}, new) -> present.{layer}.{kind} "
            f"not found: present.{layer}.{kind} is produced by "
            f"{node.op_type if node is not None else 'nothing (a graph input?)'}")
    ins = [i for i in node.input if i]
    past = [i for i in ins if _past_source(G, i) == f"past_key_values.{layer}.{kind}"]
    new = [i for i in ins if i not in past]
    if len(ins) != 2 or len(past) != 1 or len(new) != 1:
        raise RewriteError(
            f"layer {layer}: pattern Concat(past_key_values.{layer}.{kind}, new) -> present.{layer}.{kind} "
            f"not found: the Concat has inputs {ins}")
    axis = _attr(node, "axis")
    if axis not in (2, -2):
        raise RewriteError(f"layer {layer}: present.{layer}.{kind} concatenates on axis {axis}, "
                           "expected the sequence axis (2 of [B, KVH, T, D])")
    return node, new[0]


def _weightless(model):
    """``model`` with its large float initializers turned into graph inputs of the same type and
    shape, for shape inference: onnx serialises the whole model to infer it (9 s and 16 s of
    the rewrite of a 600 MB export went there). Integer tensors (shapes, indices) stay."""
    import onnx
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.BOOL}
    declared = {i.name for i in src.input}   # IR < 4 lists initializers among the inputs too
    for t in src.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if (n > 1024 and t.data_type not in ints) or t.data_location == onnx.TensorProto.EXTERNAL:
            if t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return m


def _infer_shapes(model) -> dict:
    """name -> list of dims (int or None) for tensors whose rank onnx shape inference knows."""
    import onnx
    out = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False)
    except Exception:  # pragma: no cover - inference is best effort
        return out
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return out


def _elem_types(model) -> dict:
    import onnx
    out = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False)
    except Exception:  # pragma: no cover
        return out
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        out[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        out[t.name] = t.data_type
    return out


class _Layer:
    def __init__(self, index):
        self.index = index
        self.scalars: list[_Scalar] = []
        self.fixed_scale = 1.0
        self.default_scale = False


def _match_layer(G: _Graph, layer: int, shapes) -> _Layer:
    L = _Layer(layer)
    L.kcat, L.k_new = _concat_parts(G, f"present.{layer}.key", layer, "key")
    L.vcat, L.v_new = _concat_parts(G, f"present.{layer}.value", layer, "value")

    def is_core(c, t):
        return (c.op_type == "MatMul" and len(c.input) == 2 and c.input[1] == t) or \
               (c.op_type == "Attention" and c.domain in ("", "ai.onnx") and len(c.input) > 1 and c.input[1] == t)

    core, _, kscal = _walk_forward(G, L.kcat.output[0], shapes, is_core, "score MatMul(q, K^T) or Attention node", layer)
    if core.op_type == "Attention":
        if len(core.input) < 3:
            raise RewriteError(f"layer {layer}: Attention node {core.name} has no V input")
        vnode, vin, vscal = _walk_forward(G, L.vcat.output[0], shapes, lambda c, t: c.name == core.name, "Attention value input", layer)
        if vin != core.input[2] or vscal:
            raise RewriteError(f"layer {layer}: the V concat does not feed input 2 of Attention node {core.name}")
        for a, ok in (("softcap", 0.0), ("qk_matmul_output_mode", 0)):
            if _attr(core, a, ok) != ok:
                raise RewriteError(f"layer {layer}: Attention node {core.name} has {a}={_attr(core, a)}; unsupported")
        if len([o for o in core.output if o]) > 1 and any(G.cons.get(o) for o in core.output[1:] if o):
            raise RewriteError(f"layer {layer}: Attention node {core.name} has used present/qk outputs; unsupported")
        if len(core.input) > 4 and any(core.input[4:]):
            raise RewriteError(f"layer {layer}: Attention node {core.name} takes past_key/past_value inputs; unsupported")
        scale = _attr(core, "scale", 0.0)
        L.scalars = kscal
        L.default_scale = not scale
        L.fixed_scale = float(scale) if scale else 1.0
        q = core.input[0]
        L.q, L.q_scalars = _walk_q_back(G, q, shapes)
        L.out_node, L.out = core, core.output[0]
        return L

    mm_qk = core
    L.scalars = list(kscal)

    def is_pv(c, t):
        return c.op_type == "MatMul" and len(c.input) == 2 and c.input[1] == t

    mm_pv, _, vscal = _walk_forward(G, L.vcat.output[0], shapes, is_pv, "probabilities MatMul(P, V)", layer)
    if vscal:
        raise RewriteError(f"layer {layer}: scalar factor on the V path ({vscal[0].where}); unsupported")
    # score path: mm_qk -> ... -> Softmax -> ... -> mm_pv.input[0]
    t = mm_qk.output[0]
    seen_softmax = False
    steps = 0
    while t != mm_pv.input[0]:
        steps += 1
        if steps > 16:
            raise RewriteError(f"layer {layer}: no Softmax path from {mm_qk.name} to {mm_pv.name}")
        users = [c for c in G.cons.get(t, []) if c.op_type not in ("Shape", "IsNaN")]
        if len(users) != 1:
            raise RewriteError(
                f"layer {layer}: the score tensor {t} has {len(users)} consumers "
                f"({', '.join(u.op_type for u in users)}); expected one chain to Softmax")
        c = users[0]
        if c.op_type == "Softmax":
            if _attr(c, "axis", -1) not in (-1, 3) or seen_softmax:
                raise RewriteError(f"layer {layer}: Softmax {c.name} is not over the last axis")
            seen_softmax = True
        elif c.op_type in ("Mul", "Div") and not seen_softmax:
            s = _scalar_operand(G, c, t, shapes)
            if s is None:
                raise RewriteError(f"layer {layer}: {c.op_type} {c.name} on the score path is not by a scalar")
            L.scalars.append(_Scalar(s, 1 if c.op_type == "Mul" else -1, c.name))
        elif c.op_type == "Add" and not seen_softmax:
            pass  # the additive mask: kvcl applies the causal mask itself
        elif c.op_type == "Where":
            if seen_softmax:  # Where(IsNaN(p), 0, p)
                cond = G.prod.get(c.input[0])
                if cond is None or cond.op_type != "IsNaN" or c.input[2] != t:
                    raise RewriteError(f"layer {layer}: Where {c.name} after Softmax is not Where(IsNaN(p), 0, p)")
            # before softmax: a boolean mask (dropped)
        elif c.op_type in ("Cast", "Identity"):
            pass
        elif c.op_type in ("Tanh",):
            raise RewriteError(f"layer {layer}: logit soft-capping (Tanh on the scores) is not supported")
        else:
            raise RewriteError(f"layer {layer}: unexpected {c.op_type} ({c.name}) on the score path "
                               f"between {mm_qk.name} and Softmax/{mm_pv.name}")
        t = c.output[0]
    if not seen_softmax:
        raise RewriteError(f"layer {layer}: pattern QK^T -> Softmax -> ·V not found (no Softmax between "
                           f"{mm_qk.name} and {mm_pv.name})")
    L.q, L.q_scalars = _walk_q_back(G, mm_qk.input[0], shapes)
    L.out_node, L.out = mm_pv, mm_pv.output[0]
    return L


def _walk_q_back(G: _Graph, q: str, shapes):
    scalars = []
    for _ in range(8):
        n = G.prod.get(q)
        if n is None or n.op_type not in ("Mul", "Div"):
            break
        data = None
        for cand in n.input[: (1 if n.op_type == "Div" else 2)]:
            s = _scalar_operand(G, n, cand, shapes)
            if s is not None:
                data, sc = cand, s
                break
        if data is None:
            break
        scalars.append(_Scalar(sc, 1 if n.op_type == "Mul" else -1, n.name))
        q = data
    return q, scalars


def _evaluate(model, names: list[str], kv_heads: int, head_dim: int) -> dict:
    """Values of computed scalar tensors (scale factors), checked constant across input shapes."""
    out = {}
    for n, per_cfg in zip(names, _run_original(model, names, kv_heads, head_dim)):
        vals = [float(np.asarray(v).reshape(-1)[0]) for v in per_cfg]
        if not np.allclose(vals, vals[0], rtol=1e-6):
            raise RewriteError(f"scale factor {n} depends on the input shape ({vals}); unsupported")
        out[n] = vals[0]
    return out


def _dummy_feed(model, b, s, p, kv_heads, head_dim):
    feed = {}
    from onnx import TensorProto
    for i in model.graph.input:
        if i.name in {t.name for t in model.graph.initializer}:
            continue
        et = i.type.tensor_type.elem_type
        dt = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
              TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}.get(et, np.float32)
        if _PAST.match(i.name):
            feed[i.name] = np.zeros((b, kv_heads, p, head_dim), dt)
        elif i.name == "input_ids":
            feed[i.name] = np.ones((b, s), dt)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((b, p + s), dt)
        elif i.name == "position_ids":
            feed[i.name] = np.tile(np.arange(p, p + s, dtype=dt), (b, 1))
        else:
            raise RewriteError(f"unknown graph input {i.name!r}; expected input_ids, attention_mask, "
                               "position_ids and past_key_values.N.key/value")
    return feed


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


_load = load_model   # the name the bridge's modules import


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
    model = _load(model_or_path)
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

    _rederive_shapes(model, original=_load(model_or_path), past=set(past_inputs), kv_heads=kv_heads,
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
            onnx.checker.check_model(_weightless(_load(model_or_path)))
        except onnx.checker.ValidationError:
            pass
        else:
            raise RewriteError(f"the rewritten model does not validate: {exc}") from None
    return model


def _replace_cores(G: "_Graph", model, past_inputs, layers, handle):
    """The Concat(past, new) route: each layer's MatMul/Softmax core or opset-23 Attention."""
    from onnx import TensorProto, helper
    g = G.g
    # dims from the past input types
    pdims = [d.dim_value if d.HasField("dim_value") else None
             for d in past_inputs["past_key_values.0.key"].type.tensor_type.shape.dim]
    if len(pdims) != 4 or pdims[1] is None or pdims[3] is None:
        raise RewriteError(f"past_key_values.0.key: expected [B, KVH, past, D] with static KVH and D, got {pdims}")
    kv_heads, head_dim = pdims[1], pdims[3]

    shapes = _infer_shapes(model)
    types = _elem_types(model)
    found = [_match_layer(G, layer, shapes) for layer in layers]

    # fold scales
    unresolved = []
    for L in found:
        for s in L.scalars + L.q_scalars:
            if G.const_value(s.name) is None:
                unresolved.append(s.name)
    values = _evaluate(model, sorted(set(unresolved)), kv_heads, head_dim) if unresolved else {}
    num_heads = None
    for L in found:
        scale = L.fixed_scale if not L.default_scale else 1.0 / np.sqrt(head_dim)
        for s in L.scalars + L.q_scalars:
            v = G.const_value(s.name)
            v = float(np.asarray(v).reshape(-1)[0]) if v is not None else float(values[s.name])
            scale *= v ** s.power
        L.scale = float(scale)
        qs = shapes.get(L.q)
        if qs and len(qs) == 4 and qs[1]:
            num_heads = qs[1]

    # replace the cores
    new_nodes = []
    extra_out_casts = {}
    for L in found:
        ins = []
        for name, role in ((L.q, "q"), (L.k_new, "k"), (L.v_new, "v")):
            et = types.get(name, TensorProto.FLOAT)
            if et not in (TensorProto.FLOAT, 0):
                cast = f"{name}_kvcl_f32"
                new_nodes.append((L, helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT,
                                                      name=f"kvcl_cast_{role}_{L.index}")))
                name = cast
            ins.append(name)
        out = L.out
        out_et = types.get(out, TensorProto.FLOAT)
        op_out = out if out_et in (TensorProto.FLOAT, 0) else f"{out}_kvcl_f32"
        node = helper.make_node(OP_TYPE, ins + [STEP_INPUT], [op_out], domain=OP_DOMAIN,
                                name=f"kvcl_attention_{L.index}", handle=handle, layer=L.index,
                                scale=L.scale)
        new_nodes.append((L, node))
        if op_out != out:
            new_nodes.append((L, helper.make_node("Cast", [op_out], [out], to=out_et, name=f"kvcl_cast_out_{L.index}")))
        extra_out_casts[L.index] = op_out
    # remove the replaced core nodes, insert ours where they were
    core_names = {L.out_node.name: L for L in found}
    nodes = []
    for n in g.node:
        if n.name in core_names:
            L = core_names[n.name]
            nodes.extend(nn for LL, nn in new_nodes if LL is L)
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return kv_heads, head_dim, num_heads, [L.scale for L in found]


def _replace_gqa(G: "_Graph", nodes, layers, kv_name, handle):
    """The onnxruntime-genai route: each ``com.microsoft.GroupQueryAttention`` (packed or split
    QKV, RoPE inside) becomes ``kvcl::AttentionQKV`` (RoPE applied by the cache's fused write)."""
    from onnx import TensorProto, helper
    g = G.g
    by_layer = {}
    for n in nodes:
        m = _PAST.match(n.input[3]) if len(n.input) > 3 else None
        if m is None or m.group(2) != "key" or len(n.input) < 5 or n.input[4] != f"past_key_values.{m.group(1)}.value":
            raise RewriteError(f"GroupQueryAttention {n.name}: past_key/past_value inputs are not "
                               "past_key_values.N.key/value graph inputs")
        layer = int(m.group(1))
        outs = list(n.output) + ["", ""]
        if outs[1] != f"present.{layer}.key" or outs[2] != f"present.{layer}.value":
            raise RewriteError(f"GroupQueryAttention {n.name}: outputs 1-2 are not present.{layer}.key/value")
        if layer in by_layer:
            raise RewriteError(f"layer {layer}: two GroupQueryAttention nodes read past_key_values.{layer}.key")
        by_layer[layer] = n
    if sorted(by_layer) != list(layers):
        raise RewriteError(f"model: GroupQueryAttention nodes cover layers {sorted(by_layer)}, expected {list(layers)}")
    kv_heads = head_dim = num_heads = None
    scales = []
    replace = {}
    for layer in layers:
        n = by_layer[layer]
        for a, ok in (("softcap", 0.0), ("local_window_size", -1), ("smooth_softmax", 0), ("qk_output", 0)):
            if _attr(n, a, ok) != ok:
                raise RewriteError(f"layer {layer}: GroupQueryAttention {n.name} has {a}={_attr(n, a)}; unsupported")
        if any(n.input[9:]):
            raise RewriteError(f"layer {layer}: GroupQueryAttention {n.name} takes position_ids / attention_bias / "
                               "head_sink inputs; unsupported")
        hq, hkv = int(_attr(n, "num_heads")), int(_attr(n, "kv_num_heads"))
        do_rotary = int(_attr(n, "do_rotary", 0))
        cos = G.const_value(n.input[7]) if len(n.input) > 7 and n.input[7] else None
        packed = not (len(n.input) > 2 and n.input[1] and n.input[2])
        width = _last_dim(G, n.input[0])
        if not packed:
            width = None
        d = None
        if width:
            d = width // (hq + 2 * hkv)
        elif not packed:
            qw = _last_dim(G, n.input[0])
            d = qw // hq if qw else None
        if do_rotary:
            if cos is None:
                raise RewriteError(f"layer {layer}: GroupQueryAttention {n.name}: cos_cache is not a constant")
            if d is None:
                d = 2 * cos.shape[1]
            if 2 * cos.shape[1] != d:
                raise RewriteError(f"layer {layer}: partial rotary (rotary dim {2 * cos.shape[1]} < head dim {d}); "
                                   "unsupported")
        if d is None:
            raise RewriteError(f"layer {layer}: GroupQueryAttention {n.name}: head dim not found")
        if (kv_heads, head_dim, num_heads) not in ((None, None, None), (hkv, d, hq)):
            raise RewriteError(f"layer {layer}: head shapes differ from layer 0; unsupported")
        kv_heads, head_dim, num_heads = hkv, d, hq
        scale = float(_attr(n, "scale", 0.0)) or 1.0 / float(np.sqrt(d))
        scales.append(scale)
        new = []
        qkv = n.input[0]
        if not packed:
            qkv = f"kvcl_qkv_{layer}"
            new.append(helper.make_node("Concat", [n.input[0], n.input[1], n.input[2]], [qkv], axis=-1,
                                        name=f"kvcl_pack_qkv_{layer}"))
        if do_rotary:   # the tables stay initializers, named by attributes: not op inputs, which
            # onnxruntime would copy for every call (32 MB each for 131072 positions)
            cs, sn = (_as_initializer(G, n.input[i]) for i in (7, 8))
            rope = "interleaved" if int(_attr(n, "rotary_interleaved", 0)) else "half"
            new.append(helper.make_node(OP_TYPE_QKV_ROPE, [qkv, STEP_INPUT], [n.output[0]], domain=OP_DOMAIN,
                                        name=f"kvcl_attention_{layer}", handle=handle, layer=layer,
                                        scale=scale, num_heads=hq, rope=rope, cos_table=cs, sin_table=sn))
        else:
            cs = f"kvcl_no_rope_{layer}"
            new.append(helper.make_node("Constant", [], [cs], value=helper.make_tensor("v", TensorProto.FLOAT, [1, 1], [0.0])))
            new.append(helper.make_node(OP_TYPE_QKV, [qkv, STEP_INPUT, cs, cs], [n.output[0]], domain=OP_DOMAIN,
                                        name=f"kvcl_attention_{layer}", handle=handle, layer=layer,
                                        scale=scale, num_heads=hq, rope="none"))
        replace[n.name] = new
    out = []
    for n in g.node:
        out.extend(replace.get(n.name, [n]))
    del g.node[:]
    g.node.extend(out)
    return kv_heads, head_dim, num_heads, scales


def _as_initializer(G: "_Graph", name: str) -> str:
    """``name`` if it is an initializer, else an initializer holding its constant value (one per
    constant, however many layers read it)."""
    from onnx import numpy_helper
    if name in G.init:
        return name
    new_name = f"kvcl_const_{name}"
    if new_name in G.init:
        return new_name
    t = numpy_helper.from_array(np.asarray(G.const_value(name), np.float32), new_name)
    G.g.initializer.append(t)
    G.init[new_name] = t
    return new_name


def _last_dim(G: "_Graph", name: str):
    """Static last dim of ``name`` if a MatMul by a constant weight (plus bias) produced it."""
    n = G.prod.get(name)
    if n is not None and n.op_type == "Add":
        for i in n.input:
            if G.prod.get(i) is not None and G.prod[i].op_type == "MatMul":
                n = G.prod[i]
                break
    if n is not None and n.op_type == "MatMul":
        dims = G.const_dims(n.input[1])
        if dims:
            return int(dims[-1])
    return None


def _prune(g) -> None:
    """Drop nodes whose outputs reach no graph output; unused initializers too."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
            if n.domain == OP_DOMAIN:   # RoPE tables that kvcl ops name instead of reading
                needed.update(a.s.decode() for a in n.attribute if a.name in ("cos_table", "sin_table"))
            for a in n.attribute:  # subgraphs (If/Loop) read outer names
                for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    for sn in sg.node:
                        needed.update(i for i in sn.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


# ---- re-deriving Shape() of tensors that no longer exist -------------------------------------

_FIT_CONFIGS = ((2, 3, 5), (3, 1, 6), (1, 4, 9))  # (B, S, past): B, S, past, total all distinguishable


def _rederive_shapes(model, original, past: set, kv_heads: int, head_dim: int) -> None:
    """Replace every live Shape() of a tensor that depended on the past inputs.

    Each element of such a Shape's output is fitted, on the original model run at three tiny
    configurations, as a constant or an integer multiple of B, S, past or total (= past + S);
    the replacement computes it from ``input_ids`` / ``attention_mask`` (or ``kvcl_step``).
    """
    from onnx import TensorProto, helper
    g = model.graph
    _prune(g)
    # tensors that depend on past inputs through data (not through Shape)
    doomed = set(past)
    for n in g.node:
        if n.op_type != "Shape" and any(i in doomed for i in n.input if i):
            doomed.update(o for o in n.output if o)
    boundary = [n for n in g.node if n.op_type == "Shape" and n.input[0] in doomed]
    if boundary:
        input_names = {i.name for i in g.input}
        if "input_ids" not in input_names:
            raise RewriteError("re-deriving Shape() of past/present tensors needs an input_ids input")
        outs = [n.output[0] for n in boundary]
        vals = _run_original(original, outs, kv_heads, head_dim)
        pre = [helper.make_node("Shape", ["input_ids"], ["kvcl_dim_B"], start=0, end=1, name="kvcl_dim_B"),
               helper.make_node("Shape", ["input_ids"], ["kvcl_dim_S"], start=1, end=2, name="kvcl_dim_S")]
        if "attention_mask" in input_names:
            pre.append(helper.make_node("Shape", ["attention_mask"], ["kvcl_dim_T"], start=1, end=2, name="kvcl_dim_T"))
            pre.append(helper.make_node("Sub", ["kvcl_dim_T", "kvcl_dim_S"], ["kvcl_dim_P"], name="kvcl_dim_P"))
        else:  # the longest past length of the step
            pre += [helper.make_node("Constant", [], ["kvcl_c1"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
                    helper.make_node("Gather", [STEP_INPUT, "kvcl_c1"], ["kvcl_past_row"], axis=0),
                    helper.make_node("ReduceMax", ["kvcl_past_row"], ["kvcl_dim_P"], keepdims=1),
                    helper.make_node("Add", ["kvcl_dim_P", "kvcl_dim_S"], ["kvcl_dim_T"])]
        syms = {"B": [c[0] for c in _FIT_CONFIGS], "S": [c[1] for c in _FIT_CONFIGS],
                "P": [c[2] for c in _FIT_CONFIGS], "T": [c[1] + c[2] for c in _FIT_CONFIGS]}
        repl = {}
        for n, per_cfg in zip(boundary, vals):
            per_cfg = [np.asarray(v).reshape(-1) for v in per_cfg]
            if len({v.size for v in per_cfg}) != 1:
                raise RewriteError(f"Shape node {n.name}: rank of {n.input[0]} varies with the input; cannot re-derive")
            parts = []
            for j in range(per_cfg[0].size):
                col = [int(v[j]) for v in per_cfg]
                if len(set(col)) == 1:
                    parts.append(("const", col[0]))
                    continue
                for sym, sv in syms.items():
                    if col[0] % sv[0] == 0 and all(c == col[0] // sv[0] * x for c, x in zip(col, sv)):
                        parts.append((sym, col[0] // sv[0]))
                        break
                else:
                    raise RewriteError(f"Shape node {n.name}: element {j} of Shape({n.input[0]}) ({col}) is not a "
                                       "multiple of batch, sequence, past or total length; cannot re-derive")
            new = []
            pieces = []
            for j, (sym, c) in enumerate(parts):
                nm = f"{n.name}_kvcl_{j}"
                if sym == "const":
                    new.append(helper.make_node("Constant", [], [nm], value=helper.make_tensor("v", TensorProto.INT64, [1], [c])))
                elif c == 1:
                    new.append(helper.make_node("Identity", [f"kvcl_dim_{sym}"], [nm]))
                else:
                    cn = f"{nm}_c"
                    new.append(helper.make_node("Constant", [], [cn], value=helper.make_tensor("v", TensorProto.INT64, [1], [c])))
                    new.append(helper.make_node("Mul", [f"kvcl_dim_{sym}", cn], [nm]))
                pieces.append(nm)
            if pieces:
                new.append(helper.make_node("Concat", pieces, [n.output[0]], axis=0, name=n.name))
            else:
                new.append(helper.make_node("Constant", [], [n.output[0]], name=n.name,
                                            value=helper.make_tensor("v", TensorProto.INT64, [0], [])))
            repl[n.name] = new
        nodes = list(pre)
        for n in g.node:
            nodes.extend(repl.get(n.name, [n]))
        del g.node[:]
        g.node.extend(nodes)
        _prune(g)
    for n in g.node:
        for i in n.input:
            if i in doomed:
                raise RewriteError(f"{n.op_type} node {n.name} still reads {i} (computed from the past "
                                   "key/values) after the rewrite; only Shape() of such tensors can be re-derived")


def _run_original(original, names: list[str], kv_heads: int, head_dim: int) -> list[list]:
    """Values of tensors ``names`` of the original model at each of :data:`_FIT_CONFIGS`."""
    import onnx
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(original)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data, folder = session_source(m)
    configure_session(so, folder)
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    per_cfg = []
    for b, s, p in _FIT_CONFIGS:
        feed = _dummy_feed(original, b, s, p, kv_heads, head_dim)
        per_cfg.append(sess.run(names, feed))
    return [list(x) for x in zip(*per_cfg)]
