"""int4's integer decode path (``int8_dot="integer"`` with int4 KV, the serial kernel): the
query rotated into int4's basis and quantized per (token, head) to 16-bit codes (8-bit with
``_INT8_DOT_BITS = 8``), Q·K as integer multiply-adds on the stored codes 0..15 (vpmaddwd on the
widened nibbles, or vpmaddubsw for 8-bit codes, on x86 PoCL; int lanes elsewhere), each row's
scale and minimum applied once per logit. Both widths are tested.

References: the numpy twin of that arithmetic
(:func:`kvcl.reference.decode_attention.int4_integer_logits`: codes and sums exact, so kernel and
twin agree to float rounding), and the fp32-KV output, which the path must stay as close to as
int4's float path does (int4 is judged by a real model's perplexity; the bounds here hold the
measured figures, as in test_int4_decode.py). The float path keeps its same-codes tests.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvcl
from kvcl.ops import decode_attention as ops
from kvcl.ops import decode_plan as layout
from kvcl.reference import decode_attention as ref

from test_decode_attention import LENS, _cosine, assert_close, make_case, run_contiguous, run_paged, run_reference

TWIN = 2e-5     # max abs error / max abs(out) against the twin (observed <= 8e-6)


@pytest.fixture(autouse=True)
def _serial_device(request):
    """The path is the serial kernel's: run where that is the device's own variant (PoCL); on
    llvmpipe a serial build of these shapes compiles for a minute or more each."""
    if "device" in request.fixturenames:
        dev = request.getfixturevalue("device").queue.device
        if ops.variant_for(dev) != "serial" and request.node.name.split("[")[0] != "test_int4_integer_where_it_runs":
            pytest.skip("int4's integer path is the serial kernel's; not this device's variant")


@pytest.fixture(params=[16, 8])
def bits(request, monkeypatch):
    """The query codes' width, set where the launcher reads it."""
    monkeypatch.setattr(layout, "_INT8_DOT_BITS", request.param)
    return request.param


def _twin(case, bits, **kw):
    return run_reference(case, int8_dot="integer", int8_dot_bits=bits, **kw)


@pytest.mark.parametrize("block_size,group,head_dim,q_lens", [
    (16, 4, 128, None), (16, 4, 128, (1, 3, 2, 1, 5, 1)), (16, 1, 64, None), (1, 8, 128, None),
    (16, 4, 32, (1, 2, 1, 4, 1, 3)),   # the smallest x86 slice: 16 bytes, 32 codes
    (5, 2, 36, (1, 2, 1, 4, 1, 3)),    # head_dim not a multiple of 32: the int-lane path
    (7, 3, 256, None),                 # the most 16-bit pair sums (8 per lane)
    (16, 2, 512, None),                # beyond them: widened per slice
])
def test_int4_integer_matches_twin(device, rng, bits, block_size, group, head_dim, q_lens):
    case = make_case(rng, lens=LENS, q_lens=q_lens, block_size=block_size, group=group, head_dim=head_dim,
                     num_kv_heads=2 if group < 8 else 1, kv_dtype="int4")
    want = _twin(case, bits)
    got = run_paged(device, case, int8_dot="integer", _variant="serial")
    assert_close(got, want, rel=TWIN)
    # the twin tells the widths apart: the other width's twin is farther from the kernel than
    # its own; 8-bit codes are farther from the float path too
    near = np.abs(got - want).max()
    assert np.abs(got - _twin(case, 24 - bits)).max() > 10 * near
    if bits == 8:
        assert np.abs(run_paged(device, case, int8_dot="float", _variant="serial") - want).max() > 10 * near
    # with a window, several partitions (split-K) and the merge
    got = run_paged(device, case, int8_dot="integer", window=20, partition_size=16, _variant="serial")
    assert_close(got, _twin(case, bits, window=20), rel=TWIN)


def test_int4_integer_prefill_and_contiguous(device, rng, bits):
    case = make_case(rng, lens=(1, 15, 17, 54, 97), q_lens=(1, 15, 5, 17, 9), kv_dtype="int4", head_dim=64)
    for window in (0, 7):
        assert_close(run_paged(device, case, int8_dot="integer", window=window, _variant="serial"),
                     _twin(case, bits, window=window), rel=TWIN)
    batch, hkv, d, capacity = 3, 2, 64, 200
    lens = np.array([1, 97, capacity], dtype=np.int32)
    k, v = (rng.standard_normal((batch, hkv, capacity, d)).astype(np.float32) for _ in range(2))
    case = make_case(rng, lens=lens, q_lens=(1, 4, 2), block_size=capacity, num_kv_heads=hkv, group=4,
                     head_dim=d, kv_dtype="int4", spare=0, shuffle=False, kv=(k, v))
    paged = run_paged(device, case, int8_dot="integer", _variant="serial")
    np.testing.assert_array_equal(run_contiguous(device, case, lens, int8_dot="integer", _variant="serial"), paged)


def test_int4_integer_accuracy_against_fp32_kv(device, rng, bits):
    """As close to the fp32-KV output as int4's float path (random and peaky queries): the
    query codes add little to int4's own error (16-bit ones next to nothing)."""
    kw = dict(lens=(512, 300), block_size=16, num_kv_heads=2, group=4, head_dim=128, shuffle=False, spare=0)
    for gain in (1.0, 3.0):
        base = make_case(rng, **kw, q_gain=gain)
        fp32 = run_reference(base)
        case = make_case(rng, **kw, kv_dtype="int4", kv=(base["k_fp32"], base["v_fp32"]))
        case["queries"] = base["queries"]
        integer = run_paged(device, case, int8_dot="integer", _variant="serial")
        floats = run_paged(device, case, int8_dot="float", _variant="serial")
        assert _cosine(integer, floats) >= (0.9999 if bits == 8 else 0.999999), gain
        assert _cosine(integer, fp32) >= _cosine(floats, fp32) - (1e-3 if bits == 8 else 1e-6), gain


def test_int4_integer_zero_and_nonfinite_query_rows(device, rng, bits):
    # an all-zero query row: logits 0, the mean of V (as the float path); NaN or Inf in a row:
    # every element of its rotated row is NaN or Inf, its output NaN; the other rows exact
    case = make_case(rng, lens=(20, 40, 33), kv_dtype="int4")
    case["queries"][0, 1] = 0.0
    case["queries"][1, 2, 5] = np.nan
    case["queries"][2, 6, 0] = np.inf
    want = _twin(case, bits)
    got = run_paged(device, case, int8_dot="integer", _variant="serial")
    nan = np.isnan(want)
    assert nan[1, 2].all() and nan[2, 6].all() and nan.sum() == 2 * 128
    np.testing.assert_array_equal(np.isnan(got), nan)
    assert np.abs(got[~nan].astype(np.float64) - want[~nan]).max() <= TWIN * np.abs(want[~nan]).max()
    np.testing.assert_allclose(got[0, 1], run_paged(device, case, int8_dot="float", _variant="serial")[0, 1],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("width", [16, 8])
def test_int4_twin_logits_are_integer_sums(rng, width):
    # the twin's logits: the rotated query's codes times the stored codes, exactly, then the
    # step, the row's scale and its minimum times the rotated query's sum
    d = 64
    q = rng.standard_normal(d).astype(np.float32)
    codes = rng.integers(0, 16, (5, d))
    sc = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    lo = rng.uniform(-1, 0, 5).astype(np.float32)
    qk = np.float32(0.125 * np.log2(np.e))
    got = ref.int4_integer_logits(q, codes, sc, lo, qk, width)
    from kvcl.reference.quantize import hadamard_rows
    qr = hadamard_rows(q * qk)
    qc, step = ref.quantize_query(qr, width)
    assert np.abs(qc).max() == {16: 32767, 8: 127}[width] and qc.dtype == np.int32
    want = (np.float32(qc @ codes.T) * step).astype(np.float32) * sc.astype(np.float64) + lo * qr.astype(np.float64).sum()
    np.testing.assert_array_equal(got, want)
    exact = qr.astype(np.float64) @ (codes * sc[:, None] + lo[:, None]).T   # float logits of the same codes
    np.testing.assert_allclose(got, exact, rtol=0, atol={16: 1e-4, 8: 0.02}[width] * np.abs(exact).max())


def test_int4_integer_where_it_runs(device, monkeypatch):
    """int4's integer path is the default where it measures faster (the serial kernel on x86
    PoCL, head_dim a multiple of 32: 16-bit query codes keep SmolLM2's pooled perplexity where
    float logits do, docs/formats.md) and the serial kernel's only: an explicit ``"integer"`` is
    refused where the kernel has none (the cooperative variant)."""
    dev = device.queue.device
    kw = dict(batch=1, num_q_heads=8, num_kv_heads=2, head_dim=128, block_size=16, max_q_len=1, max_kv_len=64)
    auto = ops.plan(device.context, kv_dtype="int4", **kw)
    fast = ops.variant_for(dev) == "serial" and "pocl" in dev.version.lower() \
        and layout._x86_int_dot(device.context, dev)    # the probe only where PoCL builds it
    assert auto.int8_dot == ops.int8_dot_for(dev, kv_dtype="int4", context=device.context) \
        == ops.int8_dot_for(dev, kv_dtype="int8", context=device.context) == ("integer" if fast else "float")
    assert ops.int8_dot_for(dev, kv_dtype="int4", head_dim=48, context=device.context) == "float"  # not 32 | D
    assert ops.int8_dot_for(dev, kv_dtype="int8", head_dim=48, context=device.context) == auto.int8_dot
    serial = ops.plan(device.context, kv_dtype="int4", int8_dot="integer", variant="serial", **kw)
    assert dict(serial.defines)["INT8_DOT"] == layout._INT8_DOT_BITS == 16
    monkeypatch.setattr(layout, "_INT8_DOT_BITS", 8)
    assert dict(ops.plan(device.context, kv_dtype="int4", int8_dot="integer", variant="serial", **kw)
                .defines)["INT8_DOT"] == 8
    monkeypatch.setattr(layout, "_INT8_DOT_BITS", 16)
    assert ops.plan(device.context, kv_dtype="int4", variant="cooperative", **kw).int8_dot == "float"
    with pytest.raises(kvcl.InvalidArgument, match="int8_dot: 'integer' for int4 KV needs the serial variant"):
        ops.plan(device.context, kv_dtype="int4", int8_dot="integer", variant="cooperative", **kw)
    monkeypatch.setattr(layout, "_INT8_DOT", "float")     # the module default reaches int4 too
    assert ops.plan(device.context, kv_dtype="int4", variant="serial", **kw).int8_dot == "float"
