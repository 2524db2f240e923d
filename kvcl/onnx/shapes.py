"""Shape derivation for the ONNX rewrite: values the graph computes from input shapes (scale
factors, ``Shape()`` of past/present tensors that the rewrite removes), fitted by running the
original model in onnxruntime at three tiny input shapes and rebuilt from ``input_ids`` /
``attention_mask`` / ``kvcl_step``."""

from __future__ import annotations

import numpy as np

from .customop import STEP_INPUT
from .graph import _PAST, RewriteError, _prune
from .modelio import configure_session, session_source

_FIT_CONFIGS = ((2, 3, 5), (3, 1, 6), (1, 4, 9))  # (B, S, past): B, S, past, total all distinguishable


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
