"""kvcl.oxibonsai.prefix_cache against the crate's own tests (oxibonsai-model ``prefix_cache.rs``)
and the wiring its engine uses with ``KvCache``."""

import numpy as np
import pytest

import kvcl
from kvcl.oxibonsai import (CacheBlock, CacheSession, KvCache, PrefixAwarePrefill, PrefixCache,
                            PrefixCacheStats)
from kvcl.oxibonsai.prefix_cache import block_edge_key


def make_kv(num_layers, num_kv_heads, head_dim, block_size, val):
    """The crate's helper: keys filled with ``val``, values with ``val + 1``."""
    per_layer = num_kv_heads * head_dim * block_size
    return (np.full((num_layers, per_layer), val, np.float32),
            np.full((num_layers, per_layer), val + 1.0, np.float32))


# ---- ported from prefix_cache.rs --------------------------------------------------------------

def test_cache_block_memory_bytes(device):
    block = CacheBlock(2, 4, 8, 4, device=device)
    assert block.memory_bytes() == 2 * 2 * (4 * 8 * 4) * 4 == 2048
    assert block.keys.shape == (2, 128) and not block.keys.any() and not block.values.any()
    assert CacheBlock.new(0, 4, 8, 4, device=device).memory_bytes() == 0


def test_insert_and_lookup_hit(device):
    cache = PrefixCache(8, 4, 2, 2, 8, device=device)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    keys, values = make_kv(2, 2, 8, 4, 1.0)
    cache.insert(tokens, 0, keys, values)
    matched, blocks = cache.lookup(tokens)
    assert matched == 4 and len(blocks) == 1 and cache.hits == 1
    np.testing.assert_array_equal(blocks[0].keys, keys)  # the data came back from the device
    np.testing.assert_array_equal(blocks[0].values, values)
    assert blocks[0].token_ids == (1, 2, 3, 4) and blocks[0].ref_count == 1


def test_lookup_miss(device):
    cache = PrefixCache(8, 4, 2, 2, 8, device=device)
    matched, blocks = cache.lookup([10, 20, 30, 40])
    assert matched == 0 and blocks == [] and cache.misses == 1


def test_partial_prefix_match(device):
    cache = PrefixCache(8, 4, 2, 2, 8, device=device)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], 0, *make_kv(2, 2, 8, 4, 0.5))
    matched, blocks = cache.lookup([1, 2, 3, 4, 9, 10, 11, 12])
    assert matched == 4 and len(blocks) == 1


def test_lru_eviction(device):
    cache = PrefixCache(2, 4, 1, 1, 4, device=device)
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    cache.insert(a, 0, *make_kv(1, 1, 4, 4, 1.0))
    cache.insert(b, 0, *make_kv(1, 1, 4, 4, 2.0))
    cache.lookup(b)            # b is now more recent than a (and pinned)
    idx_c = cache.insert(c, 0, *make_kv(1, 1, 4, 4, 3.0))
    assert cache.len() == 2 and len(cache) == 2 and cache.evictions == 1
    assert cache.lookup(a)[0] == 0
    assert idx_c == 0                                             # a's slot was reused ...
    assert (cache.get_block(0).keys == 3.0).all()                 # ... with c's data
    assert cache.get_block(0).token_ids == (9, 10, 11, 12)


def test_ref_count_prevents_eviction(device):
    cache = PrefixCache(1, 4, 1, 1, 4, device=device)
    idx_a = cache.insert([1, 2, 3, 4], 0, *make_kv(1, 1, 4, 4, 1.0))
    cache.get_block(idx_a).ref_count += 1   # pin, as the crate's test does
    before = cache._snapshot()
    # Rust inserts b past max_blocks; kvcl refuses and changes nothing.
    with pytest.raises(kvcl.CapacityError, match="every block is pinned"):
        cache.insert([5, 6, 7, 8], 0, *make_kv(1, 1, 4, 4, 2.0))
    assert cache.evictions == 0 and cache._snapshot() == before
    cache.release(idx_a)
    assert cache.get_block(idx_a).ref_count == 0
    cache.release(idx_a)                    # saturating
    cache.release(99)                       # ignored, as in Rust
    assert cache.get_block(idx_a).ref_count == 0 and cache.get_block(99) is None
    cache.insert([5, 6, 7, 8], 0, *make_kv(1, 1, 4, 4, 2.0))
    assert cache.evictions == 1 and cache.len() == 1


def test_hit_rate(device):
    cache = PrefixCache(8, 4, 1, 1, 4, device=device)
    assert cache.hit_rate() == 0.0
    cache.insert([1, 2, 3, 4], 0, *make_kv(1, 1, 4, 4, 1.0))
    cache.lookup([1, 2, 3, 4])
    cache.lookup([99, 100, 101, 102])
    assert abs(cache.hit_rate() - 0.5) < 1e-5


def test_clear(device):
    cache = PrefixCache(8, 4, 1, 1, 4, device=device)
    cache.insert([1, 2, 3, 4], 0, *make_kv(1, 1, 4, 4, 1.0))
    assert not cache.is_empty()
    cache.lookup([1, 2, 3, 4])
    cache.clear()
    assert cache.is_empty() and cache.len() == 0 and cache.memory_bytes() == 0
    assert cache.hits == 1                      # statistics survive clear()
    assert cache.lookup([1, 2, 3, 4])[0] == 0


def test_cache_session_cached_tokens():
    session = CacheSession.new(8, [0, 1])
    assert session.cached_tokens(4) == 8 and not session.is_empty()
    empty = CacheSession(0, [])
    assert empty.is_empty() and empty.cached_tokens(4) == 0


def test_prefix_aware_prefill_prepare(device):
    prefill = PrefixAwarePrefill.new(PrefixCache(8, 4, 1, 1, 4, device=device))
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    prefill.cache.insert(tokens, 0, *make_kv(1, 1, 4, 4, 1.0))
    session, uncached_start = prefill.prepare(tokens)
    assert session.matched_prefix_len == 4 and uncached_start == 4
    assert session.block_indices == [0] and prefill.cache.get_block(0).ref_count == 1
    prefill.release_session(session)
    assert prefill.cache.get_block(0).ref_count == 0


def test_prefix_cache_stats(device):
    prefill = PrefixAwarePrefill(PrefixCache(8, 4, 1, 1, 4, device=device))
    prefill.cache.insert([1, 2, 3, 4], 0, *make_kv(1, 1, 4, 4, 1.0))
    prefill.prepare([1, 2, 3, 4])
    stats = prefill.stats()
    assert stats == PrefixCacheStats(hit_rate=1.0, cached_blocks=1, capacity_blocks=8, memory_bytes=128,
                                     total_hits=1, total_misses=0, total_evictions=0)


def test_capacity_enforcement(device):
    capacity = 4
    cache = PrefixCache(capacity, 4, 1, 1, 4, device=device)
    for i in range(capacity + 2):
        cache.insert([i * 4 + j for j in range(4)], 0, *make_kv(1, 1, 4, 4, float(i)))
    assert cache.len() <= capacity and cache.evictions >= 2
    assert cache.capacity() == capacity and cache.block_size() == 4


# ---- kvcl specifics ---------------------------------------------------------------------------

def test_edge_key_is_fnv1a_folded():
    # FNV-1a 64 of the empty input is the offset basis; of the single value 0x61 ('a') it is
    # the published test vector 0xaf63dc4c8601ec8c.
    assert block_edge_key([]) == 0xCBF29CE4 ^ 0x84222325
    assert block_edge_key([0x61]) == 0xAF63DC4C ^ 0x8601EC8C


def test_multi_block_trie_and_deeper_prefixes(device):
    cache = PrefixCache(8, 2, 1, 1, 1, device=device)
    tokens = [7, 8, 9, 10, 11, 12]
    kv = [make_kv(1, 1, 1, 2, float(i)) for i in range(3)]
    for i in range(3):
        assert cache.insert(tokens, 2 * i, *kv[i]) == i
    matched, blocks = cache.lookup(tokens + [13])
    assert matched == 6 and [float(b.keys[0, 0]) for b in blocks] == [0.0, 1.0, 2.0]
    assert cache.misses == 0   # the partial 4th block is not looked up
    # The same second block under another first block is another trie path.
    assert cache.lookup([1, 2, 9, 10])[0] == 0
    # A block inserted without its parent block creates the path but the lookup stops at it.
    cache2 = PrefixCache(8, 2, 1, 1, 1, device=device)
    cache2.insert(tokens, 2, *kv[1])
    assert cache2.lookup(tokens)[0] == 0 and cache2.misses == 1


def test_engine_wiring_with_kv_cache(device, rng):
    """Extract full blocks from one KvCache, store them, and restore them into a fresh one."""
    L, H, D, B, S = 2, 2, 4, 4, 16
    tokens = list(range(100, 110))                    # 2 full blocks + 2 tokens
    source = KvCache(L, H, D, S, device=device)
    for layer in range(L):
        for h in range(H):
            for pos in range(len(tokens)):
                source.store_key(layer, h, pos, rng.standard_normal(D).astype(np.float32))
                source.store_value(layer, h, pos, rng.standard_normal(D).astype(np.float32))
    prefill = PrefixAwarePrefill(PrefixCache(8, B, L, H, D, device=device))
    session, start = prefill.prepare(tokens)
    assert start == 0 and session.is_empty()
    new_blocks = []
    for blk in range(3):                               # the third block is partial: not stored
        pairs = [source.extract_block(layer, blk * B, B) for layer in range(L)]
        new_blocks.append((np.stack([k for k, _ in pairs]), np.stack([v for _, v in pairs])))
    prefill.store_blocks(tokens, start, new_blocks)
    assert prefill.cache.len() == 2

    session, start = prefill.prepare(tokens)
    assert start == 8 and session.cached_tokens(B) == 8
    restored = KvCache(L, H, D, S, device=device)
    for i, idx in enumerate(session.block_indices):
        block = prefill.cache.get_block(idx)
        for layer in range(L):
            restored.inject_block(layer, i * B, B, block.keys_device[layer], block.values_device[layer])
    restored.set_seq_len(start)
    for layer in range(L):
        for h in range(H):
            np.testing.assert_array_equal(restored.keys_for(layer, h, start), source.keys_for(layer, h, start))
            np.testing.assert_array_equal(restored.values_for(layer, h, start), source.values_for(layer, h, start))
    prefill.release_session(session)
    assert all(prefill.cache.get_block(i).ref_count == 0 for i in session.block_indices)


def test_device_array_input_is_copied(device):
    import pyopencl.array as cla
    cache = PrefixCache(2, 2, 1, 1, 2, device=device)
    keys = cla.to_device(device.queue, np.arange(4, dtype=np.float32).reshape(1, 4))
    idx = cache.insert([1, 2], 0, keys, keys)
    keys.fill(np.float32(-1))                                      # the caller's array changes ...
    np.testing.assert_array_equal(cache.get_block(idx).keys, [[0, 1, 2, 3]])  # ... the block does not


def test_bad_input_raises_and_changes_nothing(device):
    cache = PrefixCache(2, 4, 1, 1, 4, device=device)
    good = make_kv(1, 1, 4, 4, 1.0)
    cache.insert([1, 2, 3, 4], 0, *good)
    cache.lookup([1, 2, 3, 4])
    prefill = PrefixAwarePrefill(cache)
    before = cache._snapshot()
    bad_calls = [
        (kvcl.ShapeError, lambda: cache.insert([5, 6, 7, 8], 0, np.ones((1, 15)), good[1])),
        (kvcl.ShapeError, lambda: cache.insert([5, 6, 7, 8], 0, good[0], np.ones((2, 16)))),
        (kvcl.OutOfRangeError, lambda: cache.insert([5, 6, 7, 8], 5, *good)),      # Rust: slice panic
        (kvcl.OutOfRangeError, lambda: cache.insert([5, -6, 7, 8], 0, *good)),     # not a u32
        (kvcl.OutOfRangeError, lambda: cache.lookup([2**32, 1, 2, 3])),
        (kvcl.DtypeError, lambda: cache.lookup([1.5, 2, 3, 4])),
        (kvcl.DtypeError, lambda: cache.lookup("abcd")),
        # the second block is bad: the first must not be inserted either
        (kvcl.ShapeError, lambda: prefill.store_blocks(list(range(20, 28)), 0, [good, (good[0], np.ones(3))])),
        (kvcl.DtypeError, lambda: prefill.store_blocks(list(range(20, 28)), 0, [good, good[0]])),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
        assert cache._snapshot() == before
    with pytest.raises(kvcl.CapacityError):
        PrefixCache(0, 4, 1, 1, 4, device=device).insert([1, 2, 3, 4], 0, *good)
    with pytest.raises(kvcl.OutOfRangeError):
        PrefixCache(2, 0, 1, 1, 4, device=device)   # Rust divides by zero on lookup


def test_store_blocks_when_pinned_and_full_changes_nothing(device):
    prefill = PrefixAwarePrefill(PrefixCache(1, 2, 1, 1, 1, device=device))
    kv = make_kv(1, 1, 1, 2, 1.0)
    prefill.store_blocks([1, 2], 0, [kv])
    session, _ = prefill.prepare([1, 2])            # pins the only block
    before = prefill.cache._snapshot()
    with pytest.raises(kvcl.CapacityError):
        prefill.store_blocks([3, 4, 5, 6], 0, [kv, kv])
    assert prefill.cache._snapshot() == before
    prefill.release_session(session)
    prefill.store_blocks([3, 4, 5, 6], 0, [kv, kv])   # each insert evicts the previous block
    assert prefill.cache.len() == 1 and prefill.cache.evictions == 2
