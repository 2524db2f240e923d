"""The int8 integer decode path (``int8_dot="integer"``, the INT8_DOT define of
kernels/decode_attention.cl): the query quantized per (token, head) to 16-bit codes, Q·K as
integer multiply-adds on the stored int8 codes, the scales applied once per logit.

Two references (issue 19's decision): the numpy twin of the exact integer arithmetic
(:func:`kvcl.reference.decode_attention.integer_logits`: the kernel's logits bit for bit, so the
kernel and the twin agree to float rounding in the softmax and V), and the fp32-KV output, which
the path must stay within the int8 bounds of targets.md of (cosine >= 0.9995, max rel < 0.03) on
the random and peaky inputs the decode tests use. The float path keeps its same-codes tests in
test_decode_attention.py.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

import kvcl
from kvcl.ops import decode_attention as ops
from kvcl.ops import decode_plan as layout
from kvcl.reference import decode_attention as ref

from test_decode_attention import LENS, assert_close, make_case, run_contiguous, run_paged, run_reference

TWIN = 2e-6     # max abs error / max abs(out) against the twin (observed <= 8e-7)


def _fp32_of(case):
    """The same inputs with fp32 KV: the stored-as-fp32 K and V the int8 codes came from."""
    fp32 = dict(case, k_pool=case["k_fp32"], v_pool=case["v_fp32"], k_scales=None, v_scales=None,
                kv_dtype="fp32", int8_mode=0)
    return run_reference(fp32)


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _twin(case, bits=16, **kw):
    return run_reference(case, int8_dot="integer", int8_dot_bits=bits, **kw)


# ---- the kernel against the twin of its integer arithmetic ----------------------------------

@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("block_size,group,head_dim,int8_mode,q_lens", [
    (16, 4, 128, 0, None), (16, 4, 128, 1, None), (16, 4, 128, 0, (1, 3, 2, 1, 5, 1)),
    (16, 1, 128, 0, None), (16, 8, 64, 0, None), (1, 8, 128, 0, None),
    (5, 2, 36, 0, (1, 2, 1, 4, 1, 3)),      # head_dim not a multiple of 16: the generic int path
    (7, 3, 256, 1, None), (16, 5, 64, 0, (1, 1, 2, 1, 1, 1)),
])
def test_integer_matches_twin(device, rng, variant, block_size, group, head_dim, int8_mode, q_lens):
    case = make_case(rng, lens=LENS, q_lens=q_lens, block_size=block_size, group=group, head_dim=head_dim,
                     num_kv_heads=2 if group < 8 else 1, kv_dtype="int8", int8_mode=int8_mode)
    got = run_paged(device, case, int8_dot="integer", _variant=variant)
    assert_close(got, _twin(case), rel=TWIN)
    # and with a window, several partitions (split-K) and the merge
    got = run_paged(device, case, int8_dot="integer", window=20, partition_size=16, _variant=variant)
    assert_close(got, _twin(case, window=20), rel=TWIN)


def test_integer_split_k_and_long_context(device, rng):
    # B=1, one kv head: the automatic plan splits (and merges); every partition size agrees
    case = make_case(rng, lens=(1500,), num_kv_heads=1, group=4, kv_dtype="int8")
    p = ops.plan(device.context, batch=1, num_q_heads=4, num_kv_heads=1, head_dim=128, block_size=16,
                 max_q_len=1, max_kv_len=1500, kv_dtype="int8", int8_dot="integer")
    assert p.num_parts > 1 and p.int8_dot == "integer"
    want = _twin(case)
    single = run_paged(device, case, int8_dot="integer", partition_size=10_000)
    assert_close(single, want, rel=TWIN)
    for ps in (None, 1, 48, 512):
        split = run_paged(device, case, int8_dot="integer", partition_size=ps)
        assert_close(split, want, rel=TWIN)
        np.testing.assert_allclose(split, single, rtol=0, atol=2e-6 * np.abs(single).max())


def test_integer_prefill_causal_window(device, rng):
    case = make_case(rng, lens=(1, 15, 17, 54, 97), q_lens=(1, 15, 5, 17, 9), kv_dtype="int8")
    for window in (0, 7, 20):
        assert_close(run_paged(device, case, int8_dot="integer", window=window), _twin(case, window=window),
                     rel=TWIN)


def test_integer_8bit_query_codes_match_twin(device, rng, monkeypatch):
    # the 8-bit query variant (INT8_DOT=8: vpmaddubsw on x86) is twinned exactly too
    monkeypatch.setattr(layout, "_INT8_DOT_BITS", 8)
    for variant in ops.VARIANTS:
        case = make_case(rng, lens=LENS, q_lens=(1, 3, 2, 1, 5, 1), kv_dtype="int8")
        got = run_paged(device, case, int8_dot="integer", _variant=variant)
        assert_close(got, _twin(case, bits=8), rel=TWIN)


def test_contiguous_equals_paged_integer(device, rng):
    batch, hkv, group, d, capacity = 3, 2, 4, 64, 300
    lens = np.array([1, 97, capacity], dtype=np.int32)
    q_lens = (1, 4, 2)
    k = rng.standard_normal((batch, hkv, capacity, d)).astype(np.float32)
    v = rng.standard_normal((batch, hkv, capacity, d)).astype(np.float32)
    case = make_case(rng, lens=lens, q_lens=q_lens, block_size=capacity, num_kv_heads=hkv, group=group,
                     head_dim=d, kv_dtype="int8", spare=0, shuffle=False, kv=(k, v))
    paged = run_paged(device, case, int8_dot="integer", window=50)
    got = run_contiguous(device, case, lens, window=50, int8_dot="integer")
    want = ref.contiguous_attention(case["queries"], case["k_pool"], case["v_pool"], lens, case["q_indptr"],
                                    k_scales=case["k_scales"], v_scales=case["v_scales"], kv_dtype="int8",
                                    window=50, int8_dot="integer")
    assert_close(got, want, rel=TWIN)
    np.testing.assert_array_equal(got, paged)


def test_zero_and_nonfinite_query_rows(device, rng):
    # an all-zero query row: step 0, logits 0, the plain mean of V; a row holding NaN or Inf:
    # its logits NaN, its output NaN (as with float logits); the other rows exact
    case = make_case(rng, lens=(20, 40, 33), kv_dtype="int8")
    case["queries"][0, 1] = 0.0
    case["queries"][1, 2, 5] = np.nan
    case["queries"][2, 6, 0] = np.inf
    want = _twin(case)
    for variant in ops.VARIANTS:
        got = run_paged(device, case, int8_dot="integer", _variant=variant)
        nan = np.isnan(want)
        assert nan[1, 2].all() and nan[2, 6].all() and nan.sum() == 2 * 128
        np.testing.assert_array_equal(np.isnan(got), nan)
        err = np.abs(got[~nan].astype(np.float64) - want[~nan]).max()
        assert err <= TWIN * np.abs(want[~nan]).max()
        v = ref.gather_sequence(case["v_pool"], case["v_scales"], case["indptr"], case["indices"],
                                case["last_page_len"], 0, "int8")
        np.testing.assert_allclose(got[0, 1], v[:, 0].astype(np.float64).mean(axis=0), rtol=0, atol=1e-5)


def test_twin_logits_are_integer_sums():
    # the twin's logits are (float32(sum of codes) * float32(step * qk)) * k_scale, the sums exact
    rng = np.random.default_rng(7)
    q = rng.standard_normal((3, 128)).astype(np.float32)
    k = rng.integers(-127, 128, (50, 128)).astype(np.int8)
    ks = rng.uniform(0.001, 0.05, 50).astype(np.float32)
    codes, step = ref.quantize_query(q)
    assert codes.dtype == np.int32 and np.abs(codes).max() == 32767
    np.testing.assert_array_equal(step, (np.abs(q).max(axis=1) / np.float32(32767)).astype(np.float32))
    qk = np.float32(0.125 * np.log2(np.e))
    got = ref.integer_logits(q, k, ks, qk)
    sums = codes.astype(np.int64) @ k.astype(np.int64).T
    want = (sums.astype(np.float32) * (step * qk).astype(np.float32)[:, None]).astype(np.float32) * ks
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # off the exact logits by at most half a query step per code: |err| <= step/2 * sum|k| * ks * qk
    # (plus float32 rounding of the products)
    exact = (q.astype(np.float64) @ (k.astype(np.float64) * ks[:, None]).T) * float(qk)
    bound = 0.5 * step[:, None].astype(np.float64) * (np.abs(k.astype(np.float64)).sum(axis=1) * ks)[None] * float(qk)
    assert np.all(np.abs(got - exact) <= bound + 1e-6 * np.abs(exact))


# ---- against the fp32-KV output: the int8 bounds of targets.md ------------------------------

@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("peaky", [False, True])
def test_integer_within_int8_bounds_of_fp32(device, rng, variant, peaky):
    # the inputs of test_dtype_accuracy_vs_fp32: T=512 and 300, D=128, GQA 4, random (q ~ N(0, 1))
    # and peaky (q ~ N(0, 9)); plus prefill rows, and split-K
    shape_kw = dict(lens=(512, 300), block_size=16, num_kv_heads=2, group=4, head_dim=128, shuffle=False, spare=0)
    case = make_case(rng, **shape_kw, kv_dtype="int8", q_gain=3.0 if peaky else 1.0)
    fp32 = _fp32_of(case)
    for kw in ({}, {"partition_size": 128}):
        got = run_paged(device, case, int8_dot="integer", _variant=variant, **kw)
        rel = np.abs(got - fp32).max() / np.abs(fp32).max()
        cos = _cosine(got, fp32)
        assert cos >= 0.9995 and rel < 0.03, (cos, rel)
    # no worse than the float path on the same codes by more than a hair
    float_rel = np.abs(run_paged(device, case, int8_dot="float", _variant=variant) - fp32).max() / np.abs(fp32).max()
    assert rel <= float_rel * 1.1 + 1e-4, (rel, float_rel)


def test_integer_within_bounds_on_prefill_and_odd_lengths(device, rng):
    case = make_case(rng, lens=(1, 15, 17, 54, 97, 301), q_lens=(1, 15, 5, 17, 9, 3), kv_dtype="int8",
                     q_gain=3.0, block_size=16)
    fp32 = _fp32_of(case)
    got = run_paged(device, case, int8_dot="integer")
    assert _cosine(got, fp32) >= 0.9995
    assert np.abs(got - fp32).max() / np.abs(fp32).max() < 0.03


# ---- the knob -----------------------------------------------------------------------------------

def test_auto_is_integer_on_x86_pocl_and_float_elsewhere(device):
    import pyopencl as cl
    dev = device.context.devices[0]
    kw = dict(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, max_q_len=1, max_kv_len=2048)
    fast = (ops.variant_for(dev) == "serial" and "pocl" in dev.version.lower()
            and bool(dev.type & cl.device_type.CPU) and layout._x86_int_dot(device.context, dev))
    auto = ops.plan(device.context, kv_dtype="int8", **kw)
    assert auto.int8_dot == ("integer" if fast else "float")
    assert ops.int8_dot_for(dev, context=device.context) == auto.int8_dot
    assert ops.plan(device.context, kv_dtype="int8", int8_dot="auto", **kw).int8_dot == auto.int8_dot
    assert ops.plan(device.context, kv_dtype="int8", int8_dot="float", **kw).int8_dot == "float"
    assert ops.plan(device.context, kv_dtype="int8", int8_dot="integer", **kw).int8_dot == "integer"
    # the cooperative variant keeps float logits unless asked (not measured faster)
    assert ops.plan(device.context, kv_dtype="int8", variant="cooperative", **kw).int8_dot == "float"
    # every other dtype: float, whatever the module default says
    for dtype in ("fp32", "fp16", "fp8_e4m3"):
        assert ops.plan(device.context, kv_dtype=dtype, **kw).int8_dot == "float"
    assert dict(ops.plan(device.context, kv_dtype="int8", int8_dot="integer", **kw).defines)["INT8_DOT"] == 16


def test_module_default_reaches_launches(device, rng, monkeypatch):
    # int8_dot=None (what the engine passes) is the module's _INT8_DOT: "auto" unless reassigned
    case = make_case(rng, lens=(40, 17), kv_dtype="int8")
    monkeypatch.setattr(layout, "_INT8_DOT", "integer")
    assert_close(run_paged(device, case, int8_dot=None), _twin(case), rel=TWIN)
    monkeypatch.setattr(layout, "_INT8_DOT", "float")
    np.testing.assert_array_equal(run_paged(device, case, int8_dot=None), run_paged(device, case, int8_dot="float"))
    fp32 = make_case(rng, lens=(40, 17))
    monkeypatch.setattr(layout, "_INT8_DOT", "integer")   # applies to int8 KV only
    assert_close(run_paged(device, fp32, int8_dot=None), run_reference(fp32))
    monkeypatch.setattr(layout, "_INT8_DOT", "bogus")
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot"):
        run_paged(device, case, int8_dot=None)


@pytest.mark.parametrize("value", ["fast", "INTEGER", "", 1, True, 16])
def test_bad_int8_dot_refused_naming_it(device, rng, value):
    case = make_case(rng, lens=(17, 5), kv_dtype="int8")
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot"):
        run_paged(device, case, int8_dot=value)
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot"):
        ops.plan(device.context, batch=1, num_q_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
                 max_q_len=1, max_kv_len=16, kv_dtype="int8", int8_dot=value)


def test_integer_refused_where_it_cannot_run(device, rng):
    fp16 = make_case(rng, lens=(17, 5), kv_dtype="fp16")
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot.*int8"):
        run_paged(device, fp16, int8_dot="integer")
    big = make_case(rng, lens=(3,), num_kv_heads=1, group=1, head_dim=516, kv_dtype="int8")
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot.*head_dim"):
        run_paged(device, big, int8_dot="integer")
    q = device.queue
    k = cla.empty(q, (2, 2, 32, 64), np.float32)
    queries = cla.empty(q, (2, 8, 64), np.float32)
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot"):
        ops.contiguous_attention(queries, k, k, cla.to_device(q, np.array([4, 4], np.int32)),
                                 cla.to_device(q, np.array([0, 1, 2], np.int32)), cla.empty(q, (2, 8, 64), np.float32),
                                 max_q_len=1, max_kv_len=4, int8_dot="integer")
