"""kvcl.forgellm.KVCache against forgellm-runtime's kv_cache tests and a numpy model of ``Vec<f32>``.

The source tests (forgellm_runtime/src/kv_cache.rs) are ported first, then growth, device
inputs and bad-input atomicity.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyopencl.array as cla
import pytest

import kvcl
from kvcl.forgellm import KVCache

# ---- ported source tests ------------------------------------------------------------------

def test_create_and_append(device):
    cache = KVCache.new(2, 4, 16, device=device)
    assert cache.is_empty()
    assert cache.len() == 0
    assert cache.entry_size() == 64

    kv_data = np.full(64, 1.0, np.float32)
    cache.append(0, kv_data, kv_data)
    cache.append(1, kv_data, kv_data)
    cache.advance()

    assert cache.len() == 1
    assert len(cache) == 1
    assert len(cache.k(0)) == 64
    assert len(cache.v(1)) == 64


def test_append_multiple_tokens(device):
    cache = KVCache.new(1, 2, 8, device=device)
    for token_idx in range(5):
        data = np.full(16, token_idx, np.float32)
        cache.append(0, data, data)
        cache.advance()
    assert cache.len() == 5
    assert len(cache.k(0)) == 80  # 5 tokens * 2 heads * 8 dim
    assert cache.k(0)[0] == 0.0
    assert cache.k(0)[64] == 4.0


def test_clear_cache(device):
    cache = KVCache.new(2, 4, 16, device=device)
    data = np.full(64, 1.0, np.float32)
    cache.append(0, data, data)
    cache.append(1, data, data)
    cache.advance()
    assert cache.len() == 1
    reserved = cache.capacity(0)

    cache.clear()
    assert cache.len() == 0
    assert cache.is_empty()
    assert len(cache.k(0)) == 0          # Rust clears the Vecs: the rows are gone
    assert len(cache.v(1)) == 0
    assert cache.k_device(0) is None
    assert cache.capacity(0) == reserved  # ... and keeps their capacity
    cache.append(0, np.full(64, 2.0, np.float32), data)  # reuses the buffer from the start
    np.testing.assert_array_equal(cache.k(0), np.full(64, 2.0, np.float32))


def test_with_capacity(device):
    cache = KVCache.with_capacity(16, 8, 64, 2048, device=device)
    assert cache.is_empty()
    assert cache.num_layers() == 16
    assert cache.entry_size() == 512
    assert all(cache.capacity(layer) == 2048 * 512 for layer in range(16))


def test_with_capacity_512_tokens(device):
    """512 tokens of value ``pos * 16 + j`` into every layer: no reallocation, first and last exact."""
    cache = KVCache.with_capacity(16, 8, 64, 2048, device=device)
    j = np.arange(512, dtype=np.float32)
    for pos in range(512):
        row = pos * 16 + j
        for layer in range(16):
            cache.append(layer, row, -row)
        cache.advance()
    assert cache.len() == 512
    for layer in (0, 15):
        k, v = cache.k(layer), cache.v(layer)
        assert k.shape == (512 * 512,)
        assert k[0] == 0.0 and v[0] == 0.0
        assert k[-1] == 511 * 16 + 511 and v[-1] == -(511 * 16 + 511)
        assert cache.capacity(layer) == 2048 * 512   # reserved up front, never regrown
    full = cache.k(7).reshape(512, 8, 64)
    np.testing.assert_array_equal(full[300].reshape(-1), 300 * 16 + j)


# ---- growth and layout --------------------------------------------------------------------

def test_growth_doubles_and_keeps_rows(device, rng):
    cache = KVCache.new(3, 2, 4, device=device)
    model = {layer: ([], []) for layer in range(3)}
    caps = []
    for step in range(37):
        for layer in range(3):
            if layer == 2 and step % 3:
                continue  # layers may hold different row counts
            k = rng.standard_normal((2, 4)).astype(np.float32)
            v = rng.standard_normal(8)  # float64: converted to float32
            cache.append(layer, k, v)
            model[layer][0].append(k.reshape(-1))
            model[layer][1].append(v.astype(np.float32))
        cache.advance()
        caps.append(cache.capacity(0))
    assert cache.len() == 37
    for layer in range(3):
        np.testing.assert_array_equal(cache.k(layer), np.concatenate(model[layer][0]))
        np.testing.assert_array_equal(cache.v(layer), np.concatenate(model[layer][1]))
    # Vec-like growth: 8, 16, 32, ... floats; each capacity at least double the previous one
    distinct = sorted(set(caps))
    assert distinct[0] == 8
    assert all(b == 2 * a for a, b in itertools.pairwise(distinct))
    assert cache.capacity(0) >= 37 * 8


def test_rows_may_exceed_len_and_advance_is_unchecked(device):
    cache = KVCache.new(1, 1, 4, device=device)
    one = np.ones(4, np.float32)
    cache.append(0, one, one)
    cache.append(0, one, one)   # two rows before any advance, as Rust allows
    assert cache.len() == 0 and len(cache.k(0)) == 8
    cache.advance()
    cache.advance()
    cache.advance()             # more advances than rows: not checked (Rust neither)
    assert cache.len() == 3


def test_device_inputs_and_views(device, queue, rng):
    cache = KVCache.new(1, 2, 8, device=device)
    big = rng.standard_normal(64).astype(np.float32)
    dev = cla.to_device(queue, big)
    cache.append(0, dev[:16], dev[16:32])          # offset 0 view
    cache.append(0, dev[32:48], dev[48:64])        # views with an offset in the buffer
    cache.append(0, dev[16:32].reshape(2, 8), dev[:16].reshape(2, 8))
    np.testing.assert_array_equal(cache.k(0), np.concatenate([big[:16], big[32:48], big[16:32]]))
    np.testing.assert_array_equal(cache.v(0), np.concatenate([big[16:32], big[48:64], big[:16]]))
    view = cache.k_device(0)
    assert isinstance(view, cla.Array) and view.shape == (48,) and view.dtype == np.float32
    np.testing.assert_array_equal(view.get(), cache.k(0))
    np.testing.assert_array_equal(cache.v_device(0).get(), cache.v(0))


def test_values_stored_verbatim(device):
    cache = KVCache.new(1, 1, 4, device=device)
    k = np.array([np.nan, np.inf, -0.0, 1e-45], np.float32)
    cache.append(0, k, [1.0, 2.0, 3.0, 4.0])
    got = cache.k(0)
    assert got.view(np.uint32).tolist() == k.view(np.uint32).tolist()
    np.testing.assert_array_equal(cache.v(0), [1, 2, 3, 4])


# ---- bad input: a kvcl error and no change ------------------------------------------------

def _state(cache):
    return (cache.len(), [cache.k(l).copy() for l in range(cache.num_layers())],
            [cache.v(l).copy() for l in range(cache.num_layers())],
            [cache.capacity(l) for l in range(cache.num_layers())])


def _same(a, b):
    assert a[0] == b[0] and a[3] == b[3]
    for x, y in zip(a[1] + a[2], b[1] + b[2]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("layer, k, v, error", [
    (2, np.ones(8), np.ones(8), kvcl.OutOfRangeError),
    (-1, np.ones(8), np.ones(8), kvcl.OutOfRangeError),
    (1.0, np.ones(8), np.ones(8), kvcl.DtypeError),
    (0, np.ones(7), np.ones(8), kvcl.ShapeError),
    (0, np.ones(8), np.ones(9), kvcl.ShapeError),          # K valid, V not: K not appended
    (0, np.ones(8, np.int32), np.ones(8), kvcl.DtypeError),
    (0, np.ones(8), np.ones(8, bool), kvcl.DtypeError),
    (0, np.ones(8), ["a"] * 8, kvcl.DtypeError),
    (0, np.ones(8), None, kvcl.DtypeError),
    (0, np.ones(8, np.complex64), np.ones(8), kvcl.DtypeError),
])
def test_bad_append_changes_nothing(device, layer, k, v, error):
    cache = KVCache.new(2, 2, 4, device=device)
    cache.append(0, np.arange(8.0), np.arange(8.0))
    cache.advance()
    before = _state(cache)
    with pytest.raises(error):
        cache.append(layer, k, v)
    assert isinstance(error("x"), kvcl.KvclError)
    _same(before, _state(cache))


def test_bad_device_inputs(device, queue):
    cache = KVCache.new(1, 2, 4, device=device)
    cache.append(0, np.zeros(8), np.zeros(8))
    before = _state(cache)
    with pytest.raises(kvcl.DtypeError):
        cache.append(0, cla.zeros(queue, 8, np.float64), np.zeros(8))
    with pytest.raises(kvcl.ShapeError):
        cache.append(0, np.zeros(8), cla.zeros(queue, 9, np.float32))
    with pytest.raises(kvcl.ShapeError):
        cache.append(0, cla.zeros(queue, 16, np.float32)[::2], np.zeros(8))
    other = kvcl.Device(device=device.device)  # same device, another OpenCL context
    with pytest.raises(kvcl.DeviceMismatchError):
        cache.append(0, np.zeros(8), cla.zeros(other.queue, 8, np.float32))
    _same(before, _state(cache))


@pytest.mark.parametrize("args", [(0, 2, 4), (1, 0, 4), (1, 2, 0), (1.5, 2, 4)])
def test_bad_construction(device, args):
    with pytest.raises(kvcl.KvclError):
        KVCache.new(*args, device=device)
    with pytest.raises(kvcl.OutOfRangeError):
        KVCache.with_capacity(1, 2, 4, -1, device=device)
    with pytest.raises(kvcl.OutOfRangeError):
        KVCache.new(1, 2, 4, device=device).k(1)
