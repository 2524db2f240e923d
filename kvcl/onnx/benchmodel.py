"""A decoder of realistic attention width for timing the ONNX bridge, built without torch.

The bridge pays where the KV cache is large: the original model copies every layer's
past_key_values in and its present out at every step, the bridge reads the cache in place. The
committed test fixtures are tiny (2 KV heads of 16), so ``kvcl bench`` times the bridge on this
model instead: the attention of a 7-8B Llama (32 query and 8 KV heads of 128, RoPE) around small
random projections, in the graph onnxruntime-genai's builder writes (packed QKV into
``com.microsoft.GroupQueryAttention``, past_key_values as ``[B, kv_heads, past, head_dim]``).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from ..validate import check_int

__all__ = ["gqa_decoder"]


def gqa_decoder(*, num_layers: int = 4, num_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                hidden: int = 256, vocab: int = 256, max_positions: int = 8192, seed: int = 0):
    """An ``onnx.ModelProto``: embedding, ``num_layers`` x (packed QKV projection,
    GroupQueryAttention with rotary embedding, output projection, residual), LM head.

    Inputs ``input_ids`` / ``attention_mask`` [B, S] / [B, total] int64 and
    ``past_key_values.N.key|value`` [B, kv_heads, past, head_dim]; outputs ``logits``
    [B, S, vocab] and ``present.N.key|value``. Weights are random (std chosen so that
    activations stay O(1) across the layers); ~40 MB of fp32 at the defaults.
    """
    from onnx import TensorProto, helper, numpy_helper

    for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("kv_heads", kv_heads),
                        ("head_dim", head_dim), ("hidden", hidden), ("vocab", vocab),
                        ("max_positions", max_positions)):
        check_int(name, value, low=1)
    if num_heads % kv_heads:
        raise InvalidArgument(f"num_heads: expected a multiple of kv_heads={kv_heads}, got {num_heads}")
    if head_dim % 2:
        raise InvalidArgument(f"head_dim: expected an even number (rotary pairs), got {head_dim}")
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    width = (num_heads + 2 * kv_heads) * head_dim

    def weight(name, shape, std):
        return numpy_helper.from_array(rng.normal(0.0, std, shape).astype(np.float32), name)

    pos = np.arange(max_positions, dtype=np.float64)[:, None]
    inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inits = [weight("embed", (vocab, hidden), 1.0), weight("lm_head", (hidden, vocab), hidden ** -0.5),
             numpy_helper.from_array(np.cos(pos * inv_freq).astype(np.float32), "cos_cache"),
             numpy_helper.from_array(np.sin(pos * inv_freq).astype(np.float32), "sin_cache"),
             numpy_helper.from_array(np.array([1], np.int64), "one_1d"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    nodes = [  # seqlens_k = (valid tokens - 1) per row, total_sequence_length: GQA's int32 inputs
        helper.make_node("ReduceSum", ["attention_mask", "one_1d"], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["mask_last"]),
        helper.make_node("Cast", ["mask_last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total_len"], axis=0),
        helper.make_node("Cast", ["total_len"], ["total_sequence_length"], to=TensorProto.INT32),
        helper.make_node("Gather", ["embed", "input_ids"], ["h0"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", vocab])]
    for i in range(num_layers):
        inits += [weight(f"layers.{i}.qkv", (hidden, width), hidden ** -0.5),
                  weight(f"layers.{i}.o", (num_heads * head_dim, hidden), 0.5 * (num_heads * head_dim) ** -0.5)]
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"layers.{i}.qkv"], [f"qkv{i}"]),
            helper.make_node("GroupQueryAttention",
                             [f"qkv{i}", "", "", *past, "seqlens_k", "total_sequence_length",
                              "cos_cache", "sin_cache"],
                             [f"attn{i}", *present], domain="com.microsoft", num_heads=num_heads,
                             kv_num_heads=kv_heads, scale=head_dim ** -0.5, do_rotary=1,
                             rotary_interleaved=0, local_window_size=-1),
            helper.make_node("MatMul", [f"attn{i}", f"layers.{i}.o"], [f"o{i}"]),
            helper.make_node("Add", [f"h{i}", f"o{i}"], [f"h{i + 1}"]),
        ]
        inputs += [helper.make_tensor_value_info(n, f32, ["batch", kv_heads, "past", head_dim]) for n in past]
        outputs += [helper.make_tensor_value_info(n, f32, ["batch", kv_heads, "total", head_dim]) for n in present]
    nodes.append(helper.make_node("MatMul", [f"h{num_layers}", "lm_head"], ["logits"]))
    graph = helper.make_graph(nodes, "kvcl_bench_gqa_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # readable by onnxruntime releases older than the installed onnx
    return model
