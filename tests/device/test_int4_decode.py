"""int4 KV in decode attention (kernels/decode_attention.cl, KV_DTYPE 5): two codes per byte.

The same-codes cases (every variant, split-K, prefill, contiguous) are in test_decode_attention.py
with the other formats; here: every byte decodes to its two codes, the accuracy against fp32 KV
measured on random and peaky inputs, and the refusals.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

import kvcl
from kvcl.ops import decode_attention as ops
from kvcl.reference.quantize import hadamard_rows, int4_slot, unpack_int4

from test_decode_attention import _cosine, make_case, run_paged, run_reference, upload


@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("head_dim", [128, 64, 36])   # VEC 8 (16 on some GPUs), 8, 4
def test_every_byte_decodes_to_its_two_codes(device, variant, head_dim):
    # one token per sequence: the softmax weight is exactly 1 and the output IS the V row's
    # codes (scale 1, minimum 0) rotated back; the 256 byte values are spread over the rows
    rows = np.resize(np.arange(256, dtype=np.uint8), (-(-256 // (head_dim // 2)) + 1, head_dim // 2))
    b = len(rows)
    v_pool = rows[:, None, None, :]
    k_pool = np.full_like(v_pool, 0x88)                  # codes 8
    q = device.queue
    ones = int4_slot(np.ones((b, 1, 1), np.float32), np.zeros((b, 1, 1), np.float32))
    args = [cla.to_device(q, a) for a in (
        np.zeros((b, 4, head_dim), np.float32), k_pool, v_pool, np.arange(b + 1, dtype=np.int32),
        np.arange(b, dtype=np.int32), np.ones(b, np.int32), np.arange(b + 1, dtype=np.int32))]
    out = cla.empty(q, (b, 4, head_dim), np.float32)
    out.fill(np.float32(99.0))
    ops.paged_attention(*args, out, k_scales=cla.to_device(q, ones), v_scales=cla.to_device(q, ones),
                        kv_dtype="int4", max_q_len=1, max_kv_len=1, _variant=variant).wait()
    want = np.broadcast_to(hadamard_rows(unpack_int4(rows))[:, None, :], (b, 4, head_dim))
    np.testing.assert_allclose(out.get(), want, rtol=1e-6, atol=1e-6)


def test_accuracy_against_fp32_kv(device, rng):
    """int4 (rotated, asymmetric) against the fp32-KV output (T=512/300, D=128), random and
    peaky queries. No bound in targets.md at kernel level: int4 is judged by a real model's
    perplexity (+3%); these bounds hold the measured figures (cosine 0.987-0.990 random,
    0.972-0.980 peaky, max rel 0.12-0.34 over four seeds) so a regression shows."""
    kw = dict(lens=(512, 300), block_size=16, num_kv_heads=2, group=4, head_dim=128, shuffle=False, spare=0)
    for gain, min_cos, max_rel in ((1.0, 0.985, 0.4), (3.0, 0.965, 0.45)):
        base = make_case(rng, **kw, q_gain=gain)
        fp32 = run_reference(base)
        case = make_case(rng, **kw, kv_dtype="int4", kv=(base["k_fp32"], base["v_fp32"]))
        case["queries"] = base["queries"]
        got = run_paged(device, case)
        rel = np.abs(got - fp32).max() / np.abs(fp32).max()
        assert _cosine(got, fp32) >= min_cos and rel < max_rel, (gain, _cosine(got, fp32), rel)
        # and int8 of the same data is far closer: the two formats are told apart
        case8 = make_case(rng, **kw, kv_dtype="int8", kv=(base["k_fp32"], base["v_fp32"]))
        case8["queries"] = base["queries"]
        assert _cosine(run_paged(device, case8), fp32) > _cosine(got, fp32)


def _per_row_symmetric(x):
    """The int4 kvcl had before the rotation: absmax / 7 per row, codes -7..7 (fake-quantised)."""
    sc = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(7), np.finfo(np.float32).eps)
    return (np.clip(np.round(x / sc), -7, 7) * sc).astype(np.float32)


@pytest.mark.parametrize("variant", ops.VARIANTS)
def test_rotation_spreads_outlier_channels(device, rng, variant):
    """Real keys have a few channels far larger than the rest; per-row codes then spend their
    range on those. The rotated format's output must be closer to fp32 KV than per-row
    symmetric int4 of the same K and V (numpy, same attention), in every variant, with and
    without split-K: the rotation, the minimum's logit term, the V minimum and the output's
    rotation back all take part."""
    kw = dict(lens=(700, 64), block_size=16, num_kv_heads=2, group=4, head_dim=128, shuffle=True, spare=1)
    base = make_case(rng, **kw)
    k = base["k_fp32"].copy()
    k[..., [3, 50, 77, 120]] *= 25.0          # outlier channels
    k += 0.5                                   # and an offset: the asymmetric minimum's job
    v = base["v_fp32"] * np.float32(2) - np.float32(1)
    fp32_case = make_case(rng, **kw, kv=(k, v))
    fp32_case.update({n: base[n] for n in ("queries", "indptr", "indices", "last_page_len", "q_indptr")})
    fp32 = run_reference(fp32_case)
    sym = make_case(rng, **kw, kv=(_per_row_symmetric(k), _per_row_symmetric(v)))
    sym.update({n: base[n] for n in ("queries", "indptr", "indices", "last_page_len", "q_indptr")})
    cos_sym = _cosine(run_reference(sym), fp32)
    case = make_case(rng, **kw, kv_dtype="int4", kv=(k, v))
    case.update({n: base[n] for n in ("queries", "indptr", "indices", "last_page_len", "q_indptr")})
    for parts in (None, 128):
        got = run_paged(device, case, _variant=variant, **({} if parts is None else {"partition_size": parts}))
        np.testing.assert_allclose(got, run_reference(case), rtol=2e-4, atol=2e-4)   # same codes
        cos = _cosine(got, fp32)
        assert cos > cos_sym + 0.02 and cos >= 0.95, (variant, parts, cos, cos_sym)   # measured 0.965 vs 0.935


def test_int4_refusals_name_the_argument(device, rng):
    case = make_case(rng, lens=(17, 5), kv_dtype="int4", head_dim=64)
    d = upload(device.queue, case)
    out = cla.empty(device.queue, case["queries"].shape, np.float32)
    common = dict(max_q_len=1, max_kv_len=17, kv_dtype="int4")
    pos = (d["queries"], d["k_pool"], d["v_pool"], d["indptr"], d["indices"], d["last_page_len"], d["q_indptr"], out)
    with pytest.raises(kvcl.InvalidArgument, match="k_scales: required for int4 KV"):
        ops.paged_attention(*pos, **common)
    with pytest.raises(kvcl.InvalidArgument, match=r"int8_mode: int4 has one scale convention \(0\), got 1"):
        ops.paged_attention(*pos, k_scales=d["k_scales"], v_scales=d["v_scales"], int8_mode=1, **common)
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot: 'integer' for int4 KV needs the serial variant"):
        ops.paged_attention(*pos, k_scales=d["k_scales"], v_scales=d["v_scales"], int8_dot="integer",
                            _variant="cooperative", **common)
    wide = cla.zeros(device.queue, d["k_pool"].shape[:3] + (64,), np.uint8)   # head_dim bytes, not head_dim / 2
    with pytest.raises(kvcl.ShapeError, match="k_pool"):
        ops.paged_attention(d["queries"], wide, wide, *pos[3:], k_scales=d["k_scales"], v_scales=d["v_scales"],
                            **common)
