"""One allocation path: every size-checked device buffer goes through ``kvcl.Device.alloc`` /
``check_alloc``, which read the device's limits one way (``Device.info``) and refuse with one
message. The limits are monkeypatched small, so nothing near them is ever allocated.

Each refusal must: be a :class:`kvcl.DeviceMemoryError` with the one message (what, the bytes
requested, the limit and which limit it is), come before any buffer of that call is allocated,
and leave the object it was called on as it was.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import kvcl
from kvcl import bitpolar, ferrum, forgellm, oxibonsai
from kvcl.engine import PagedKVCache
from kvcl.runtime import Device

MESSAGE = re.compile(r"^(?P<what>.+) needs (?P<requested>[\d,]+) bytes but the device has "
                     r"(?P<available>[\d,]+) bytes (?P<limit>at most in one buffer \(max_mem_alloc_size\)"
                     r"|of global memory \(global_mem_size\))$")


@pytest.fixture
def limits(device, monkeypatch):
    """``set(max_alloc=..., global_mem=...)`` shrinks ``device``'s limits for this test;
    ``made`` lists the ``what`` of every buffer ``Device.alloc`` returned since the last set."""
    made: list = []
    real_alloc = Device.alloc

    def counting_alloc(self, shape, dtype, *, what, zero=False):
        arr = real_alloc(self, shape, dtype, what=what, zero=zero)
        made.append(what)
        return arr

    monkeypatch.setattr(Device, "alloc", counting_alloc)
    info = device.info

    class Limits:
        def set(self, *, max_alloc=None, global_mem=None):
            monkeypatch.setattr(device, "info", dataclasses.replace(
                info, max_alloc_bytes=info.max_alloc_bytes if max_alloc is None else max_alloc,
                global_mem_bytes=info.global_mem_bytes if global_mem is None else global_mem))
            made.clear()

        made_since_set = made

    return Limits()


def refused(call, *, limit: int, one_buffer: bool, what: str) -> kvcl.DeviceMemoryError:
    with pytest.raises(kvcl.DeviceMemoryError) as info:
        call()
    err = info.value
    m = MESSAGE.match(str(err))
    assert m, str(err)
    assert what in m["what"], str(err)
    assert int(m["available"].replace(",", "")) == err.available == limit
    assert int(m["requested"].replace(",", "")) == err.requested > limit
    assert (err.limit == kvcl.DeviceMemoryError.ONE_BUFFER) == one_buffer, str(err)
    assert isinstance(err, MemoryError)
    return err


def test_engine(device, limits):
    pool = 6 * 2 * 4 * 8 * 4                                    # one layer's fp32 K pool
    limits.set(max_alloc=pool - 1)
    refused(lambda: PagedKVCache(2, 2, 8, num_blocks=6, block_size=4, device=device),
            limit=pool - 1, one_buffer=True, what="one layer's K pool (6 blocks)")
    assert limits.made_since_set == []
    limits.set(global_mem=4 * pool - 1)                         # 2 layers x K, V
    refused(lambda: PagedKVCache(2, 2, 8, num_blocks=6, block_size=4, device=device),
            limit=4 * pool - 1, one_buffer=False, what="the KV pools (2 layers x K,V)")
    assert limits.made_since_set == []
    limits.set(global_mem=4 * pool)                             # exactly fits
    PagedKVCache(2, 2, 8, num_blocks=6, block_size=4, device=device)
    assert len(limits.made_since_set) == 4


def test_ferrum(device, limits):
    pool = 3 * 2 * 4 * 8                                         # int8 [blocks, heads, bs, d]
    limits.set(max_alloc=pool - 1)
    refused(lambda: ferrum.KvInt8.alloc_paged(3, 4, 2, 8, device=device),
            limit=pool - 1, one_buffer=True, what="the INT8 K pool")
    refused(lambda: ferrum.KvFp16.alloc_pool(3, 4, 2, 8, device=device),
            limit=pool - 1, one_buffer=True, what="the shared K pool")
    refused(lambda: ferrum.KvFp8.alloc_contig(12, 2, 8, device=device),
            limit=pool - 1, one_buffer=True, what="the contiguous K cache")
    assert limits.made_since_set == []


def test_oxibonsai(device, limits):
    layer = 2 * 5 * 8 * 4                                        # [heads, max_seq_len, d] float32
    limits.set(max_alloc=layer - 1)
    refused(lambda: oxibonsai.KvCache(3, 2, 8, 5, device=device),
            limit=layer - 1, one_buffer=True, what="KvCache")
    limits.set(global_mem=3 * 2 * layer - 1)
    refused(lambda: oxibonsai.KvCache(3, 2, 8, 5, device=device),
            limit=3 * 2 * layer - 1, one_buffer=False, what="KvCache")
    assert limits.made_since_set == []

    limits.set()
    paged = oxibonsai.PagedKvCache.with_page_size(1, 1, 4, 64, 4, device=device)
    paged.store_key(0, 0, 1, [1.0, 2.0, 3.0, 4.0])               # page 0
    before = (paged.total_pages(), paged.memory_usage_bytes(), paged.keys_for(0, 0, 4).tobytes())
    pages = 2 * 2 * 4 * 4 * 4                                    # pages 1 and 2, K and V, of 4 x 4 floats
    limits.set(global_mem=pages - 1)
    refused(lambda: paged.store_key(0, 0, 9, [5.0, 6.0, 7.0, 8.0]),
            limit=pages - 1, one_buffer=False, what="PagedKvCache pages")
    assert limits.made_since_set == []
    assert (paged.total_pages(), paged.memory_usage_bytes(), paged.keys_for(0, 0, 4).tobytes()) == before


def test_bitpolar(device, limits):
    config = bitpolar.KvCacheConfig(head_dim=8, bits=4, projections=16, seed=3)
    limits.set(max_alloc=8 * 8 * 4 - 1)                          # one head's rotation [d, d]
    refused(lambda: bitpolar.KvCacheCompressor(config, device=device),
            limit=8 * 8 * 4 - 1, one_buffer=True, what="rotation matrices")
    assert limits.made_since_set == []

    limits.set()
    cache = bitpolar.MultiHeadKvCache(2, config, device=device)
    rng = np.random.default_rng(0)
    for _ in range(16):                                          # the first 16 tokens' buffers
        cache.push_token(rng.standard_normal((2, 8)), rng.standard_normal((2, 8)))
    before = (cache.len(), cache.attention_scores(np.ones((2, 8))).tobytes())
    radii = 32 * 2 * 2 * 4 * 4                                   # doubled: [32 tokens, K|V, heads, d/2]
    limits.set(max_alloc=radii - 1)
    refused(lambda: cache.push_token(np.ones((2, 8)), np.ones((2, 8))),
            limit=radii - 1, one_buffer=True, what="radii (32 tokens)")
    assert limits.made_since_set == []                           # not even the angle codes
    limits.set()
    assert (cache.len(), cache.attention_scores(np.ones((2, 8))).tobytes()) == before


def test_forgellm(device, limits):
    buffer = 10 * 2 * 4 * 4                                      # max_seq_len x heads x d floats
    limits.set(max_alloc=buffer - 1)
    refused(lambda: forgellm.KVCache.with_capacity(3, 2, 4, 10, device=device),
            limit=buffer - 1, one_buffer=True, what="max_seq_len=10")
    limits.set(global_mem=3 * 2 * buffer - 1)
    refused(lambda: forgellm.KVCache.with_capacity(3, 2, 4, 10, device=device),
            limit=3 * 2 * buffer - 1, one_buffer=False, what="max_seq_len=10")
    assert limits.made_since_set == []

    limits.set()
    cache = forgellm.KVCache.new(2, 2, 4, device=device)
    row = np.arange(8, dtype=np.float32)
    for _ in range(2):
        cache.append(0, row, row)                                # capacity 16 floats, full
    before = (cache.capacity(0), cache.k(0).tobytes(), cache.v(0).tobytes())
    limits.set(max_alloc=32 * 4 - 1)                             # doubling to 32 floats does not fit
    refused(lambda: cache.append(0, row + 1, row + 1), limit=32 * 4 - 1, one_buffer=True,
            what="layer 0's K and V grown to 32 floats")
    assert limits.made_since_set == []
    assert (cache.capacity(0), cache.k(0).tobytes(), cache.v(0).tobytes()) == before


def test_check_alloc_and_alloc(device, limits):
    limits.set(max_alloc=100, global_mem=1000)
    device.check_alloc("x", 100, total=1000)                     # at the limits: fine
    refused(lambda: device.check_alloc("the argument x", 101), limit=100, one_buffer=True,
            what="the argument x")
    refused(lambda: device.check_alloc("x", 100, total=1001), limit=1000, one_buffer=False, what="x")
    refused(lambda: device.alloc((26,), np.float32, what="x"), limit=100, one_buffer=True, what="x")
    arr = device.alloc((5, 5), np.float32, what="x", zero=True)
    assert arr.shape == (5, 5) and arr.dtype == np.float32 and not arr.get().any()
    assert device.alloc(0, np.uint8, what="x").size == 0
