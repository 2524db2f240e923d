"""The engine's fp32 attention equals an independent implementation: onnxruntime's
com.microsoft.GroupQueryAttention, fed the same K/V history and the same new token."""

import math

import numpy as np
import pytest

from kvcl.engine import PagedKVCache

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (the onnx extra)")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def gqa_session(batch, hq, hkv, d, cap):
    f32 = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"], domain="com.microsoft",
        num_heads=hq, kv_num_heads=hkv, scale=1.0 / math.sqrt(d))
    graph = helper.make_graph([node], "gqa", [
        vi("query", f32, [batch, 1, hq * d]), vi("key", f32, [batch, 1, hkv * d]),
        vi("value", f32, [batch, 1, hkv * d]), vi("past_key", f32, [batch, hkv, cap, d]),
        vi("past_value", f32, [batch, hkv, cap, d]), vi("seqlens_k", TensorProto.INT32, [batch]),
        vi("total_sequence_length", TensorProto.INT32, [])],
        [vi("output", f32, [batch, 1, hq * d]), vi("present_key", f32, [batch, hkv, cap, d]),
         vi("present_value", f32, [batch, hkv, cap, d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # readable by onnxruntime releases older than this onnx
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("hq,hkv,d,block_size", [(8, 2, 64, 16), (4, 4, 32, 1), (16, 2, 128, 16)])
def test_decode_step_matches_group_query_attention(device, hq, hkv, d, block_size):
    rng = np.random.default_rng(hq * d)
    lengths = [37, 1, 96, 15]                 # cached tokens before the step (ragged)
    batch, cap = len(lengths), max(lengths) + 1
    cache = PagedKVCache(1, hkv, d, num_blocks=sum(-(-(n + 1) // block_size) for n in lengths) + 4,
                         block_size=block_size, dtype="fp32", device=device)
    seqs = [cache.add_sequence() for _ in lengths]
    past_k = np.zeros((batch, hkv, cap, d), np.float32)
    past_v = np.zeros((batch, hkv, cap, d), np.float32)
    step = cache.plan(seqs, lengths)
    ks, vs = [], []
    for b, n in enumerate(lengths):
        k, v = (rng.standard_normal((n, hkv, d)).astype(np.float32) for _ in range(2))
        past_k[b, :, :n] = k.transpose(1, 0, 2)
        past_v[b, :, :n] = v.transpose(1, 0, 2)
        ks.append(k)
        vs.append(v)
    cache.write(0, step, np.concatenate(ks), np.concatenate(vs))

    new_k, new_v = (rng.standard_normal((batch, hkv, d)).astype(np.float32) for _ in range(2))
    queries = rng.standard_normal((batch, hq, d)).astype(np.float32)
    step = cache.plan(seqs, [1] * batch)
    cache.write(0, step, new_k, new_v)
    ours = cache.attend(0, step, queries)

    session = gqa_session(batch, hq, hkv, d, cap)
    theirs = session.run(["output"], {
        "query": queries.reshape(batch, 1, hq * d), "key": new_k.reshape(batch, 1, hkv * d),
        "value": new_v.reshape(batch, 1, hkv * d), "past_key": past_k, "past_value": past_v,
        "seqlens_k": np.array(lengths, np.int32),            # total length - 1 per sequence
        "total_sequence_length": np.array(cap, np.int32)})[0].reshape(batch, hq, d)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
