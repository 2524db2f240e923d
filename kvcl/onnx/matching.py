"""Matching for the ONNX rewrite: each layer's attention core, found from the
``Concat(past, new) -> present`` anchors, and its replacement by a ``kvcl::Attention`` node;
the ``GroupQueryAttention`` route of onnxruntime-genai exports. See :mod:`kvcl.onnx.rewrite`
for the patterns."""

from __future__ import annotations

import numpy as np

from .customop import OP_DOMAIN, OP_TYPE, OP_TYPE_QKV, OP_TYPE_QKV_ROPE, STEP_INPUT
from .graph import (_LAYOUT, _PAST, RewriteError, _as_initializer, _attr, _elem_types, _Graph,
                    _infer_shapes, _last_dim)
from .shapes import _evaluate

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
