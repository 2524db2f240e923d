"""Sanity of the numpy decode-attention reference (no OpenCL needed)."""

from __future__ import annotations

import numpy as np
import pytest

from kvcl.reference.decode_attention import (
    contiguous_attention,
    gather_sequence,
    paged_attention,
)
from kvcl.reference.quantize import decode_kv, encode_kv


def _paged(k_rows, v_rows, block_size, order=None):
    """Pools + page table holding one sequence per entry of k_rows/v_rows ([T, Hkv, D] each)."""
    hkv, d = k_rows[0].shape[1:]
    npages = [-(-len(k) // block_size) for k in k_rows]
    nb = sum(npages)
    order = np.arange(nb) if order is None else np.asarray(order)
    k_pool = np.zeros((nb, hkv, block_size, d), np.float32)
    v_pool = np.zeros_like(k_pool)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = order[:nb].astype(np.int32)
    for b, (k, v) in enumerate(zip(k_rows, v_rows)):
        for t in range(len(k)):
            blk = indices[indptr[b] + t // block_size]
            k_pool[blk, :, t % block_size] = k[t]
            v_pool[blk, :, t % block_size] = v[t]
    last = np.array([len(k) - (p - 1) * block_size for k, p in zip(k_rows, npages)], np.int32)
    return k_pool, v_pool, indptr, indices, last


def test_gather_sequence_undoes_shuffled_pages(rng):
    k = [rng.standard_normal((n, 2, 8)).astype(np.float32) for n in (5, 17, 1)]
    k_pool, _, indptr, indices, last = _paged(k, k, 4, order=rng.permutation(8))
    for b in range(3):
        got = gather_sequence(k_pool, None, indptr, indices, last, b, "fp32")
        np.testing.assert_array_equal(got, k[b])


def test_gather_sequence_dequantises_int8_both_scale_dtypes(rng):
    x = rng.standard_normal((3, 2, 4, 16)).astype(np.float32)
    for mode in (0, 1):
        data, scales = encode_kv(x, "int8", int8_mode=mode)
        indptr = np.array([0, 3], np.int32)
        got = gather_sequence(data, scales, indptr, np.arange(3, dtype=np.int32),
                              np.array([2], np.int32), 0, "int8", mode)
        want = decode_kv(data, scales, "int8").transpose(0, 2, 1, 3).reshape(12, 2, 16)[:10]
        np.testing.assert_array_equal(got, want)
        assert np.abs(got - x.transpose(0, 2, 1, 3).reshape(12, 2, 16)[:10]).max() < 0.05


def test_uniform_keys_give_mean_of_values(rng):
    t, hkv, d = 13, 2, 8
    k = np.ones((t, hkv, d), np.float32)
    v = rng.standard_normal((t, hkv, d)).astype(np.float32)
    pools = _paged([k], [v], 4)
    q = rng.standard_normal((1, 4, d)).astype(np.float32)
    out = paged_attention(q, *pools[:2], *pools[2:], np.array([0, 1], np.int32))
    for h in range(4):
        np.testing.assert_allclose(out[0, h], v[:, h // 2].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_prefill_row0_sees_only_position0(rng):
    t, d = 9, 8
    k = rng.standard_normal((t, 1, d)).astype(np.float32)
    v = rng.standard_normal((t, 1, d)).astype(np.float32)
    pools = _paged([k], [v], 4)
    q = rng.standard_normal((t, 2, d)).astype(np.float32)
    out = paged_attention(q, *pools, np.array([0, t], np.int32))
    np.testing.assert_allclose(out[0, 0], v[0, 0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], v[0, 0], rtol=1e-6)
    # the last row sees everything: same as a single decode query
    last = paged_attention(q[-1:], *pools, np.array([0, 1], np.int32))
    np.testing.assert_allclose(out[-1], last[0], rtol=1e-6)


def test_window_one_sees_only_itself(rng):
    t, d = 7, 4
    k = rng.standard_normal((t, 1, d)).astype(np.float32)
    v = rng.standard_normal((t, 1, d)).astype(np.float32)
    pools = _paged([k], [v], 3)
    q = rng.standard_normal((3, 1, d)).astype(np.float32)
    out = paged_attention(q, *pools, np.array([0, 3], np.int32), window=1)
    np.testing.assert_allclose(out[:, 0], v[t - 3:, 0], rtol=1e-6)


def test_gqa_head_mapping(rng):
    t, hkv, group, d = 5, 3, 2, 4
    k = rng.standard_normal((t, hkv, d)).astype(np.float32)
    v = np.broadcast_to(np.arange(hkv, dtype=np.float32)[None, :, None], (t, hkv, d)).copy()
    pools = _paged([k], [v], 2)
    q = rng.standard_normal((1, hkv * group, d)).astype(np.float32)
    out = paged_attention(q, *pools, np.array([0, 1], np.int32))
    np.testing.assert_allclose(out[0, :, 0], np.arange(hkv * group) // group, atol=1e-6)


def test_peaky_query_picks_its_key(rng):
    t, d = 20, 16
    k = rng.standard_normal((t, 1, d)).astype(np.float32)
    v = rng.standard_normal((t, 1, d)).astype(np.float32)
    pools = _paged([k], [v], 8)
    q = (50.0 * k[11, 0] / np.linalg.norm(k[11, 0]))[None, None].astype(np.float32)
    out = paged_attention(q, *pools, np.array([0, 1], np.int32), scale=1.0)
    np.testing.assert_allclose(out[0, 0], v[11, 0], atol=1e-3)


def test_contiguous_matches_paged(rng):
    b, hkv, cap, d = 2, 2, 12, 8
    kc = rng.standard_normal((b, hkv, cap, d)).astype(np.float32)
    vc = rng.standard_normal((b, hkv, cap, d)).astype(np.float32)
    lens = np.array([5, 12], np.int32)
    q_indptr = np.array([0, 1, 3], np.int32)
    q = rng.standard_normal((3, 4, d)).astype(np.float32)
    got = contiguous_attention(q, kc, vc, lens, q_indptr, window=4)
    want = paged_attention(q, kc, vc, np.array([0, 1, 2], np.int32), np.array([0, 1], np.int32),
                           lens, q_indptr, window=4)
    np.testing.assert_array_equal(got, want)
    out = np.empty_like(q)
    assert contiguous_attention(q, kc, vc, lens, q_indptr, out) is out


@pytest.fixture
def rng():
    return np.random.default_rng(7)
