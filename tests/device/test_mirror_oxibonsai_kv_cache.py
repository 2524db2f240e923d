"""kvcl.oxibonsai.KvCache / KvCachePolicy / PagedKvCache against the crate's own tests
(oxibonsai-model ``kv_cache.rs``, ``kv_cache_paged.rs``) and kvcl's block reference."""

import numpy as np
import pytest

import kvcl
from kvcl.oxibonsai import DEFAULT_PAGE_SIZE, CacheBlock, KvCache, KvCachePolicy, PagedKvCache
from kvcl.reference import blocks as ref


def pattern_cache(device, L=2, H=2, D=4, S=16, layer=1, start=0, count=4):
    """Rust's extract/inject test data: key (h+1)*100 + pos*10 + d, value (h+1)*1000 + pos*10 + d."""
    cache = KvCache(L, H, D, S, device=device)
    for h in range(H):
        for pos in range(start, start + count):
            d = np.arange(D, dtype=np.float32)
            cache.store_key(layer, h, pos, (h + 1) * 100 + pos * 10 + d)
            cache.store_value(layer, h, pos, (h + 1) * 1000 + pos * 10 + d)
    return cache


# ---- ported from kv_cache.rs ------------------------------------------------------------------

def test_store_and_retrieve(device):
    cache = KvCache(2, 8, 128, 16, device=device)
    cache.store_key(0, 0, 0, np.ones(128, np.float32))
    cache.store_value(0, 0, 0, np.full(128, 2.0, np.float32))
    cache.advance()
    keys, values = cache.keys_for(0, 0, 1), cache.values_for(0, 0, 1)
    assert keys.shape == (128,) and values.shape == (128,)
    assert keys.dtype == np.float32
    assert keys[0] == 1.0 and values[0] == 2.0


def test_multiple_positions(device):
    cache = KvCache(1, 1, 4, 8, device=device)
    cache.store_key(0, 0, 0, [1.0, 2.0, 3.0, 4.0])
    cache.advance()
    cache.store_key(0, 0, 1, [5.0, 6.0, 7.0, 8.0])
    cache.advance()
    keys = cache.keys_for(0, 0, 2)
    assert len(keys) == 8 and keys[0] == 1.0 and keys[4] == 5.0


def test_memory_size(device):
    # The crate builds KvCache(36, 8, 128, 4096) (1.2 GB); the formula is checked without it.
    assert KvCache.memory_bytes_for(36, 8, 128, 4096) == 36 * 8 * 4096 * 128 * 4 * 2
    small = KvCache(3, 2, 8, 5, device=device)
    assert small.memory_bytes() == 3 * 2 * 5 * 8 * 4 * 2 == KvCache.memory_bytes_for(3, 2, 8, 5)


def test_too_large_for_the_device_is_refused_before_allocating(device):
    per_layer = KvCache.memory_bytes_for(1, 8, 128, 4096)
    layers = device.info.global_mem_bytes // per_layer + 1
    with pytest.raises(kvcl.DeviceMemoryError, match="KvCache needs"):
        KvCache(layers, 8, 128, 4096, device=device)
    with pytest.raises(MemoryError, match=r"one buffer"):  # one layer's keys past the max allocation
        KvCache(1, 1, 1, device.info.max_alloc_bytes // 4 + 1, device=device)


def test_utilization(device):
    cache = KvCache(1, 1, 4, 10, device=device)
    assert cache.utilization_ratio() == 0.0
    for _ in range(3):
        cache.advance()
    assert abs(cache.utilization_ratio() - 0.3) < 1e-10
    assert KvCache(1, 1, 4, 0, device=device).utilization_ratio() == 0.0


def test_policy_default():
    assert KvCachePolicy.default() == KvCachePolicy.Standard
    assert KvCachePolicy.Fp16 != KvCachePolicy.Standard
    assert KvCachePolicy.SlidingWindow(512) == KvCachePolicy.SlidingWindow(512)
    assert KvCachePolicy.SlidingWindow(512) != KvCachePolicy.SlidingWindow(256)
    assert len({KvCachePolicy.SlidingWindow(8), KvCachePolicy.SlidingWindow(8), KvCachePolicy.Fp16}) == 2
    assert KvCachePolicy.SlidingWindow(8).kind == "SlidingWindow" and KvCachePolicy.Fp16.window is None
    with pytest.raises(kvcl.OutOfRangeError):
        KvCachePolicy.SlidingWindow(-1)


def test_set_seq_len_clamps_to_max(device):
    cache = KvCache(1, 1, 4, 8, device=device)
    cache.set_seq_len(4)
    assert cache.seq_len() == 4
    cache.set_seq_len(100)
    assert cache.seq_len() == 8


@pytest.mark.parametrize("start_pos", [0, 4])
def test_extract_inject_roundtrip(device, start_pos):
    L, H, D, B, S = 2, 2, 4, 4, 16
    cache = pattern_cache(device, L, H, D, S, layer=1, start=start_pos, count=B)
    k_block, v_block = cache.extract_block(1, start_pos, B)
    assert k_block.shape == v_block.shape == (H * B * D,)
    # [head][pos_in_block][dim]
    assert k_block[(1 * B + 2) * D + 3] == 2 * 100 + (start_pos + 2) * 10 + 3
    assert v_block[(0 * B + 1) * D + 0] == 1 * 1000 + (start_pos + 1) * 10

    fresh = KvCache(L, H, D, S, device=device)
    fresh.inject_block(1, start_pos, B, k_block, v_block)
    fresh.set_seq_len(start_pos + B)
    k2, v2 = fresh.extract_block(1, start_pos, B)
    np.testing.assert_array_equal(k2, k_block)
    np.testing.assert_array_equal(v2, v_block)
    for h in range(H):
        np.testing.assert_array_equal(fresh.keys_for(1, h, start_pos + B), cache.keys_for(1, h, start_pos + B))
        np.testing.assert_array_equal(fresh.values_for(1, h, start_pos + B), cache.values_for(1, h, start_pos + B))
    assert not fresh.keys_for(0, 0, S).any()  # layer 0 untouched


def test_extract_inject_at_offset(device):
    cache = KvCache(1, 1, 2, 16, device=device)
    for pos in range(4):
        cache.store_key(0, 0, 4 + pos, [pos, pos + 0.5])
        cache.store_value(0, 0, 4 + pos, [-pos, -pos - 0.5])
    k, v = cache.extract_block(0, 4, 4)
    other = KvCache(1, 1, 2, 16, device=device)
    other.inject_block(0, 4, 4, k, v)
    np.testing.assert_array_equal(other.keys_for(0, 0, 8), cache.keys_for(0, 0, 8))
    np.testing.assert_array_equal(other.values_for(0, 0, 8), cache.values_for(0, 0, 8))


# ---- against kvcl's numpy reference -----------------------------------------------------------

@pytest.mark.parametrize("start_pos,block_size", [(0, 1), (3, 5), (12, 8), (16, 4), (30, 2)])
def test_extract_and_inject_match_the_block_reference(device, rng, start_pos, block_size):
    L, H, D, S = 2, 3, 5, 16
    keys = rng.standard_normal((L, H, S, D)).astype(np.float32)
    values = rng.standard_normal((L, H, S, D)).astype(np.float32)
    cache = KvCache(L, H, D, S, device=device)
    for layer in range(L):
        for h in range(H):
            for pos in range(S):
                cache.store_key(layer, h, pos, keys[layer, h, pos])
                cache.store_value(layer, h, pos, values[layer, h, pos])
    k, v = cache.extract_block(1, start_pos, block_size)  # past max_seq_len reads as zeros
    np.testing.assert_array_equal(k, ref.extract_positions(keys[1], start_pos, block_size).reshape(-1))
    np.testing.assert_array_equal(v, ref.extract_positions(values[1], start_pos, block_size).reshape(-1))

    new_k = rng.standard_normal((H, block_size, D)).astype(np.float32)
    new_v = rng.standard_normal((H, block_size, D)).astype(np.float32)
    cache.inject_block(0, start_pos, block_size, new_k.reshape(-1), new_v)  # flat or [H, B, D]
    want_k = ref.inject_positions(new_k, start_pos, keys[0])
    want_v = ref.inject_positions(new_v, start_pos, values[0])
    for h in range(H):
        np.testing.assert_array_equal(cache.keys_for(0, h, S), want_k[h].reshape(-1))
        np.testing.assert_array_equal(cache.values_for(0, h, S), want_v[h].reshape(-1))


def test_inject_from_a_device_block_and_zero_sizes(device):
    H, D, B = 2, 4, 4
    block = CacheBlock(1, H, D, B, device=device)
    cache = KvCache(1, H, D, 8, device=device)
    cache.store_key(0, 1, 2, np.full(D, 9.0, np.float32))
    cache.inject_block(0, 0, B, block.keys_device[0], block.values_device[0])  # zeros, copied on device
    assert not cache.keys_for(0, 1, 8).any()
    k, v = cache.extract_block(0, 0, 0)
    assert k.shape == v.shape == (0,)
    cache.inject_block(0, 0, 0, [], [])
    empty = KvCache(0, 0, 0, 0, device=device)
    assert empty.memory_bytes() == 0 and empty.utilization_ratio() == 0.0


# ---- kvcl raises where the crate panics or corrupts, and changes nothing ------------------------

def test_bad_input_raises_and_leaves_the_cache_unchanged(device):
    cache = pattern_cache(device, 2, 2, 4, 8, layer=0)
    cache.set_seq_len(8)
    before = cache._snapshot()
    bad_calls = [
        (kvcl.OutOfRangeError, lambda: cache.store_key(2, 0, 0, np.ones(4))),      # layer
        (kvcl.OutOfRangeError, lambda: cache.store_key(0, 2, 0, np.ones(4))),      # head: Rust writes head 0 of layer 1
        (kvcl.OutOfRangeError, lambda: cache.store_value(0, 0, 8, np.ones(4))),    # pos: Rust writes the next head
        (kvcl.OutOfRangeError, lambda: cache.store_key(0, 0, -1, np.ones(4))),
        (kvcl.ShapeError, lambda: cache.store_key(0, 0, 0, np.ones(5))),
        (kvcl.ShapeError, lambda: cache.store_value(0, 0, 0, np.ones((2, 2)))),
        (kvcl.DtypeError, lambda: cache.store_key(0, 0, 0, ["a", "b", "c", "d"])),
        (kvcl.DtypeError, lambda: cache.store_key(0.0, 0, 0, np.ones(4))),
        (kvcl.OutOfRangeError, lambda: cache.keys_for(0, 0, 9)),                    # Rust reads the next head
        (kvcl.OutOfRangeError, lambda: cache.values_for(0, 2, 1)),
        (kvcl.CapacityError, cache.advance),                                        # Rust: utilization > 1
        (kvcl.OutOfRangeError, lambda: cache.extract_block(2, 0, 4)),
        (kvcl.OutOfRangeError, lambda: cache.set_seq_len(-1)),
        (kvcl.ShapeError, lambda: cache.inject_block(0, 0, 4, np.ones(32), np.ones(31))),  # values checked too
        (kvcl.ShapeError, lambda: cache.inject_block(0, 0, 4, np.ones(31), np.ones(32))),
        (kvcl.OutOfRangeError, lambda: cache.inject_block(5, 0, 4, np.ones(32), np.ones(32))),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
        assert cache._snapshot() == before
    with pytest.raises(IndexError):  # kvcl errors are the natural built-ins too
        cache.store_key(0, 0, 99, np.ones(4))


def test_capacity_error_names_the_limit(device):
    cache = KvCache(1, 1, 1, 2, device=device)
    cache.advance()
    cache.advance()
    with pytest.raises(ValueError, match=r"seq_len 2 == max_seq_len 2"):
        cache.advance()
    assert cache.seq_len() == 2 and cache.utilization_ratio() == 1.0
    cache.clear()
    assert cache.seq_len() == 0


def test_new_alias_and_default_device():
    cache = KvCache.new(1, 1, 2, 2)  # the process default device
    assert isinstance(cache.device, kvcl.Device) and cache.max_seq_len() == 2
    assert (cache.num_layers(), cache.num_kv_heads(), cache.head_dim()) == (1, 1, 2)


# ---- PagedKvCache (kv_cache_paged.rs) -----------------------------------------------------------

def test_paged_store_and_retrieve(device):
    cache = PagedKvCache.with_page_size(2, 1, 4, 16, 4, device=device)
    cache.store_key(0, 0, 0, [1.0, 2.0, 3.0, 4.0])
    cache.store_value(0, 0, 0, [5.0, 6.0, 7.0, 8.0])
    cache.advance()
    keys, values = cache.keys_for(0, 0, 1), cache.values_for(0, 0, 1)
    assert len(keys) == len(values) == 4
    assert keys[0] == 1.0 and values[0] == 5.0


def test_paged_cross_page_boundary(device):
    cache = PagedKvCache.with_page_size(1, 1, 4, 16, 2, device=device)
    cache.store_key(0, 0, 0, [1.0, 2.0, 3.0, 4.0])
    cache.store_key(0, 0, 1, [5.0, 6.0, 7.0, 8.0])
    cache.store_key(0, 0, 2, [9.0, 10.0, 11.0, 12.0])
    keys = cache.keys_for(0, 0, 3)
    assert len(keys) == 12 and (keys[0], keys[4], keys[8]) == (1.0, 5.0, 9.0)
    np.testing.assert_array_equal(cache.keys_for(0, 0, 6)[12:], np.zeros(12))  # unallocated: zeros


def test_paged_lazy_allocation(device):
    cache = PagedKvCache.with_page_size(1, 1, 4, 1024, 256, device=device)
    assert cache.total_pages() == 0 and cache.memory_usage_bytes() == 0
    assert PagedKvCache.new(1, 1, 4, 1024, device=device).page_size() == DEFAULT_PAGE_SIZE == 256


def test_paged_memory_grows(device):
    cache = PagedKvCache.with_page_size(1, 1, 4, 1024, 4, device=device)
    assert cache.memory_usage_bytes() == 0
    cache.store_key(0, 0, 0, [1.0] * 4)
    one_page_bytes = 4 * 4 * 4 * 2
    assert cache.memory_usage_bytes() == one_page_bytes
    cache.store_key(0, 0, 4, [1.0] * 4)
    assert cache.memory_usage_bytes() == one_page_bytes * 2
    cache.store_value(0, 0, 13, [1.0] * 4)  # allocates every page up to pos 13's (Rust's ensure_page)
    assert cache.total_pages() == 4


def test_paged_clear(device):
    cache = PagedKvCache.with_page_size(1, 1, 4, 16, 4, device=device)
    cache.store_key(0, 0, 0, [1.0] * 4)
    cache.advance()
    assert cache.total_pages() > 0
    cache.clear()
    assert cache.total_pages() == 0 and cache.seq_len() == 0
    assert not cache.keys_for(0, 0, 4).any()


def test_paged_utilization(device):
    cache = PagedKvCache.with_page_size(1, 1, 4, 16, 4, device=device)
    assert cache.utilization_ratio() == 0.0
    cache.store_key(0, 0, 0, [1.0] * 4)
    assert abs(cache.utilization_ratio() - 0.25) < 1e-10


def test_paged_matches_the_contiguous_cache(device, rng):
    L, H, D, S, P = 2, 2, 3, 11, 4
    paged = PagedKvCache.with_page_size(L, H, D, S, P, device=device)
    dense = KvCache(L, H, D, S, device=device)
    for _ in range(25):
        layer, h, pos = int(rng.integers(L)), int(rng.integers(H)), int(rng.integers(S))
        k, v = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
        paged.store_key(layer, h, pos, k), dense.store_key(layer, h, pos, k)
        paged.store_value(layer, h, pos, v), dense.store_value(layer, h, pos, v)
    for layer in range(L):
        for h in range(H):
            for n in (0, 1, P, P + 1, S):
                np.testing.assert_array_equal(paged.keys_for(layer, h, n), dense.keys_for(layer, h, n))
                np.testing.assert_array_equal(paged.values_for(layer, h, n), dense.values_for(layer, h, n))


def test_paged_bad_input_raises_and_allocates_nothing(device):
    cache = PagedKvCache.with_page_size(1, 2, 4, 10, 4, device=device)
    cache.store_key(0, 0, 1, [1.0] * 4)
    before = cache._snapshot()
    bad_calls = [
        (kvcl.OutOfRangeError, lambda: cache.store_key(0, 0, 10, [1.0] * 4)),  # Rust allocates past max
        (kvcl.OutOfRangeError, lambda: cache.store_key(1, 0, 0, [1.0] * 4)),
        (kvcl.OutOfRangeError, lambda: cache.store_value(0, 2, 0, [1.0] * 4)),
        (kvcl.ShapeError, lambda: cache.store_key(0, 1, 9, [1.0] * 3)),         # would allocate 3 pages first
        (kvcl.OutOfRangeError, lambda: cache.keys_for(0, 0, 11)),
        (kvcl.OutOfRangeError, lambda: cache.values_for(0, 5, 1)),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
        assert cache._snapshot() == before
    for _ in range(10):
        cache.advance()
    with pytest.raises(kvcl.CapacityError):
        cache.advance()
    with pytest.raises(kvcl.OutOfRangeError):
        PagedKvCache.with_page_size(1, 1, 4, 16, 0, device=device)  # Rust divides by zero later
