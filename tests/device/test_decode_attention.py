"""Decode attention kernels (kernels/decode_attention.cl) against the numpy reference.

Every case encodes random K/V with ``encode_kv``, uploads the stored bytes, and compares the
kernel with the reference run on the same stored bytes (so every dtype must match to ~1e-5
relative); a separate test checks each KV dtype's accuracy against the fp32 output
(docs: targets.md). int8 runs its float path here (``int8_dot="float"``); the integer path is
tested in test_int8_integer_decode.py.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

import kvcl
from kvcl.ops import decode_attention as ops
from kvcl.ops import decode_plan as layout
from kvcl.reference import decode_attention as ref
from kvcl.reference.quantize import encode_kv

REL = 1e-5  # max abs error / max abs(out), same stored data


def make_case(rng, *, lens, q_lens=None, block_size=16, num_kv_heads=2, group=4, head_dim=128,
              kv_dtype="fp32", int8_mode=0, spare=3, shuffle=True, q_gain=1.0, kv=None):
    """Host arrays for a paged batch: stored pools, page table, queries (and the fp32 K/V)."""
    lens = list(lens)
    q_lens = list(q_lens) if q_lens is not None else [1] * len(lens)
    assert all(1 <= q <= n for q, n in zip(q_lens, lens))
    npages = [-(-n // block_size) for n in lens]
    num_blocks = sum(npages) + spare
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    if kv is None:
        k = rng.standard_normal(shape).astype(np.float32)
        v = rng.standard_normal(shape).astype(np.float32)
    else:
        k, v = kv
    k_st, k_sc = encode_kv(k, kv_dtype, int8_mode=int8_mode)
    v_st, v_sc = encode_kv(v, kv_dtype, int8_mode=int8_mode)
    order = rng.permutation(num_blocks) if shuffle else np.arange(num_blocks)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = order[:indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * block_size for n, p in zip(lens, npages)], dtype=np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    queries = (q_gain * rng.standard_normal((int(q_indptr[-1]), num_kv_heads * group, head_dim))
               ).astype(np.float32)
    return dict(queries=queries, k_pool=k_st, v_pool=v_st, k_scales=k_sc, v_scales=v_sc,
                indptr=indptr, indices=indices, last_page_len=last, q_indptr=q_indptr,
                kv_dtype=kv_dtype, int8_mode=int8_mode, max_q_len=max(q_lens), max_kv_len=max(lens),
                k_fp32=k, v_fp32=v)


_HOST_ONLY = ("k_fp32", "v_fp32", "max_q_len", "max_kv_len", "kv_dtype", "int8_mode")


def run_reference(case, **kw):
    args = {k: v for k, v in case.items() if k not in _HOST_ONLY}
    return ref.paged_attention(args.pop("queries"), args.pop("k_pool"), args.pop("v_pool"),
                               args.pop("indptr"), args.pop("indices"), args.pop("last_page_len"),
                               args.pop("q_indptr"), kv_dtype=case["kv_dtype"], **args, **kw)


def upload(queue, case):
    return {k: (cla.to_device(queue, v) if isinstance(v, np.ndarray) else v)
            for k, v in case.items() if k not in ("k_fp32", "v_fp32")}


def run_contiguous(device, case, lens, **kw):
    """``ops.contiguous_attention`` on a case made with ``block_size`` = the capacity (one page a
    sequence, unshuffled, no spare blocks), ``lens`` [B] its cached tokens; the output on the host."""
    q = device.queue
    d = upload(q, case)
    out = cla.empty(q, case["queries"].shape, np.float32)
    ops.contiguous_attention(d["queries"], d["k_pool"], d["v_pool"], cla.to_device(q, np.asarray(lens, np.int32)),
                             d["q_indptr"], out, k_scales=d["k_scales"], v_scales=d["v_scales"],
                             kv_dtype=case["kv_dtype"], max_q_len=case["max_q_len"], max_kv_len=int(max(lens)),
                             **kw).wait()
    return out.get()


def run_paged(device, case, **kw):
    # the float path unless a test asks: these are the same-codes tests of float arithmetic (the
    # int8 integer path has its own, tests/device/test_int8_integer_decode.py)
    kw.setdefault("int8_dot", "float")
    q = device.queue
    d = upload(q, case)
    out = cla.empty(q, case["queries"].shape, np.float32)
    out.fill(np.float32(np.nan))
    ev = ops.paged_attention(d["queries"], d["k_pool"], d["v_pool"], d["indptr"], d["indices"],
                             d["last_page_len"], d["q_indptr"], out, k_scales=d["k_scales"],
                             v_scales=d["v_scales"], kv_dtype=case["kv_dtype"],
                             int8_mode=case["int8_mode"], max_q_len=case["max_q_len"],
                             max_kv_len=case["max_kv_len"], **kw)
    ev.wait()
    return out.get()


def assert_close(got, want, rel=REL):
    assert np.isfinite(got).all(), "kernel wrote NaN/Inf (or left rows unwritten)"
    err = np.abs(got.astype(np.float64) - want).max()
    bound = rel * np.abs(want).max()
    assert err <= bound, f"max abs err {err:.3g} > {bound:.3g}"
    return err / np.abs(want).max()


LENS = (1, 15, 16, 17, 54, 97)


@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("kv_dtype,nan_code", [("fp16", 0x7E00), ("fp8_e4m3", 0x7F), ("fp8_e4m3", 0xFF),
                                               ("fp8_e5m2", 0x7F)])
def test_nan_code_in_k_or_v(device, rng, variant, kv_dtype, nan_code):
    # A stored NaN code in one K row makes every query row that sees that token NaN; one in a V
    # row makes those rows NaN in that head_dim position only; other rows stay exact (the CPU
    # e4m3 path finds NaN codes per row, not per vector: this pins it to the reference)
    case = make_case(rng, lens=(20, 40, 33), q_lens=(1, 2, 1), kv_dtype=kv_dtype)
    blk = case["indices"][case["indptr"][1] + 1]             # sequence 1, tokens 16..31
    case["k_pool"][blk, 1, 3, 17] = nan_code                 # token 19, kv head 1
    blk = case["indices"][case["indptr"][2]]                 # sequence 2, tokens 0..15
    case["v_pool"][blk, 0, 5, 100] = nan_code                # token 5, kv head 0, d = 100
    want = run_reference(case)
    got = run_paged(device, case, _variant=variant)
    nan = np.isnan(want)
    assert nan[1:3, 4:8].all() and nan[3, 0:4, 100].all() and nan.sum() == 2 * 4 * 128 + 4
    np.testing.assert_array_equal(np.isnan(got), nan)
    err = np.abs(got[~nan].astype(np.float64) - want[~nan]).max()
    assert err <= REL * np.abs(want[~nan]).max()


# ---- every KV dtype, ragged batch, shuffled pages ---------------------------------------------

@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("kv_dtype", ["fp16", "fp8_e4m3", "fp8_e5m2"])
def test_every_stored_code_decodes_exactly(device, kv_dtype, variant):
    # One token per sequence: the softmax weight is exactly 1, so the output IS the decoded V
    # row. Every fp8 code (NaN codes included) / 4,608 fp16 patterns (subnormals, Inf, NaN, the
    # extremes) go through each variant's vector decoder and must equal the numpy decode.
    from kvcl.reference.quantize import fp8_decode, fp16_decode
    d = 128
    if kv_dtype == "fp16":
        codes = np.concatenate([np.arange(0, 1024), np.arange(0x7B00, 0x7E00), np.arange(0xFB00, 0xFE00),
                                np.arange(0x8000, 0x8400), np.arange(0x3800, 0x3C00)]).astype(np.uint16)
        want = fp16_decode(codes)
    else:
        codes = np.arange(256, dtype=np.uint8)
        want = fp8_decode(codes, kv_dtype.split("_")[1])
    rows = codes.reshape(-1, d)
    b = len(rows)
    v_pool = rows[:, None, None, :]                          # one block of one token per sequence
    k_pool = np.zeros_like(v_pool)                           # code 0: +0.0 in every format
    q = device.queue
    args = [cla.to_device(q, a) for a in (
        np.zeros((b, 4, d), np.float32), k_pool, v_pool, np.arange(b + 1, dtype=np.int32),
        np.arange(b, dtype=np.int32), np.ones(b, np.int32), np.arange(b + 1, dtype=np.int32))]
    out = cla.empty(q, (b, 4, d), np.float32)
    out.fill(np.float32(7.0))
    ops.paged_attention(*args, out, kv_dtype=kv_dtype, max_q_len=1, max_kv_len=1, _variant=variant).wait()
    got = out.get()
    want = np.broadcast_to(want.reshape(b, 1, d), got.shape)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan], want[~nan])


@pytest.mark.parametrize("kv_dtype,int8_mode", [("fp32", 0), ("fp16", 0), ("int8", 0), ("int8", 1),
                                                ("fp8_e4m3", 0), ("fp8_e5m2", 0), ("int4", 0)])
def test_every_dtype_matches_reference(device, rng, kv_dtype, int8_mode):
    case = make_case(rng, lens=LENS, kv_dtype=kv_dtype, int8_mode=int8_mode)
    assert_close(run_paged(device, case), run_reference(case))


# ---- awkward shapes -------------------------------------------------------------------------

@pytest.mark.parametrize("block_size,group,head_dim", [
    (1, 1, 64), (1, 8, 128), (16, 1, 128), (16, 8, 64), (16, 4, 128), (5, 2, 36),
])
def test_shapes_match_reference(device, rng, block_size, group, head_dim):
    case = make_case(rng, lens=LENS, block_size=block_size, group=group, head_dim=head_dim,
                     num_kv_heads=2 if group < 8 else 1)
    assert_close(run_paged(device, case), run_reference(case))


@pytest.mark.parametrize("window", [0, 7, 20])
@pytest.mark.parametrize("kv_dtype", ["fp32", "int8", "int4"])
def test_prefill_causal_and_window(device, rng, window, kv_dtype):
    case = make_case(rng, lens=(1, 15, 17, 54, 97), q_lens=(1, 15, 5, 17, 9), kv_dtype=kv_dtype)
    assert_close(run_paged(device, case, window=window), run_reference(case, window=window))


def test_window_in_decode(device, rng):
    case = make_case(rng, lens=LENS, block_size=16)
    for window in (1, 16, 40, 500):
        assert_close(run_paged(device, case, window=window), run_reference(case, window=window))


def test_scale_argument(device, rng):
    case = make_case(rng, lens=(17, 54))
    assert_close(run_paged(device, case, scale=0.3), run_reference(case, scale=0.3))


# ---- split-K ----------------------------------------------------------------------------------

@pytest.mark.parametrize("q_lens,window", [((1,) * 6, 0), ((1, 3, 16, 2, 20, 33), 0),
                                           ((1, 3, 16, 2, 20, 33), 10)])
def test_split_k_equals_single_pass(device, rng, q_lens, window):
    # short sequences leave later partitions empty; the window leaves early ones fully masked
    case = make_case(rng, lens=LENS, q_lens=q_lens)
    want = run_reference(case, window=window)
    single = run_paged(device, case, window=window, partition_size=10_000)
    for ps in (1, 16, 32, 48):
        split = run_paged(device, case, window=window, partition_size=ps)
        assert_close(split, want)
        np.testing.assert_allclose(split, single, rtol=0, atol=2e-6 * np.abs(single).max())
    assert_close(single, want)


def test_split_k_automatic_long_context(device, rng):
    # B=1 with one kv head cannot fill a device: the automatic plan splits, then merges
    case = make_case(rng, lens=(1500,), num_kv_heads=1, group=4, kv_dtype="int8")
    p = ops.plan(device.context, batch=1, num_q_heads=4, num_kv_heads=1, head_dim=128,
                 block_size=16, max_q_len=1, max_kv_len=1500, kv_dtype="int8")
    assert p.num_parts > 1 and 256 <= p.partition_size <= 512 and p.partition_size % 16 == 0
    assert_close(run_paged(device, case), run_reference(case))


def test_preallocated_workspace_reused(device, rng):
    case = make_case(rng, lens=LENS, q_lens=(1, 2, 3, 1, 5, 2))
    ws = cla.empty(device.queue, 1 << 18, np.float32)
    want = run_reference(case)
    for _ in range(2):
        assert_close(run_paged(device, case, partition_size=16, workspace=ws), want)
    small = cla.empty(device.queue, 8, np.float32)
    with pytest.raises(kvcl.CapacityError, match="workspace"):
        run_paged(device, case, partition_size=16, workspace=small)


# ---- contiguous == paged ----------------------------------------------------------------------

@pytest.mark.parametrize("capacity,kv_dtype", [(100, "fp32"), (300, "int8"), (200, "int4")])
def test_contiguous_equals_paged(device, rng, capacity, kv_dtype):
    batch, hkv, group, d = 3, 2, 4, 64
    lens = np.array([1, 97, capacity], dtype=np.int32)[:batch]
    q_lens = (1, 4, 2)
    k = rng.standard_normal((batch, hkv, capacity, d)).astype(np.float32)
    v = rng.standard_normal((batch, hkv, capacity, d)).astype(np.float32)
    case = make_case(rng, lens=lens, q_lens=q_lens, block_size=capacity, num_kv_heads=hkv, group=group,
                     head_dim=d, kv_dtype=kv_dtype, spare=0, shuffle=False, kv=(k, v))
    paged = run_paged(device, case, window=50)
    got = run_contiguous(device, case, lens, window=50, int8_dot="float")
    want = ref.contiguous_attention(case["queries"], case["k_pool"], case["v_pool"], lens,
                                    case["q_indptr"], k_scales=case["k_scales"],
                                    v_scales=case["v_scales"], kv_dtype=kv_dtype, window=50)
    assert_close(got, want)
    np.testing.assert_array_equal(got, paged)


# ---- both kernel variants on every device (the default depends on the device type) ----------

_VARIANT_SHAPES = [(16, 4, 128, "fp32"), (16, 4, 128, "fp16"), (16, 4, 128, "int8"), (16, 4, 128, "fp8_e4m3"),
                   (16, 4, 128, "fp8_e5m2"), (1, 8, 64, "fp32"), (5, 2, 36, "fp32"), (7, 1, 20, "int8"),
                   # rows per tile not a multiple of 4 (the serial logit step sums 4 rows at a time)
                   (16, 5, 64, "fp32"), (16, 3, 64, "int8"),
                   # int4: two values per byte, unpacked 4 / 8 / 16 at a time
                   (16, 4, 128, "int4"), (5, 2, 36, "int4"), (7, 1, 20, "int4"), (16, 3, 64, "int4")]


@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("block_size,group,head_dim,kv_dtype", _VARIANT_SHAPES)
def test_each_variant_matches_reference(device, rng, variant, block_size, group, head_dim, kv_dtype):
    case = make_case(rng, lens=LENS, q_lens=(1, 3, 2, 1, 5, 1), block_size=block_size, group=group,
                     head_dim=head_dim, num_kv_heads=2 if group < 8 else 1, kv_dtype=kv_dtype)
    want = run_reference(case, window=20)
    assert_close(run_paged(device, case, window=20, _variant=variant), want)
    assert_close(run_paged(device, case, window=20, partition_size=16, _variant=variant), want)


@pytest.mark.parametrize("local_size", [8, 12, 32])
@pytest.mark.parametrize("head_dim", [36, 20, 128])
def test_cooperative_fits_small_work_groups(device, rng, local_size, head_dim):
    # launch parameters derive from the limits: head_dim / VEC need not divide the work-group
    # (llvmpipe allows 32 work-items for this kernel; head_dim 36 has 9 vectors per row)
    case = make_case(rng, lens=LENS, block_size=5, group=2, head_dim=head_dim)
    p = ops.plan(device.context, batch=len(LENS), num_q_heads=4, num_kv_heads=2, head_dim=head_dim,
                 block_size=5, max_q_len=1, max_kv_len=max(LENS), local_size=local_size,
                 variant="cooperative")
    assert p.local_size <= max(local_size, 4) and p.local_size % 4 == 0
    assert_close(run_paged(device, case, _variant="cooperative", _local_size=local_size),
                 run_reference(case))


@pytest.mark.parametrize("num_kv_heads,group,head_dim,q_lens,kv_dtype",
                         [(6, 2, 64, None, "fp32"), (8, 4, 128, (1, 3, 2, 1, 5, 1), "int8"),
                          (3, 1, 32, (1, 1, 4, 1, 2, 1), "fp16"), (4, 4, 256, None, "fp8_e5m2")])
def test_serial_kv_heads_per_work_group(device, rng, monkeypatch, num_kv_heads, group, head_dim, q_lens,
                                        kv_dtype):
    # the serial variant serves several kv heads per work-group (one run over a block's rows of
    # neighbouring heads): as many as divide num_kv_heads within the stack budget, and the
    # result is the one-head-per-work-group result, bit for bit
    case = make_case(rng, lens=LENS, q_lens=q_lens, num_kv_heads=num_kv_heads, group=group,
                     head_dim=head_dim, kv_dtype=kv_dtype)
    p = ops.plan(device.context, batch=len(LENS), num_q_heads=num_kv_heads * group,
                 num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16,
                 max_q_len=case["max_q_len"], max_kv_len=case["max_kv_len"], kv_dtype=kv_dtype,
                 variant="serial")
    rows = group * (p.q_tile if q_lens else 1)
    budget = min(layout._SERIAL_MAX_HG, layout._SERIAL_STATE_FLOATS // (rows * head_dim))
    assert p.kv_heads_per_group == max(h for h in range(1, budget + 1) if num_kv_heads % h == 0)
    assert p.kv_heads_per_group > 1
    want = run_reference(case, window=20)
    grouped = run_paged(device, case, window=20, _variant="serial")
    split = run_paged(device, case, window=20, partition_size=32, _variant="serial")
    assert_close(grouped, want)
    assert_close(split, want)
    monkeypatch.setattr(layout, "_SERIAL_MAX_HG", 1)
    np.testing.assert_array_equal(run_paged(device, case, window=20, _variant="serial"), grouped)


def test_default_variant_follows_the_device_type(device):
    import pyopencl as cl
    p = ops.plan(device.context, batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128,
                 block_size=16, max_q_len=1, max_kv_len=2048)
    dev = device.context.devices[0]
    cpu = bool(dev.type & cl.device_type.CPU) and "llvmpipe" not in dev.name.lower()
    assert dict(p.defines)["SERIAL"] == int(cpu)
    assert (p.local_size == 1) == cpu
    with pytest.raises(kvcl.InvalidArgument, match="variant"):
        ops.plan(device.context, batch=1, num_q_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
                 max_q_len=1, max_kv_len=16, variant="warp")


def test_memoized_plans_equal_fresh_ones(device):
    """plan() memoizes one-partition layouts per 1024-token bucket of lengths: for every length
    (short, across a bucket, long with and without split-K) and batch, the memoized plan is the
    one computed afresh for that length."""
    dev = device.context.devices[0]
    for batch, kv_heads in ((1, 2), (1, 8), (16, 8)):
        for max_kv_len in (1, 15, 16, 511, 512, 513, 1000, 1024, 1025, 2047, 3000, 4096, 4097, 9000):
            for _ in range(2):   # the second call is the memo's answer
                p = layout.plan(device.context, batch=batch, num_q_heads=4 * kv_heads, num_kv_heads=kv_heads,
                                head_dim=64, block_size=16, max_q_len=1, max_kv_len=max_kv_len)
            fresh = layout._plan(device.context, batch, 4 * kv_heads, kv_heads, 64, 16, 1, max_kv_len,
                                 layout._kv_dtype("fp32"), 0, None, None, None, dev)
            assert p == fresh, (batch, kv_heads, max_kv_len)
            assert p.num_parts * p.partition_size >= max_kv_len


def test_one_compute_unit_cpu_takes_one_partition(device):
    """On a CPU device of one compute unit (PoCL's in-thread companion) a work-group runs at a
    time: the automatic layout splits no context (the merge would be all it adds), where the
    device's own queue (two or more compute units) splits one sequence's long context."""
    if device.inline_queue is None:
        pytest.skip("no in-thread companion (PoCL only)")
    inline, main = device.inline_queue.device, device.queue.device
    assert inline.max_compute_units == 1
    for max_kv_len in (513, 1024, 4096, 32768):
        kw = dict(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, max_q_len=1,
                  max_kv_len=max_kv_len)
        assert layout.plan(device.context, device=inline, **kw).num_parts == 1, max_kv_len
        if main.max_compute_units > 1:
            assert layout.plan(device.context, device=main, **kw).num_parts > 1, max_kv_len


# ---- the inline math of common.h ----------------------------------------------------------------

_MATH_SRC = """#include "common.h"
__kernel void math(__global const float *x, __global float *e2, __global float *e2v4,
                   __global float *e2v8, __global float *e, __global float *ev8,
                   __global const uint *h, __global float *hf, __global float *np1,
                   __global float *np8) {
    const int i = get_global_id(0);
    e2[i] = kvcl_exp2(x[i]);
    np1[i] = kvcl_exp2_nonpos(x[i]);
    if (i % 8 == 0) vstore8(kvcl_exp2_nonpos(vload8(i / 8, x)), i / 8, np8);
    e[i] = kvcl_exp(x[i]);
    hf[i] = kvcl_half_bits_to_float(h[i]);
    if (i % 4 == 0) vstore4(kvcl_exp2(vload4(i / 4, x)), i / 4, e2v4);
    if (i % 8 == 0) {
        vstore8(kvcl_exp2(vload8(i / 8, x)), i / 8, e2v8);
        vstore8(kvcl_exp(vload8(i / 8, x)), i / 8, ev8);
    }
}
"""


def test_inline_exp_and_half_conversion_match_numpy(device, rng):
    import pyopencl as cl
    from kvcl.runtime import kernel_dir
    prg = cl.Program(device.context, _MATH_SRC).build(options=[f"-I{kernel_dir()}", "-cl-std=CL1.2"])
    special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 127.0, 127.99, 128.0, -126.0, -126.5, -149.0, -150.0,
               -151.0, -1e30, 1e30, 88.7, 88.8, -87.3, -103.0, -104.0, np.inf, -np.inf, np.nan]
    x = np.concatenate([special, np.linspace(-160.0, 130.0, 60001), rng.uniform(-40.0, 2.0, 40001)])
    n = -(-x.size // 8) * 8
    x = np.resize(x, n).astype(np.float32)
    h = np.resize(np.arange(1 << 16, dtype=np.uint32), n)
    q = device.queue
    xd, hd = cla.to_device(q, x), cla.to_device(q, h)
    outs = [cla.empty(q, n, np.float32) for _ in range(8)]
    prg.math(q, (n,), None, xd.data, *[o.data for o in outs[:5]], hd.data, *[o.data for o in outs[5:]])
    e2, e2v4, e2v8, e, ev8, hf, np1, np8 = (o.get() for o in outs)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        for got, want in ((e2, np.exp2(x64)), (e2v4, np.exp2(x64)), (e2v8, np.exp2(x64)),
                          (e, np.exp(x64)), (ev8, np.exp(x64))):
            normal = np.isfinite(want) & (want >= 2.0 ** -126) & (want <= np.finfo(np.float32).max)
            rel = np.abs(got[normal] - want[normal]) / want[normal]
            assert rel.max() <= 2e-7, rel.max()
            tiny = want < 2.0 ** -126            # subnormal range: absolute error below 2^-148
            assert np.all(np.abs(got[tiny] - want[tiny]) <= 2.0 ** -148)
            assert np.all(got[want < 2.0 ** -151] == 0.0)       # very negative (and -inf) -> 0
            assert np.all(np.isposinf(got[want > np.finfo(np.float32).max * 1.0000001]))
            assert np.all(np.isnan(got[np.isnan(x)]))
    # the softmax's 2^x for x <= 0: same accuracy down to 2^-126, 0 below, NaN kept
    nonpos = (x <= 0) | np.isnan(x)
    want = np.exp2(x64[nonpos])
    for got in (np1[nonpos], np8[nonpos]):
        normal = want >= 2.0 ** -126
        assert (np.abs(got[normal] - want[normal]) / want[normal]).max() <= 2e-7
        assert np.all(got[want < 2.0 ** -127] == 0.0)            # flushed (and -inf -> 0)
        assert np.all(np.abs(got[~normal & ~np.isnan(want)] - want[~normal & ~np.isnan(want)]) <= 2.0 ** -126)
        assert np.all(np.isnan(got[np.isnan(want)]))
    want_h = (h & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want_h)
    np.testing.assert_array_equal(hf[~nan], want_h[~nan])
    assert np.isnan(hf[nan]).all()


# ---- accuracy of each KV dtype against the fp32 output (targets.md) -------------------------

def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_dtype_accuracy_vs_fp32(device, rng):
    # T=512, D=128, peaky attention (large-norm queries)
    shape_kw = dict(lens=(512, 300), block_size=16, num_kv_heads=2, group=4, head_dim=128,
                    shuffle=False, spare=0)
    base = make_case(rng, **shape_kw, q_gain=3.0)
    kv = (base["k_fp32"], base["v_fp32"])
    fp32 = run_reference(base)
    results = {}
    for kv_dtype in ("fp16", "int8", "fp8_e4m3", "fp8_e5m2"):
        case = make_case(rng, **shape_kw, kv_dtype=kv_dtype, kv=kv)
        case["queries"] = base["queries"]
        got = run_paged(device, case)
        results[kv_dtype] = (np.abs(got - fp32).max() / np.abs(fp32).max(), _cosine(got, fp32))
    assert results["fp16"][0] <= 2e-3, results
    assert results["int8"][1] >= 0.9995 and results["int8"][0] < 0.03, results
    assert results["fp8_e4m3"][1] >= 0.995, results
    assert results["fp8_e5m2"][1] >= 0.97, results


# ---- property test ----------------------------------------------------------------------------

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev extra
    hypothesis = None

# a few kernel builds, many page tables / lengths / windows / partitions over them
_CONFIGS = [("fp32", 16, 4, 128), ("int8", 16, 4, 128), ("fp16", 16, 4, 128), ("fp8_e5m2", 16, 4, 128),
            ("int4", 16, 4, 128),
            ("fp32", 1, 8, 128), ("fp32", 5, 2, 36)]


def _given_data(fn):
    if hypothesis is None:
        return pytest.mark.skip(reason="hypothesis not installed")(fn)
    return hypothesis.given(data=st.data())(fn)


@_given_data
def test_property_random_batches(device, data):
    kv_dtype, block_size, group, head_dim = data.draw(st.sampled_from(_CONFIGS), label="config")
    batch = data.draw(st.integers(1, 4), label="batch")
    lens = data.draw(st.lists(st.sampled_from([1, 2, block_size - 1, block_size, block_size + 1,
                                               2 * block_size + 1, 33, 70]).filter(lambda n: n >= 1),
                              min_size=batch, max_size=batch), label="lens")
    # prefill (q_len > 1) only on configs whose prefill kernels other tests build anyway
    decode = data.draw(st.booleans(), label="decode") or (kv_dtype, block_size) not in (("fp32", 16),
                                                                                       ("int8", 16))
    q_lens = [1 if decode else data.draw(st.integers(1, min(n, 3))) for n in lens]
    window = data.draw(st.sampled_from([0, 0, 1, 5, 30]), label="window")
    partition_size = data.draw(st.sampled_from([None, None, 7, 16, 32]), label="partition_size")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    case = make_case(rng, lens=lens, q_lens=q_lens, block_size=block_size, num_kv_heads=2 if group < 8 else 1,
                     group=group, head_dim=head_dim, kv_dtype=kv_dtype)
    # max_q_len is an upper bound: a fixed one keeps the number of kernel builds small
    case["max_q_len"] = 1 if decode else 4
    assert_close(run_paged(device, case, window=window, partition_size=partition_size),
                 run_reference(case, window=window))


# ---- bad input --------------------------------------------------------------------------------

@pytest.fixture
def good(device, rng):
    case = make_case(rng, lens=(17, 5), kv_dtype="int8")
    d = upload(device.queue, case)
    d["out"] = cla.empty(device.queue, case["queries"].shape, np.float32)
    return d


def _call(d, **over):
    args = dict(d)
    args.update(over)
    return ops.paged_attention(args["queries"], args["k_pool"], args["v_pool"], args["indptr"],
                               args["indices"], args["last_page_len"], args["q_indptr"], args["out"],
                               k_scales=args["k_scales"], v_scales=args["v_scales"],
                               kv_dtype=args["kv_dtype"], int8_mode=args["int8_mode"],
                               window=args.get("window", 0), max_q_len=args["max_q_len"],
                               max_kv_len=args["max_kv_len"])


def test_good_input_runs(good):
    _call(good).wait()


@pytest.mark.parametrize("name,make,exc", [
    ("queries", lambda q, d: cla.empty(q, (2, 8), np.float32), kvcl.ShapeError),
    ("queries", lambda q, d: cla.empty(q, d["queries"].shape, np.float64), kvcl.DtypeError),
    ("queries", lambda q, d: d["queries"].get(), kvcl.DtypeError),
    ("k_pool", lambda q, d: cla.empty(q, d["k_pool"].shape, np.uint8), kvcl.DtypeError),
    ("k_pool", lambda q, d: cla.empty(q, d["k_pool"].shape[:3] + (32,), np.int8), kvcl.ShapeError),
    ("v_pool", lambda q, d: cla.empty(q, (1,) + d["v_pool"].shape[1:], np.int8), kvcl.ShapeError),
    ("k_scales", lambda q, d: None, kvcl.InvalidArgument),
    ("k_scales", lambda q, d: cla.empty(q, d["k_scales"].shape, np.uint16), kvcl.DtypeError),
    ("v_scales", lambda q, d: cla.empty(q, d["v_scales"].shape[:2], np.float32), kvcl.ShapeError),
    ("indptr", lambda q, d: cla.empty(q, 3, np.int64), kvcl.DtypeError),
    ("indices", lambda q, d: cla.empty(q, (2, 2), np.int32), kvcl.ShapeError),
    ("last_page_len", lambda q, d: cla.empty(q, 3, np.int32), kvcl.ShapeError),
    ("q_indptr", lambda q, d: cla.empty(q, 2, np.int32), kvcl.ShapeError),
    ("out", lambda q, d: cla.empty(q, d["queries"].shape, np.float16), kvcl.DtypeError),
    ("out", lambda q, d: cla.empty(q, (2, 8, 32), np.float32), kvcl.ShapeError),
    ("kv_dtype", lambda q, d: "bf16", kvcl.InvalidArgument),
    ("int8_mode", lambda q, d: 2, kvcl.OutOfRangeError),
    ("window", lambda q, d: -1, kvcl.OutOfRangeError),
    ("max_q_len", lambda q, d: 0, kvcl.OutOfRangeError),
    ("max_kv_len", lambda q, d: 1.5, kvcl.DtypeError),
])
def test_bad_input_names_the_argument(device, good, name, make, exc):
    with pytest.raises(exc, match=name):
        _call(good, **{name: make(device.queue, good)})


def test_bad_head_ratio_and_head_dim(device, good):
    q = device.queue
    with pytest.raises(kvcl.ShapeError, match="num_q_heads"):
        _call(good, queries=cla.empty(q, (2, 7, 128), np.float32), out=cla.empty(q, (2, 7, 128), np.float32))
    k = cla.empty(q, good["k_pool"].shape[:3] + (30,), np.int8)
    with pytest.raises(kvcl.ShapeError, match="multiple of 4"):
        _call(good, queries=cla.empty(q, (2, 8, 30), np.float32), out=cla.empty(q, (2, 8, 30), np.float32),
              k_pool=k, v_pool=k)


def test_bad_contiguous_input(device, rng):
    q = device.queue
    k = cla.empty(q, (2, 2, 32, 64), np.float32)
    qi = cla.to_device(q, np.array([0, 1, 2], np.int32))
    queries = cla.empty(q, (2, 8, 64), np.float32)
    out = cla.empty(q, (2, 8, 64), np.float32)
    with pytest.raises(kvcl.ShapeError, match="kv_lens"):
        ops.contiguous_attention(queries, k, k, cla.empty(q, 3, np.int32), qi, out, max_q_len=1, max_kv_len=4)
    with pytest.raises(kvcl.OutOfRangeError, match="max_kv_len"):
        ops.contiguous_attention(queries, k, k, cla.empty(q, 2, np.int32), qi, out, max_q_len=1, max_kv_len=33)


def test_argument_reuse_between_launches(device, rng):
    # the launchers skip re-setting kernel arguments that did not change (kvcl.ops._launch.enqueue):
    # alternate two batches with different buffers, scales and windows through the same kernel
    cases = [make_case(rng, lens=LENS) for _ in range(2)]
    for case, window in ((cases[0], 0), (cases[1], 0), (cases[1], 9), (cases[0], 9), (cases[0], 0)):
        assert_close(run_paged(device, case, window=window), run_reference(case, window=window))
    base = make_case(rng, lens=LENS)
    assert_close(run_paged(device, base, scale=0.3), run_reference(base, scale=0.3))
    assert_close(run_paged(device, base), run_reference(base))
