"""A one-layer decoder built with onnx.helper, in variants the rewrite must accept or refuse."""

from __future__ import annotations

import numpy as np

V, H, D = 32, 2, 8  # vocab, heads (= kv heads), head dim


def build(variant: str = "plain", dtype: str = "fp32"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ft = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    npt = np.float16 if dtype == "fp16" else np.float32
    inits = [numpy_helper.from_array(rng.normal(0, 1, (V, H * D)).astype(npt), "emb")]
    for name in ("wq", "wk", "wv", "wo"):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.7, (H * D, H * D)).astype(npt), name))
    inits.append(numpy_helper.from_array(rng.normal(0, 1, (H * D, V)).astype(npt), "lm"))
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("shp4", [0, -1, H, D]), ("shp3", [0, -1, H * D]))]
    inits.append(numpy_helper.from_array(np.array(D ** -0.5, npt), "scale"))
    inits.append(numpy_helper.from_array(np.ones((2, 2), npt), "mat2"))
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"], axis=0)]
    for p in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}_lin"]),
                  helper.make_node("Reshape", [f"{p}_lin", "shp4"], [f"{p}_4"]),
                  helper.make_node("Transpose", [f"{p}_4"], [f"{p}_t"], perm=[0, 2, 1, 3])]
    k_in = "k_t"
    if variant == "no_concat":
        nodes.append(helper.make_node("Add", ["past_key_values.0.key", "k_t"], ["present.0.key"]))
    elif variant == "no_past":
        nodes.append(helper.make_node("Identity", [k_in], ["present.0.key"]))
    else:
        nodes.append(helper.make_node("Concat", ["past_key_values.0.key", k_in], ["present.0.key"], axis=2))
    if variant == "no_past":
        nodes.append(helper.make_node("Identity", ["v_t"], ["present.0.value"]))
    else:
        nodes.append(helper.make_node("Concat", ["past_key_values.0.value", "v_t"], ["present.0.value"], axis=2))
    nodes += [helper.make_node("Transpose", ["present.0.key"], ["kT"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_t", "kT"], ["scores"])]
    s = "scores"
    if variant == "matrix_mul":
        nodes.append(helper.make_node("MatMul", [s, "mat2"], ["s_bad"]))  # not a scale
        s = "s_bad"
    nodes.append(helper.make_node("Mul", [s, "scale"], ["s_scaled"]))
    s = "s_scaled"
    if variant == "softcap":
        nodes.append(helper.make_node("Tanh", [s], ["s_cap"]))
        s = "s_cap"
    nodes += [helper.make_node("Softmax", [s], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "present.0.value"], ["attn"]),
              helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["attn_t", "shp3"], ["attn_3"]),
              helper.make_node("MatMul", ["attn_3", "wo"], ["o"]),
              helper.make_node("Add", ["x", "o"], ["h"]),
              helper.make_node("MatMul", ["h", "lm"], ["logits_t"]),
              helper.make_node("Cast", ["logits_t"], ["logits"], to=TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    if variant != "no_past":
        inputs += [helper.make_tensor_value_info(f"past_key_values.0.{k}", ft, ["batch", H, "past", D])
                   for k in ("key", "value")]
    outputs += [helper.make_tensor_value_info(f"present.0.{k}", ft, ["batch", H, "total", D])
                for k in ("key", "value")]
    graph = helper.make_graph(nodes, f"synthetic_{variant}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
