"""kvcl.ferrum (KvFp16 / KvInt8 / KvFp8 / KvBf16 and their KvLayer operations).

Ported from ferrum-kernels' own tests (tests/int8_kv_parity.rs, attention_paged_attention_test.rs,
attention_paged_kv_append_test.rs), plus exactness against kvcl's numpy references
(:mod:`kvcl.reference`) and bad-input tests that check nothing changed.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

import kvcl
from kvcl.ferrum import (
    AttnConfig,
    KvBf16,
    KvCache,
    KvCacheQuant,
    KvDtypeKind,
    KvDtypeUnsupported,
    KvFp8,
    KvFp16,
    KvInt8,
)
from kvcl.reference import decode_attention as ref_attn
from kvcl.reference import paged_write as ref_write
from kvcl.reference.quantize import decode_kv, fp16_decode, quantize_int8_rows

M64 = (1 << 64) - 1


def rnd(state: list, n: int) -> np.ndarray:
    """The source tests' LCG: uniform floats in [-1, 1) (``state`` is a one-element list)."""
    out = np.empty(n, np.float32)
    s = state[0]
    for i in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) & M64
        u = (s >> 33) & 0x00FF_FFFF
        out[i] = np.float32(u) / np.float32(16_777_216.0) * np.float32(2.0) - np.float32(1.0)
    state[0] = s
    return out


def pack_qkv(q, k, v):
    """Token rows [T][Hq·D + 2·Hkv·D] from q [T, Hq, D], k / v [T, Hkv, D]."""
    T = k.shape[0]
    return np.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=1)


def reference_attention(q, k, v, scale, q_len=1):
    """float64 attention of q [q_len, Hq, D] over k / v [kv_len, Hkv, D], bottom-right causal."""
    out = ref_attn._attend(np.asarray(q, np.float32), np.asarray(k, np.float32),
                           np.asarray(v, np.float32), scale, 0)
    return out.astype(np.float32)


def stored_rows(pool, scales, table, positions, block_size, kv_dtype):
    """Dequantised rows [len(positions), Hkv, D] of a kvcl pool at logical positions."""
    positions = np.asarray(positions)
    blocks = np.asarray(table)[positions // block_size]
    data = pool[blocks, :, positions % block_size]          # [n, Hkv, D]
    sc = None if scales is None else scales[blocks, :, positions % block_size]
    return decode_kv(data, sc, kv_dtype)


# ---- metadata -----------------------------------------------------------------------------

def test_dtype_kinds():
    assert [(c.NAME, c.BYTES_PER_ELEM) for c in (KvFp16, KvBf16, KvInt8, KvFp8)] == [
        ("fp16", 2), ("bf16", 2), ("int8", 1), ("fp8", 1)]
    assert all(issubclass(c, KvDtypeKind) for c in (KvFp16, KvBf16, KvInt8, KvFp8))


def test_alloc_and_accessors(device):
    pool_k, pool_v = KvFp16.alloc_pool(8, 16, 2, 128, device=device)
    assert pool_k.shape == (8, 2, 16, 128) and pool_k.dtype == np.uint16
    layer = KvFp16.alloc_paged(4, 16, 2, 128, pool_k=pool_k, pool_v=pool_v, device=device)
    assert isinstance(layer, KvCache) and not isinstance(layer, KvCacheQuant)
    assert (KvFp16.len(layer), KvFp16.capacity(layer), KvFp16.block_size(layer)) == (0, 64, 16)
    assert (KvFp16.num_kv_heads(layer), KvFp16.head_dim(layer)) == (2, 128)
    assert KvFp16.is_paged(layer) and layer.k is pool_k
    assert KvFp16.block_table(layer).get().tolist() == [0, 1, 2, 3]
    assert KvFp16.block_table(layer).dtype == np.uint32
    assert KvFp16.context_lens(layer).get().tolist() == [0]
    assert KvFp16.paged_block_indices(layer) == [0, 1, 2, 3]
    KvFp16.set_block_table(layer, [5, 2, 7, 1])
    assert KvFp16.block_table(layer).get().tolist() == [5, 2, 7, 1]
    assert KvFp16.paged_block_indices_mut(layer) == [5, 2, 7, 1]
    KvFp16.set_len(layer, 64)
    assert KvFp16.len(layer) == 64

    q8 = KvInt8.alloc_paged(8, 16, 2, 128, device=device)
    assert isinstance(q8, KvCacheQuant) and q8.capacity == 128
    assert q8.k.shape == (8, 2, 16, 128) and q8.k.dtype == np.int8
    assert q8.k_scales.shape == (8, 2, 16) and q8.k_scales.dtype == np.uint16

    contig = KvFp16.alloc_contig(50, 2, 128, device=device)
    assert not KvFp16.is_paged(contig) and KvFp16.block_size(contig) == 0
    assert contig.k.shape == (2, 50, 128) and KvFp16.block_table(contig) is None
    assert KvFp16.context_lens(contig) is None and KvFp16.paged_block_indices(contig) == []

    f8 = KvFp8.alloc_contig(16, 1, 8, device=device)
    assert f8.k.dtype == np.uint8


def test_unsupported_dtypes(device):
    with pytest.raises(KvDtypeUnsupported, match="paged-only"):
        KvInt8.alloc_contig(64, 2, 128, device=device)
    for call in (lambda: KvBf16.alloc_paged(4, 16, 2, 128, device=device),
                 lambda: KvBf16.alloc_contig(64, 2, 128, device=device),
                 lambda: KvBf16.alloc_pool(4, 16, 2, 128, device=device),
                 lambda: KvInt8.alloc_pool(4, 16, 2, 128, device=device)):
        with pytest.raises(KvDtypeUnsupported):
            call()
    layer = KvInt8.alloc_paged(1, 16, 1, 8, device=device)
    with pytest.raises(KvDtypeUnsupported):
        KvInt8.contig_write(layer, np.zeros((1, 24), np.float32), None, None, None, None, None,
                            1, 1, 1, 8, 0, 1e-6, 0)
    with pytest.raises(KvDtypeUnsupported):
        KvInt8.contig_decode_attention(layer, np.zeros((1, 1, 8), np.float32), None,
                                       AttnConfig(1, 1, 8), 1, 0)
    assert issubclass(KvDtypeUnsupported, kvcl.KvclError)
    assert issubclass(KvDtypeUnsupported, NotImplementedError)


# ---- ported: tests/int8_kv_parity.rs -------------------------------------------------------

def test_int8_append_roundtrip(device):
    """16 tokens at sparse positions 3 + 4i of a 64-token pool: dequant error < 0.002, and the
    stored int8 codes and fp16 scales are exactly ferrum's formula (quantize_int8_rows mode 1)."""
    T, H, D, POOL = 16, 4, 128, 64
    state = [0xDEADBEEF]
    k_in = (rnd(state, T * H * D) * np.float32(0.1)).reshape(T, H, D)
    v_in = (rnd(state, T * H * D) * np.float32(0.1)).reshape(T, H, D)
    layer = KvInt8.alloc_paged(POOL // 16, 16, H, D, device=device)
    q_in = np.zeros((T, H, D), np.float32)
    qkv = pack_qkv(q_in, k_in, v_in)
    positions = 3 + 4 * np.arange(T)
    for t in range(T):
        q = KvInt8.paged_write(layer, qkv[t:t + 1], None, None, None, None, None, 1, H, H, D,
                               int(positions[t]), 1e-6, 0)
        np.testing.assert_array_equal(q, q_in[t:t + 1])
    assert KvInt8.len(layer) == 0   # paged_write does not advance len

    k_pool, v_pool = layer.k.get(), layer.v.get()
    k_sc, v_sc = layer.k_scales.get(), layer.v_scales.get()
    table = np.arange(POOL // 16)
    max_abs = 0.0
    for pool, sc, x in ((k_pool, k_sc, k_in), (v_pool, v_sc, v_in)):
        got = stored_rows(pool, sc, table, positions, 16, "int8")
        max_abs = max(max_abs, float(np.abs(got - x).max()))
        codes, scales = quantize_int8_rows(x, mode=1)
        blocks, offs = table[positions // 16], positions % 16
        np.testing.assert_array_equal(pool[blocks, :, offs], codes)
        np.testing.assert_array_equal(sc[blocks, :, offs], scales)
    assert max_abs < 0.002, max_abs
    # slots that were never written stay zero (no stray writes)
    untouched = np.setdiff1d(np.arange(POOL), positions)
    assert not k_pool[untouched // 16, :, untouched % 16].any()
    assert not k_sc[untouched // 16, :, untouched % 16].any()


@pytest.mark.parametrize("valid_kv_len, seed", [(96, 0xCAFEF00D), (64, 0xBEEFF00D)])
def test_int8_paged_decode_parity_vs_fp32_reference(device, valid_kv_len, seed):
    """8 q heads / 2 kv heads, D 128, block 16, 8 blocks: INT8 decode vs the FP32 host reference
    (cosine > 0.999, max|diff| / max|out| < 0.02), and vs kvcl's reference of the stored bytes."""
    HQ, HKV, D, BS, MAX_BLOCKS = 8, 2, 128, 16, 8
    state = [seed]
    q = (rnd(state, HQ * D) * np.float32(0.5)).reshape(1, HQ, D)
    pool_tokens = MAX_BLOCKS * BS
    k = (rnd(state, pool_tokens * HKV * D) * np.float32(0.3)).reshape(pool_tokens, HKV, D)
    v = (rnd(state, pool_tokens * HKV * D) * np.float32(0.3)).reshape(pool_tokens, HKV, D)
    scale = 1.0 / np.sqrt(D)
    out_ref = reference_attention(q, k[:valid_kv_len], v[:valid_kv_len], scale)

    layer = KvInt8.alloc_paged(MAX_BLOCKS, BS, HKV, D, device=device)
    qkv = pack_qkv(np.zeros((valid_kv_len, HQ, D), np.float32), k[:valid_kv_len], v[:valid_kv_len])
    KvInt8.paged_write(layer, qkv, None, None, None, None, None, valid_kv_len, HQ, HKV, D, 0,
                       1e-6, 0)
    KvInt8.set_len(layer, valid_kv_len)
    out = KvInt8.paged_decode_attention(layer, q, None, HQ, HKV, D, valid_kv_len, 1)
    assert out.shape == (1, HQ, D)
    assert KvInt8.context_lens(layer).get().tolist() == [valid_kv_len]

    a, b = out_ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
    rel_to_mag = np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)
    assert cosine > 0.999, cosine
    assert rel_to_mag < 0.02, rel_to_mag

    # the kernel itself: same result as the numpy reference over the stored int8 + fp16 scales
    table = np.arange(MAX_BLOCKS)
    kq = stored_rows(layer.k.get(), layer.k_scales.get(), table, np.arange(valid_kv_len), BS, "int8")
    vq = stored_rows(layer.v.get(), layer.v_scales.get(), table, np.arange(valid_kv_len), BS, "int8")
    np.testing.assert_allclose(out, reference_attention(q, kq, vq, scale), rtol=1e-4, atol=1e-5)


# ---- ported: tests/attention_paged_attention_test.rs ---------------------------------------

def _decode_case(q_fn, k_fn, v_fn, HQ=8, HKV=2, D=128, KV_LEN=50):
    q = q_fn(np.arange(HQ * D, dtype=np.float32)).astype(np.float32).reshape(1, HQ, D)
    k = k_fn(np.arange(HKV * KV_LEN * D, dtype=np.float32)).astype(np.float32).reshape(HKV, KV_LEN, D)
    v = v_fn(np.arange(HKV * KV_LEN * D, dtype=np.float32)).astype(np.float32).reshape(HKV, KV_LEN, D)
    return q, k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy()   # token-major K/V


def _fill_contig(kind, q, k, v, device):
    """A contiguous layer of capacity kv_len holding k / v (written by contig_write, qk_mode 0)."""
    kv_len, HKV, D = k.shape
    HQ = q.shape[1]
    layer = kind.alloc_contig(kv_len, HKV, D, device=device)
    qkv = pack_qkv(np.zeros((kv_len, HQ, D), np.float32), k, v)
    kind.contig_write(layer, qkv, None, None, None, None, None, kv_len, HQ, HKV, D, 0, 1e-6, 0)
    kind.set_len(layer, kv_len)
    return layer


def _fill_paged(kind, q, k, v, table, num_blocks, device, block_size=16):
    kv_len, HKV, D = k.shape
    HQ = q.shape[1]
    pool_k, pool_v = kind.alloc_pool(num_blocks, block_size, HKV, D, device=device)
    layer = kind.alloc_paged(len(table), block_size, HKV, D, device=device)
    kind.set_block_table(layer, table)
    qkv = pack_qkv(np.zeros((kv_len, HQ, D), np.float32), k, v)
    kind.paged_write(layer, qkv, None, None, None, None, None, kv_len, HQ, HKV, D, 0, 1e-6, 0,
                     pool_k, pool_v)
    kind.set_len(layer, kv_len)
    return layer, pool_k, pool_v


@pytest.mark.parametrize("kind", [KvFp16])
def test_paged_decode_matches_contiguous_small(device, kind):
    """8 q / 2 kv heads, kv_len 50, block 16 (4 blocks, the last partial): paged == contiguous."""
    q, k, v = _decode_case(lambda i: np.sin(i * 0.013) * 0.2, lambda i: np.cos(i * 0.0091) * 0.25,
                           lambda i: np.sin(i * 0.0117 + 1.7) * 0.25)
    contig = _fill_contig(kind, q, k, v, device)
    out_contig = kind.contig_decode_attention(contig, q, None, AttnConfig(8, 2, 128), 1, 49)
    layer, pool_k, pool_v = _fill_paged(kind, q, k, v, [0, 1, 2, 3], 4, device)
    out_paged = kind.paged_decode_attention(layer, q, None, 8, 2, 128, 50, 1, pool_k, pool_v)
    np.testing.assert_allclose(out_paged, out_contig, rtol=0, atol=1e-4)
    # and both equal float64 attention over the values as stored (fp16 / fp8 rounded)
    rounded = {KvFp16: "fp16", KvFp8: "fp8_e4m3"}[kind]
    from kvcl.reference.quantize import roundtrip
    expect = reference_attention(q, roundtrip(k, rounded), roundtrip(v, rounded), 1 / np.sqrt(128))
    np.testing.assert_allclose(out_paged, expect, rtol=1e-4, atol=1e-5)


def test_paged_decode_handles_shuffled_block_table(device):
    """Logical blocks 0..3 → physical [5, 2, 7, 1] of an 8-block pool: same result as contiguous."""
    q, k, v = _decode_case(lambda i: np.sin(i * 0.029) * 0.2, lambda i: np.cos(i * 0.011) * 0.2,
                           lambda i: np.sin(i * 0.013 + 0.5) * 0.2)
    contig = _fill_contig(KvFp16, q, k, v, device)
    out_contig = KvFp16.contig_decode_attention(contig, q, None, AttnConfig(8, 2, 128), 1, 49)
    layer, pool_k, pool_v = _fill_paged(KvFp16, q, k, v, [5, 2, 7, 1], 8, device)
    out_paged = KvFp16.paged_decode_attention(layer, q, None, 8, 2, 128, 50, 1, pool_k, pool_v)
    np.testing.assert_allclose(out_paged, out_contig, rtol=0, atol=1e-4)
    # the tokens really live in the permuted blocks; blocks 0, 3, 4, 6 stay untouched
    pk = pool_k.get()
    np.testing.assert_array_equal(fp16_decode(pk[5, :, 0]), k[0].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(fp16_decode(pk[1, :, 1]), k[49].astype(np.float16).astype(np.float32))
    assert not pk[[0, 3, 4, 6]].any()


def test_multi_token_decode_is_causal(device, rng):
    """tokens > 1: query i sees [0, final_kv_len - tokens + 1 + i), for INT8 and FP8 too."""
    HQ, HKV, D, BS, T, KV = 4, 2, 16, 4, 2, 11
    k = rng.standard_normal((KV, HKV, D)).astype(np.float32)
    v = rng.standard_normal((KV, HKV, D)).astype(np.float32)
    q = rng.standard_normal((T, HQ, D)).astype(np.float32)
    for kind in (KvFp16, KvInt8, KvFp8):
        if kind is KvInt8:
            layer = kind.alloc_paged(3, BS, HKV, D, device=device)
            pools = (layer.k, layer.v)
        else:
            pools = kind.alloc_pool(4, BS, HKV, D, device=device)
            layer = kind.alloc_paged(3, BS, HKV, D, pool_k=pools[0], pool_v=pools[1], device=device)
            kind.set_block_table(layer, [3, 0, 2])
        qkv = pack_qkv(np.zeros((KV, HQ, D), np.float32), k, v)
        kind.paged_write(layer, qkv, None, None, None, None, None, KV, HQ, HKV, D, 0, 1e-6, 0)
        out = kind.paged_decode_attention(layer, q, None, HQ, HKV, D, KV, T)
        table = np.asarray(kind.paged_block_indices(layer))
        ks = layer.k_scales.get() if kind is KvInt8 else None
        vs = layer.v_scales.get() if kind is KvInt8 else None
        kr = stored_rows(pools[0].get(), ks, table, np.arange(KV), BS, kind._STORAGE)
        vr = stored_rows(pools[1].get(), vs, table, np.arange(KV), BS, kind._STORAGE)
        expect = reference_attention(q, kr, vr, 1 / np.sqrt(D))
        np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-5)
        # the first query row does not see the last position
        full = reference_attention(q[:1], kr, vr, 1 / np.sqrt(D))
        assert not np.allclose(out[0], full[0], rtol=1e-3, atol=1e-4)


# ---- ported: tests/attention_paged_kv_append_test.rs ---------------------------------------

def _append_inputs(tokens, q_heads, kv_heads, head_dim, max_seq_len):
    width = (q_heads + 2 * kv_heads) * head_dim
    i = np.arange(tokens * width, dtype=np.float32)
    qkv = (np.sin(i * np.float32(0.011) + np.float32(0.2)) * np.float32(0.3)).astype(np.float32)
    d = np.arange(head_dim, dtype=np.float32)
    q_norm_w = (1 + np.cos(d * np.float32(0.05)) * np.float32(0.1)).astype(np.float32)
    k_norm_w = (1 + np.sin(d * np.float32(0.07)) * np.float32(0.1)).astype(np.float32)
    j = np.arange(max_seq_len * head_dim // 2, dtype=np.float32)
    cos = np.cos(j * np.float32(0.001)).astype(np.float32).reshape(max_seq_len, head_dim // 2)
    sin = np.sin(j * np.float32(0.001)).astype(np.float32).reshape(max_seq_len, head_dim // 2)
    return qkv.reshape(tokens, width), q_norm_w, k_norm_w, cos, sin


APPEND_CASES = {
    # name: (tokens, cache_len, qk_mode, block_table, physical blocks)
    "qk_norm": (5, 11, 1, [(i + 3) % 8 for i in range(4)], 8),
    "no_qk_norm": (7, 33, 2, [5, 1, 4, 0, 2, 3], 6),
    "spans_block_boundary": (5, 14, 1, [5, 2, 7, 1], 8),
    "interleaved": (5, 14, 3, [5, 2, 7, 1], 8),
    "copy": (5, 15, 0, [5, 2, 7, 1], 8),
}


@pytest.mark.parametrize("case", list(APPEND_CASES))
def test_paged_append_matches_contiguous(device, case):
    """The same fused write into a contiguous layer and a paged one (shuffled table): equal Q
    and equal K/V at every written position; both match kvcl's numpy reference."""
    tokens, cache_len, qk_mode, table, num_physical = APPEND_CASES[case]
    HQ, HKV, D, BS, CAP = 8, 2, 128, 16, 64
    qkv, qn, kn, cos, sin = _append_inputs(tokens, HQ, HKV, D, 128)

    contig = KvFp16.alloc_contig(CAP, HKV, D, device=device)
    KvFp16.set_len(contig, cache_len)
    q_contig = KvFp16.contig_write(contig, qkv, qn, kn, cos, sin, None, tokens, HQ, HKV, D,
                                   cache_len, 1e-6, qk_mode)
    assert KvFp16.len(contig) == cache_len   # the write does not advance len

    pool_k, pool_v = KvFp16.alloc_pool(num_physical, BS, HKV, D, device=device)
    layer = KvFp16.alloc_paged(len(table), BS, HKV, D, device=device)
    KvFp16.set_block_table(layer, table)
    q_out = np.full((tokens, HQ, D), np.nan, np.float32)
    q_paged = KvFp16.paged_write(layer, qkv, qn, kn, cos, sin, q_out, tokens, HQ, HKV, D,
                                 cache_len, 1e-6, qk_mode, pool_k, pool_v)
    assert q_paged is q_out
    np.testing.assert_allclose(q_paged, q_contig, rtol=0, atol=1e-6)

    positions = np.arange(cache_len, cache_len + tokens)
    ck, cv = contig.k.get(), contig.v.get()            # [HKV, CAP, D]
    pk, pv = pool_k.get(), pool_v.get()
    for contig_pool, paged_pool in ((ck, pk), (cv, pv)):
        want = contig_pool[:, positions].transpose(1, 0, 2)
        got = paged_pool[np.asarray(table)[positions // BS], :, positions % BS]
        np.testing.assert_array_equal(got, want)       # same fp16 bits
    # both against the numpy twin of the kernel
    norm, rope = {0: (False, "none"), 1: (True, "half"), 2: (False, "half"),
                  3: (False, "interleaved")}[qk_mode]
    slots = np.asarray(table)[positions // BS] * BS + positions % BS
    rq, rk, rv, _, _, status = ref_write.paged_write_qkv(
        qkv, slots.astype(np.int32), positions.astype(np.int32), np.zeros_like(pk),
        np.zeros_like(pv), np.zeros((tokens, HQ, D), np.float32), num_q_heads=HQ,
        num_kv_heads=HKV, head_dim=D, block_size=BS, kv_dtype="fp16", cos=cos, sin=sin,
        q_norm_weight=qn if norm else None, k_norm_weight=kn if norm else None, eps=1e-6,
        rope=rope)
    assert status[0] == 0
    np.testing.assert_allclose(q_paged, rq, rtol=1e-5, atol=1e-6)
    for ref_pool, paged_pool in ((rk, pk), (rv, pv)):   # one fp16 ulp at most
        np.testing.assert_allclose(fp16_decode(paged_pool), fp16_decode(ref_pool), rtol=2**-10,
                                   atol=2**-24)
    used = set(np.asarray(table)[positions // BS].tolist())
    unused = [b for b in range(num_physical) if b not in used]
    assert not pk[unused].any() and not pv[unused].any()   # no stray writes


def test_int8_codes_exact_and_normed_within_one_step(device):
    """qk_mode 0 stores exactly ferrum's int8 formula; qk_mode 1 stays within one quantisation
    step of the numpy reference (norm / RoPE may differ by an ulp before rounding)."""
    HQ, HKV, D, BS = 4, 2, 64, 8
    qkv, qn, kn, cos, sin = _append_inputs(6, HQ, HKV, D, 32)
    qkv = qkv * np.float32(7.0)
    for qk_mode in (0, 1):
        layer = KvInt8.alloc_paged(4, BS, HKV, D, device=device)
        KvInt8.set_block_table(layer, [2, 0, 3, 1])
        pos0 = 5
        q = KvInt8.paged_write(layer, qkv, qn, kn, cos, sin, None, 6, HQ, HKV, D, pos0, 1e-6,
                               qk_mode)
        positions = np.arange(pos0, pos0 + 6)
        slots = np.array([2, 0, 3, 1])[positions // BS] * BS + positions % BS
        norm, rope = (False, "none") if qk_mode == 0 else (True, "half")
        shape = (4, HKV, BS, D)
        rq, rk, rv, rks, rvs, _ = ref_write.paged_write_qkv(
            qkv, slots.astype(np.int32), positions.astype(np.int32), np.zeros(shape, np.int8),
            np.zeros(shape, np.int8), np.zeros((6, HQ, D), np.float32), num_q_heads=HQ,
            num_kv_heads=HKV, head_dim=D, block_size=BS, kv_dtype="int8", int8_mode=1,
            k_scales=np.zeros(shape[:3], np.uint16), v_scales=np.zeros(shape[:3], np.uint16),
            cos=cos, sin=sin, q_norm_weight=qn if norm else None,
            k_norm_weight=kn if norm else None, eps=1e-6, rope=rope)
        k, v, ks, vs = layer.k.get(), layer.v.get(), layer.k_scales.get(), layer.v_scales.get()
        if qk_mode == 0:
            np.testing.assert_array_equal(q, qkv[:, :HQ * D].reshape(6, HQ, D))
            for got, want in ((k, rk), (v, rv), (ks, rks), (vs, rvs)):
                np.testing.assert_array_equal(got, want)
            raw_k = qkv[:, HQ * D:(HQ + HKV) * D].reshape(6, HKV, D)
            codes, scales = quantize_int8_rows(raw_k, mode=1)
            blocks, offs = np.array([2, 0, 3, 1])[positions // BS], positions % BS
            np.testing.assert_array_equal(k[blocks, :, offs], codes)
            np.testing.assert_array_equal(ks[blocks, :, offs], scales)
        else:
            np.testing.assert_allclose(q, rq, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(v, rv)          # V is copied: exact
            np.testing.assert_array_equal(vs, rvs)
            step = fp16_decode(rks)[..., None]
            assert np.all(np.abs(decode_kv(k, ks, "int8") - decode_kv(rk, rks, "int8"))
                          <= step * 1.01 + 1e-7)


# ---- device arrays in and out ---------------------------------------------------------------

def test_device_arrays_in_and_out(device, queue, rng):
    HQ, HKV, D = 4, 2, 16
    pool_k, pool_v = KvFp16.alloc_pool(2, 4, HKV, D, device=device)
    layer = KvFp16.alloc_paged(2, 4, HKV, D, pool_k=pool_k, pool_v=pool_v, device=device)
    qkv = rng.standard_normal((6, (HQ + 2 * HKV) * D)).astype(np.float32)
    cos = rng.standard_normal((8, D // 2)).astype(np.float32)
    sin = rng.standard_normal((8, D // 2)).astype(np.float32)
    q_dev = cla.empty(queue, 6 * HQ * D, np.float32)          # flat device output
    got = KvFp16.paged_write(layer, cla.to_device(queue, qkv.reshape(-1)), None, None,
                             cla.to_device(queue, cos), cla.to_device(queue, sin), q_dev, 6, HQ,
                             HKV, D, 0, 1e-6, 2)
    assert got is q_dev
    q_np = KvFp16.paged_write(layer, qkv, None, None, cos, sin, None, 6, HQ, HKV, D, 0, 1e-6, 2)
    assert isinstance(q_np, np.ndarray) and q_np.shape == (6, HQ, D)
    np.testing.assert_array_equal(q_dev.get().reshape(6, HQ, D), q_np)
    new = KvFp16.paged_write(layer, cla.to_device(queue, qkv), None, None, cos, sin, None, 6, HQ,
                             HKV, D, 0, 1e-6, 2)
    assert isinstance(new, cla.Array) and new.shape == (6, HQ, D)

    out_np = np.zeros((2, HQ, D), np.float32)
    res = KvFp16.paged_decode_attention(layer, cla.to_device(queue, q_np[4:]), out_np, HQ, HKV,
                                        D, 6, 2)
    assert res is out_np and np.abs(out_np).sum() > 0
    res_dev = KvFp16.paged_decode_attention(layer, cla.to_device(queue, q_np[4:]), None, HQ, HKV,
                                            D, 6, 2)
    np.testing.assert_array_equal(res_dev.get(), out_np)


# ---- bad input: a kvcl error and nothing changed ---------------------------------------------

def _paged_setup(device, kind=KvFp16):
    HQ, HKV, D, BS = 4, 2, 16, 4
    if kind is KvInt8:
        layer = kind.alloc_paged(3, BS, HKV, D, device=device)
        pools = (layer.k, layer.v, layer.k_scales, layer.v_scales)
    else:
        pk, pv = kind.alloc_pool(4, BS, HKV, D, device=device)
        layer = kind.alloc_paged(3, BS, HKV, D, pool_k=pk, pool_v=pv, device=device)
        pools = (pk, pv)
    kind.set_block_table(layer, [2, 0, 1])
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((5, (HQ + 2 * HKV) * D)).astype(np.float32)
    kind.paged_write(layer, qkv, None, None, None, None, None, 5, HQ, HKV, D, 0, 1e-6, 0)
    kind.set_len(layer, 5)
    kind.paged_decode_attention(layer, np.ones((1, HQ, D), np.float32), None, HQ, HKV, D, 5, 1)
    return layer, pools, {"HQ": HQ, "HKV": HKV, "D": D, "rng": rng}


def _snapshot(layer, pools):
    return ([p.get().copy() for p in pools], layer.len, layer.block_table.get().copy(),
            layer.context_lens.get().copy(), list(layer.paged_block_indices))


def _unchanged(layer, pools, before):
    after = _snapshot(layer, pools)
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1] == after[1] and before[4] == after[4]
    np.testing.assert_array_equal(before[2], after[2])
    np.testing.assert_array_equal(before[3], after[3])


def _write_kwargs(c, **over):
    kw = {"qkv": c["rng"].standard_normal((2, (c["HQ"] + 2 * c["HKV"]) * c["D"])).astype(np.float32),
              "q_norm_w": None, "k_norm_w": None, "cos": None, "sin": None, "q_out": None, "tokens": 2,
              "num_q_heads": c["HQ"], "num_kv_heads": c["HKV"], "head_dim": c["D"], "pos_offset": 5, "eps": 1e-6,
              "qk_mode": 0}
    kw.update(over)
    return kw


BAD_WRITES = {
    "past capacity": ({"pos_offset": 11}, kvcl.CapacityError),
    "negative pos": ({"pos_offset": -1}, kvcl.OutOfRangeError),
    "qkv too short": ({"qkv": np.zeros((2, 10), np.float32)}, kvcl.ShapeError),
    "qkv int": ({"qkv": np.zeros((2, 128), np.int32)}, kvcl.DtypeError),
    "qkv float64": ({"qkv": np.zeros((2, 128))}, kvcl.DtypeError),
    "qkv nan": ({"qkv": np.full((2, 128), np.nan, np.float32)}, kvcl.NonFiniteError),
    "wrong kv heads": ({"num_kv_heads": 1}, kvcl.ShapeError),
    "wrong head_dim": ({"head_dim": 8}, kvcl.ShapeError),
    "gqa ratio": ({"num_q_heads": 3}, kvcl.InvalidArgument),
    "qk_mode 4": ({"qk_mode": 4}, kvcl.InvalidArgument),
    "qk_mode float": ({"qk_mode": 1.0}, kvcl.DtypeError),
    "norm without weights": ({"qk_mode": 1, "cos": np.ones((8, 8), np.float32),
                                  "sin": np.ones((8, 8), np.float32)}, kvcl.InvalidArgument),
    "rope without tables": ({"qk_mode": 2}, kvcl.InvalidArgument),
    "cos too short": ({"qk_mode": 2, "cos": np.ones((6, 8), np.float32),
                           "sin": np.ones((6, 8), np.float32)}, kvcl.ShapeError),
    "q_out wrong size": ({"q_out": np.zeros((2, 4, 8), np.float32)}, kvcl.ShapeError),
    "eps nan": ({"eps": float("nan")}, kvcl.NonFiniteError),
}


@pytest.mark.parametrize("kind", [KvFp16, KvInt8])
@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_bad_paged_write_changes_nothing(device, kind, case):
    layer, pools, c = _paged_setup(device, kind)
    before = _snapshot(layer, pools)
    over, error = BAD_WRITES[case]
    with pytest.raises(error):
        kind.paged_write(layer, **_write_kwargs(c, **over))
    _unchanged(layer, pools, before)


def test_block_table_past_the_pool_raises(device):
    """ferrum would follow the entry out of the pool; kvcl refuses before writing."""
    layer, pools, c = _paged_setup(device)
    table = layer.block_table.get()
    table[2] = 4                      # the shared pool has blocks 0..3
    layer.block_table.set(table)      # written behind the mirror's back, as Rust code may
    before = _snapshot(layer, pools)
    with pytest.raises(kvcl.OutOfRangeError, match="block_table\\[2\\]"):
        KvFp16.paged_write(layer, **_write_kwargs(c, pos_offset=7))   # positions 7, 8
    with pytest.raises(kvcl.OutOfRangeError):
        KvFp16.paged_decode_attention(layer, np.ones((1, 4, 16), np.float32), None, 4, 2, 16, 9, 1)
    _unchanged(layer, pools, before)
    KvFp16.paged_write(layer, **_write_kwargs(c, pos_offset=6))       # blocks 1 only: fine


def test_bad_layer_and_pools(device):
    layer, pools, c = _paged_setup(device)
    before = _snapshot(layer, pools)
    with pytest.raises(kvcl.DtypeError, match="KvFp16 layer"):
        KvInt8.paged_write(layer, **_write_kwargs(c))
    with pytest.raises(kvcl.DtypeError):
        KvFp16.paged_write("layer", **_write_kwargs(c))
    contig = KvFp16.alloc_contig(8, 2, 16, device=device)
    with pytest.raises(kvcl.InvalidArgument, match="contiguous"):
        KvFp16.paged_write(contig, **_write_kwargs(c))
    with pytest.raises(kvcl.InvalidArgument, match="paged"):
        KvFp16.contig_write(layer, **_write_kwargs(c))
    unbound = KvFp16.alloc_paged(3, 4, 2, 16, device=device)
    with pytest.raises(kvcl.InvalidArgument, match="pool_k"):
        KvFp16.paged_write(unbound, **_write_kwargs(c, pos_offset=0))
    wrong = KvFp8.alloc_pool(4, 4, 2, 16, device=device)
    with pytest.raises(kvcl.DtypeError):
        KvFp16.paged_write(layer, **_write_kwargs(c), pool_k=wrong[0], pool_v=wrong[1])
    small = KvFp16.alloc_pool(4, 8, 2, 16, device=device)   # block size 8, layer's is 4
    with pytest.raises(kvcl.ShapeError):
        KvFp16.paged_write(layer, **_write_kwargs(c), pool_k=small[0], pool_v=small[1])
    _unchanged(layer, pools, before)


def test_bad_decode_changes_nothing(device):
    for kind in (KvFp16, KvInt8):
        layer, pools, _c = _paged_setup(device, kind)
        before = _snapshot(layer, pools)
        q = np.ones((1, 4, 16), np.float32)
        bad = [
            ({"final_kv_len": 13}, kvcl.CapacityError),
            ({"final_kv_len": 0}, kvcl.OutOfRangeError),
            ({"tokens": 2}, kvcl.ShapeError),               # q holds one token
            ({"tokens": 0}, kvcl.OutOfRangeError),
            ({"num_kv_heads": 4}, kvcl.ShapeError),
            ({"q": np.full((1, 4, 16), np.inf, np.float32)}, kvcl.NonFiniteError),
            ({"output": np.zeros((1, 4, 15), np.float32)}, kvcl.ShapeError),
        ]
        for over, error in bad:
            kw = {"q": q, "output": None, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                      "final_kv_len": 5, "tokens": 1}
            kw.update(over)
            with pytest.raises(error):
                kind.paged_decode_attention(layer, **kw)
        _unchanged(layer, pools, before)


def test_bad_set_len_and_block_table(device):
    layer, pools, _c = _paged_setup(device)
    before = _snapshot(layer, pools)
    with pytest.raises(kvcl.OutOfRangeError):
        KvFp16.set_len(layer, 13)           # capacity 12 (ferrum does not check)
    with pytest.raises(kvcl.OutOfRangeError):
        KvFp16.set_len(layer, -1)
    with pytest.raises(kvcl.OutOfRangeError):
        KvFp16.set_block_table(layer, [0, 1, 2, 3])   # longer than max_blocks_per_seq
    with pytest.raises(kvcl.OutOfRangeError):
        KvFp16.set_block_table(layer, [0, -1])
    with pytest.raises(kvcl.DtypeError):
        KvFp16.set_block_table(layer, [0.5])
    _unchanged(layer, pools, before)
    q8, pools8, _ = _paged_setup(device, KvInt8)
    before8 = _snapshot(q8, pools8)
    with pytest.raises(kvcl.OutOfRangeError):
        KvInt8.set_block_table(q8, [0, 3])            # INT8 owns 3 blocks
    _unchanged(q8, pools8, before8)


def test_device_nonfinite_row_is_reported(device, queue):
    layer, _pools, c = _paged_setup(device)
    qkv = np.zeros((1, 128), np.float32)
    qkv[0, 64 + 3] = np.nan                   # a K value of kv head 0
    with pytest.raises(kvcl.NonFiniteError):
        KvFp16.paged_write(layer, **_write_kwargs(c, qkv=cla.to_device(queue, qkv), tokens=1))


def test_contig_decode_constraints(device, rng):
    HQ, HKV, D, CAP = 4, 2, 16, 4
    layer = KvFp16.alloc_contig(CAP, HKV, D, device=device)
    qkv = rng.standard_normal((CAP, (HQ + 2 * HKV) * D)).astype(np.float32)
    KvFp16.contig_write(layer, qkv, None, None, None, None, None, CAP, HQ, HKV, D, 0, 1e-6, 0)
    q = rng.standard_normal((2, HQ, D)).astype(np.float32)
    cfg = AttnConfig(HQ, HKV, D)
    with pytest.raises(kvcl.OutOfRangeError):
        KvFp16.contig_decode_attention(layer, q, None, cfg, 2, 0)   # len is still 0
    KvFp16.set_len(layer, CAP)
    with pytest.raises(kvcl.InvalidArgument, match="pos_offset"):
        KvFp16.contig_decode_attention(layer, q, None, cfg, 2, 0)
    with pytest.raises(kvcl.InvalidArgument, match="causal"):
        KvFp16.contig_decode_attention(layer, q, None, AttnConfig(HQ, HKV, D, causal=False), 2, 2)
    with pytest.raises(kvcl.DtypeError):
        KvFp16.contig_decode_attention(layer, q, None, (HQ, HKV, D), 2, 2)
    with pytest.raises(kvcl.ShapeError):
        KvFp16.contig_decode_attention(layer, q, None, AttnConfig(HQ, 1, D), 2, 2)
    before = layer.k.get().copy()
    with pytest.raises(kvcl.CapacityError):
        KvFp16.contig_write(layer, qkv[:1], None, None, None, None, None, 1, HQ, HKV, D, CAP,
                            1e-6, 0)
    np.testing.assert_array_equal(layer.k.get(), before)
    out = KvFp16.contig_decode_attention(layer, q, None, cfg, 2, 2)
    k = fp16_decode(layer.k.get()).transpose(1, 0, 2)
    v = fp16_decode(layer.v.get()).transpose(1, 0, 2)
    np.testing.assert_allclose(out, reference_attention(q, k, v, 1 / np.sqrt(D)), rtol=1e-4,
                               atol=1e-5)
    # FP8 (kvcl extension): contiguous == paged over the same E4M3 bytes
    f8 = KvFp8.alloc_contig(CAP, HKV, D, device=device)
    KvFp8.contig_write(f8, qkv, None, None, None, None, None, CAP, HQ, HKV, D, 0, 1e-6, 0)
    KvFp8.set_len(f8, CAP)
    out_contig = KvFp8.contig_decode_attention(f8, q, None, cfg, 2, 2)
    pk, pv = KvFp8.alloc_pool(2, CAP, HKV, D, device=device)
    paged = KvFp8.alloc_paged(1, CAP, HKV, D, pool_k=pk, pool_v=pv, device=device)
    KvFp8.set_block_table(paged, [1])
    KvFp8.paged_write(paged, qkv, None, None, None, None, None, CAP, HQ, HKV, D, 0, 1e-6, 0)
    np.testing.assert_array_equal(pk.get()[1], f8.k.get())
    out_paged = KvFp8.paged_decode_attention(paged, q, None, HQ, HKV, D, CAP, 2)
    np.testing.assert_allclose(out_paged, out_contig, rtol=0, atol=1e-5)
