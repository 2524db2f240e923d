"""kernels/blocks.cl against kvcl.reference.blocks: copy, gather/scatter, positional extract/inject."""

import numpy as np
import pyopencl.array as cla
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvcl
from kvcl.ops import blocks as ops
from kvcl.reference import blocks as ref

ELEMENT_TYPES = [np.uint8, np.int8, np.uint16, np.float32]
# (num_kv_heads, block_size, head_dim): 64/128-wide heads, tiny heads, and sizes whose block
# bytes are not a multiple of 4 for 1- and 2-byte elements (the byte-word path)
BLOCK_SHAPES = [(2, 16, 64), (1, 1, 128), (2, 16, 4), (3, 1, 4), (1, 1, 3), (3, 16, 1)]


def random_pool(rng, shape, dtype):
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)  # arbitrary bit patterns: NaN payloads must survive too


def same_bytes(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ELEMENT_TYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy_extract_inject_match_reference(device, rng, dtype, block_shape):
    q = device.queue
    num_blocks = 9
    pool = random_pool(rng, (num_blocks,) + block_shape, dtype)
    dev_pool = cla.to_device(q, pool)

    ops.copy_blocks(dev_pool, [1, 2, 2], [5, 6, 0]).wait()
    pool = ref.copy_blocks(pool, [1, 2, 2], [5, 6, 0])
    assert same_bytes(dev_pool.get(), pool)

    ids = np.array([7, 0, 7, 3], np.int32)  # repeats are fine for a gather
    out = cla.empty(q, (4,) + block_shape, dtype)
    ops.extract_blocks(dev_pool, cla.to_device(q, ids), out).wait()  # ids as a device array
    assert same_bytes(out.get(), ref.extract_blocks(pool, ids))

    new = random_pool(rng, (2,) + block_shape, dtype)
    ops.inject_blocks(cla.to_device(q, new), [8, 4], dev_pool).wait()
    pool = ref.inject_blocks(new, [8, 4], pool)
    assert same_bytes(dev_pool.get(), pool)


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.float32], ids=lambda d: np.dtype(d).name)
def test_extract_inject_round_trip_and_scale_pools(device, rng, dtype):
    """extract then inject elsewhere restores the same bytes; scales are a pool with head_dim 1."""
    q = device.queue
    for shape in [(6, 2, 16, 128), (6, 2, 16)]:  # K/V pool, then its scales
        pool = random_pool(rng, shape, dtype)
        dev_pool = cla.to_device(q, pool)
        saved = cla.empty(q, (2,) + shape[1:], dtype)
        ops.extract_blocks(dev_pool, [4, 1], saved).wait()
        ops.inject_blocks(saved, [0, 5], dev_pool).wait()
        got = dev_pool.get()
        assert same_bytes(got[[0, 5]], pool[[4, 1]]) and same_bytes(got[1:5], pool[1:5])


def test_views_inside_a_larger_buffer(device, rng):
    """Pools that are views (layer l of [L, num_blocks, ...]) start at a buffer offset."""
    q = device.queue
    layers = random_pool(rng, (3, 5, 2, 4, 3), np.uint16)  # 24-byte blocks; layer offset 240 bytes
    dev_layers = cla.to_device(q, layers)
    out_all = cla.zeros(q, (2, 2, 2, 4, 3), np.uint16)
    ops.copy_blocks(dev_layers[1], [0], [4]).wait()
    ops.extract_blocks(dev_layers[1], [4, 2], out_all[1]).wait()
    expected = layers.copy()
    expected[1] = ref.copy_blocks(layers[1], [0], [4])
    assert same_bytes(dev_layers.get(), expected)
    assert same_bytes(out_all.get()[1], ref.extract_blocks(expected[1], [4, 2])) and not out_all.get()[0].any()
    # odd byte offset: a uint8 view starting at byte 3 forces the byte path
    flat = random_pool(rng, (3 + 4 * 8,), np.uint8)
    dev_flat = cla.to_device(q, flat)
    view = dev_flat[3:].reshape(4, 8)
    ops.copy_blocks(view, [0], [3]).wait()
    want = flat.copy()
    want[3:] = ref.copy_blocks(flat[3:].reshape(4, 8), [0], [3]).reshape(-1)
    assert same_bytes(dev_flat.get(), want)


# ---- positional extract / inject (oxibonsai KvCache layout) ---------------------------------------

def oxibonsai_cache(num_layers=2, heads=2, head_dim=4, max_seq=16):
    keys = np.zeros((num_layers, heads, max_seq, head_dim), np.float32)
    values = np.zeros_like(keys)
    for layer in range(num_layers):
        for h in range(heads):
            for pos in range(max_seq):
                for d in range(head_dim):
                    keys[layer, h, pos, d] = (h + 1) * 100 + pos * 10 + d
                    values[layer, h, pos, d] = (h + 1) * 1000 + pos * 10 + d
    return keys, values


@pytest.mark.parametrize("start_pos", [0, 4])
def test_oxibonsai_extract_inject_round_trip(device, start_pos):
    """Port of kv_cache.rs: L=2, H=2, D=4, B=4, max 16, layer 1; then into a fresh cache."""
    q = device.queue
    L, H, D, B, S = 2, 2, 4, 4, 16
    keys, values = oxibonsai_cache(L, H, D, S)
    dev_keys, dev_values = cla.to_device(q, keys), cla.to_device(q, values)
    block_keys, block_values = cla.empty(q, (H, B, D), np.float32), cla.empty(q, (H, B, D), np.float32)
    ops.extract_positions(dev_keys[1], start_pos, B, block_keys).wait()
    ops.extract_positions(dev_values[1], start_pos, B, block_values).wait()
    got_keys = block_keys.get()
    for h in range(H):
        for p in range(B):
            for d in range(D):
                assert got_keys[h, p, d] == (h + 1) * 100 + (start_pos + p) * 10 + d
                assert block_values.get()[h, p, d] == (h + 1) * 1000 + (start_pos + p) * 10 + d

    fresh_keys = cla.zeros(q, (L, H, S, D), np.float32)
    fresh_values = cla.zeros(q, (L, H, S, D), np.float32)
    ops.inject_positions(block_keys, start_pos, fresh_keys[1]).wait()
    ops.inject_positions(block_values, start_pos, fresh_values[1]).wait()
    rows = slice(start_pos, start_pos + B)
    assert np.array_equal(fresh_keys.get()[1, :, rows], keys[1, :, rows])
    assert np.array_equal(fresh_values.get()[1, :, rows], values[1, :, rows])
    untouched = np.ones(S, bool)
    untouched[rows] = False
    assert not fresh_keys.get()[0].any() and not fresh_keys.get()[1][:, untouched].any()


@pytest.mark.parametrize("dtype", ELEMENT_TYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("head_dim", [64, 4, 3])
def test_positions_past_capacity(device, rng, dtype, head_dim):
    """Extract past the capacity reads zeros; inject past it is skipped."""
    q = device.queue
    heads, capacity = 3, 10
    cache = random_pool(rng, (heads, capacity, head_dim), dtype)
    dev_cache = cla.to_device(q, cache)
    for start, count in [(8, 4), (10, 2), (25, 3), (0, 10), (9, 1)]:
        out = cla.to_device(q, random_pool(rng, (heads, count, head_dim), dtype))  # garbage to overwrite
        ops.extract_positions(dev_cache, start, count, out).wait()
        assert same_bytes(out.get(), ref.extract_positions(cache, start, count)), (start, count)
    for start, count in [(8, 4), (12, 2), (3, 2)]:
        src = random_pool(rng, (heads, count, head_dim), dtype)
        ops.inject_positions(cla.to_device(q, src), start, dev_cache).wait()
        cache = ref.inject_positions(src, start, cache)
        assert same_bytes(dev_cache.get(), cache), (start, count)


@given(num_blocks=st.integers(1, 12), heads=st.integers(1, 3), block_size=st.sampled_from([1, 2, 16]),
       head_dim=st.sampled_from([1, 3, 4, 64]), dtype=st.sampled_from(ELEMENT_TYPES),
       seed=st.integers(0, 2**32 - 1))
def test_property_random_block_moves(device, num_blocks, heads, block_size, head_dim, dtype, seed):
    q = device.queue
    r = np.random.default_rng(seed)
    shape = (num_blocks, heads, block_size, head_dim)
    pool = random_pool(r, shape, dtype)
    dev_pool = cla.to_device(q, pool)
    order = r.permutation(num_blocks)
    n = int(r.integers(0, num_blocks // 2 + 1))
    src, dst = order[:n], order[n:2 * n]
    ops.copy_blocks(dev_pool, src, dst).wait()
    pool = ref.copy_blocks(pool, src, dst)
    assert same_bytes(dev_pool.get(), pool)
    ids = r.integers(0, num_blocks, size=int(r.integers(0, 5)))
    out = cla.empty(q, (len(ids),) + shape[1:], dtype)
    ops.extract_blocks(dev_pool, ids, out).wait()
    assert same_bytes(out.get(), ref.extract_blocks(pool, ids))


# ---- bad input: a clear error naming the argument, and the pool byte-identical ------------------

def test_bad_input_leaves_the_pool_byte_identical(device, rng):
    q = device.queue
    pool = random_pool(rng, (4, 2, 16, 8), np.float32)
    dev_pool = cla.to_device(q, pool)
    src = cla.to_device(q, random_pool(rng, (2, 2, 16, 8), np.float32))
    out = cla.empty(q, (2, 2, 16, 8), np.float32)

    with pytest.raises(kvcl.OutOfRangeError, match=r"dst_ids\[1\] \(block id\): expected < 4, got 4"):
        ops.copy_blocks(dev_pool, [0, 1], [2, 4])
    with pytest.raises(kvcl.OutOfRangeError, match=r"src_ids\[0\] \(block id\): expected >= 0, got -1"):
        ops.copy_blocks(dev_pool, cla.to_device(q, np.array([-1], np.int32)), [2])
    with pytest.raises(kvcl.InvalidArgument, match=r"dst_ids: block 3 appears more than once \(indices 0 and 1\)"):
        ops.copy_blocks(dev_pool, [0, 1], [3, 3])
    with pytest.raises(kvcl.InvalidArgument, match="dst_ids: block 1 is also in src_ids"):
        ops.copy_blocks(dev_pool, [0, 1], [1, 2])
    with pytest.raises(kvcl.ShapeError, match=r"dst_ids: expected shape \(2,\) like src_ids, got \(1,\)"):
        ops.copy_blocks(dev_pool, [0, 1], [2])
    with pytest.raises(kvcl.DtypeError, match="src_ids: expected dtype int32, got int64"):
        ops.copy_blocks(dev_pool, cla.to_device(q, np.array([0], np.int64)), [2])
    with pytest.raises(kvcl.DtypeError, match="dst_ids: expected integer block ids, got dtype float64"):
        ops.copy_blocks(dev_pool, [0], [2.0])
    with pytest.raises(kvcl.OutOfRangeError, match=r"block_ids\[1\] \(block id\): expected < 4, got 9"):
        ops.inject_blocks(src, [1, 9], dev_pool)
    with pytest.raises(kvcl.InvalidArgument, match="block_ids: block 2 appears more than once"):
        ops.inject_blocks(src, [2, 2], dev_pool)
    with pytest.raises(kvcl.ShapeError, match=r"src: expected shape \(3, 2, 16, 8\), got \(2, 2, 16, 8\)"):
        ops.inject_blocks(src, [0, 1, 2], dev_pool)
    with pytest.raises(kvcl.DtypeError, match="src: expected dtype float32, got uint32"):
        ops.inject_blocks(src.view(np.uint32), [0, 1], dev_pool)
    with pytest.raises(kvcl.OutOfRangeError, match=r"block_ids\[0\] \(block id\): expected < 4, got 4"):
        ops.extract_blocks(dev_pool, [4, 0], out)
    with pytest.raises(kvcl.DtypeError, match="pool: expected a pyopencl.array.Array, got ndarray"):
        ops.copy_blocks(pool, [0], [1])
    cache = dev_pool.reshape(4, 32, 8)
    with pytest.raises(kvcl.OutOfRangeError, match="start_pos: expected >= 0, got -1"):
        ops.inject_positions(cla.empty(q, (4, 2, 8), np.float32), -1, cache)
    with pytest.raises(kvcl.ShapeError, match=r"src: expected shape \(4, \*, 8\), got \(2, 2, 8\)"):
        ops.inject_positions(cla.empty(q, (2, 2, 8), np.float32), 0, cache)
    with pytest.raises(kvcl.ShapeError, match=r"out: expected shape \(4, 3, 8\), got \(4, 2, 8\)"):
        ops.extract_positions(cache, 0, 3, cla.empty(q, (4, 2, 8), np.float32))
    assert same_bytes(dev_pool.get(), pool)


def test_empty_lists_are_no_ops(device, rng):
    q = device.queue
    pool = random_pool(rng, (3, 1, 4, 4), np.uint8)
    dev_pool = cla.to_device(q, pool)
    ops.copy_blocks(dev_pool, [], []).wait()
    ops.extract_blocks(dev_pool, [], cla.empty(q, (0, 1, 4, 4), np.uint8)).wait()
    ops.inject_blocks(cla.empty(q, (0, 1, 4, 4), np.uint8), np.array([], np.int32), dev_pool).wait()
    ops.inject_positions(cla.empty(q, (3, 2, 4), np.uint8), 4, dev_pool.reshape(3, 4, 4)).wait()  # all past capacity
    assert same_bytes(dev_pool.get(), pool)
