"""The one launch path (``kvcl.ops._launch``): what kernels remember of their arguments, and locks.

* a cache deleted after running a step through it releases its device buffers (the engine and
  three mirrors): the launchers remember each kernel's last arguments without holding them;
* a buffer collected and replaced by a new one (whose OpenCL handle may be the old one's) is
  set again, and unchanged scalars are skipped but a changed one (even -0.0 after 0.0) is not;
* two threads launching the same kernels with different arguments get their own results, for
  single launches and for sequences (split-K attention and its merge) on one queue.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

from kvcl.bitpolar import KvCacheCompressor, KvCacheConfig
from kvcl.engine import PagedKVCache
from kvcl.ferrum import KvInt8
from kvcl.ops import _launch
from kvcl.ops import decode_attention as attention_ops
from kvcl.ops import quantize as quantize_ops
from kvcl.oxibonsai import QuantizedKvLayer
from kvcl.reference import decode_attention as attention_ref


class _Probe:
    """Hung on a buffer as its only strong reference: a weak reference to it dies with the buffer."""


def _probes(buffers) -> list:
    found = []
    for buf in buffers:
        assert isinstance(buf, cl.MemoryObjectHolder), type(buf)
        buf._test_probe = _Probe()
        found.append(weakref.ref(buf._test_probe))
    return found


def _launched(buffers) -> bool:
    """Whether the launch path has seen these buffers (it marks each one it remembers)."""
    return all(getattr(b, _launch._ALIVE, None) is not None for b in buffers)


def _assert_released(make):
    """``make()`` -> (cache, its device buffers); every buffer must die with the cache."""
    cache, buffers = make()
    assert _launched(buffers), "the test needs kernels that were launched with these buffers"
    probes = _probes(buffers)
    del cache, buffers
    gc.collect()
    alive = sum(p() is not None for p in probes)
    assert alive == 0, f"{alive} of {len(probes)} buffers outlived their cache"


HKV, D, HQ = 2, 32, 4


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_engine_pools_are_released_with_the_cache(device, dtype):
    rng = np.random.default_rng(5)

    def make():
        c = PagedKVCache(2, HKV, D, 16, 8, dtype, device=device)
        s = c.add_sequence()
        st = c.plan([s], [3])
        for layer in range(2):
            c.write(layer, st, rng.standard_normal((3, HKV, D), np.float32),
                    rng.standard_normal((3, HKV, D), np.float32))
            c.attend(layer, st, rng.standard_normal((3, HQ, D), np.float32))
        st = c.plan([s], [1])
        calls = c.step_calls(st, num_q_heads=HQ)
        for layer in range(2):
            calls.write_attend(layer, rng.standard_normal((1, HKV, D), np.float32),
                               rng.standard_normal((1, HKV, D), np.float32),
                               rng.standard_normal((1, HQ, D), np.float32))
        pools = [a.data for a in (*c._k, *c._v, *c._ks, *c._vs) if a is not None]
        return c, pools
    _assert_released(make)


def test_ferrum_layer_is_released(device):
    rng = np.random.default_rng(6)

    def make():
        layer = KvInt8.alloc_paged(2, 8, 2, 16, device=device)
        qkv = rng.standard_normal((3, (4 + 4) * 16)).astype(np.float32)
        q = KvInt8.paged_write(layer, qkv, None, None, None, None, None, tokens=3, num_q_heads=4,
                               num_kv_heads=2, head_dim=16, pos_offset=0, eps=1e-6, qk_mode=0)
        KvInt8.set_len(layer, 3)
        KvInt8.paged_decode_attention(layer, q, None, 4, 2, 16, 3, 3)
        return layer, [a.data for a in (layer.k, layer.v, layer.k_scales, layer.v_scales)]
    _assert_released(make)


def test_oxibonsai_quantized_layer_is_released(device):
    def make():
        layer = QuantizedKvLayer(4, 2, 8, device=device)
        layer.push(np.linspace(-1, 1, 16), np.linspace(1, -1, 16))
        layer.get_keys_at(0)
        return layer, [a.data for a in (layer._keys, layer._key_scales, layer._values, layer._value_scales)]
    _assert_released(make)


def test_bitpolar_compressor_is_released(device):
    def make():
        cache = KvCacheCompressor(KvCacheConfig(head_dim=8, bits=4, projections=4, seed=3), device=device)
        cache.push(np.arange(8.0), np.arange(8.0) * 0.5)
        cache.attention_scores(np.ones(8))
        codes = cache._codes
        return cache, [a.data for a in (codes.codes, codes.radii, codes.signs, codes.norms,
                                        codes.rotations, codes.projections)]
    _assert_released(make)


# ---- the memo ---------------------------------------------------------------------------------

def _fp32_round_trip(queue, host: np.ndarray) -> np.ndarray:
    x = cla.to_device(queue, host)
    out = cla.empty(queue, host.shape, np.float32)
    quantize_ops.dequantize_rows(x, out, kv_dtype="fp32", queue=queue)
    return out.get()


def test_a_new_buffer_in_a_dead_ones_place_is_set_again(device):
    # PoCL hands a freed buffer's handle to the next buffer of the same size: the memo must not
    # take the new buffer for the old one (a dead reference counts as changed)
    rng = np.random.default_rng(7)
    handles = set()
    reused = 0
    for _ in range(40):
        host = rng.standard_normal((4, 16)).astype(np.float32)
        x = cla.to_device(device.queue, host)
        out = cla.empty(device.queue, host.shape, np.float32)
        reused += out.base_data.int_ptr in handles or x.base_data.int_ptr in handles
        handles.update((x.base_data.int_ptr, out.base_data.int_ptr))
        quantize_ops.dequantize_rows(x, out, kv_dtype="fp32", queue=device.queue)
        np.testing.assert_array_equal(out.get(), host)
        del x, out
        gc.collect()
    print(f"handles reused: {reused} of 40")


def test_scalars_skipped_only_when_equal_including_the_sign_of_zero():
    f, g = np.float32(0.0), np.float32(-0.0)
    assert _launch._unchanged(np.float32(0.0), _launch._remember(f))
    assert not _launch._unchanged(g, _launch._remember(f))
    assert not _launch._unchanged(np.float64(0.0), _launch._remember(f))   # another type
    assert not _launch._unchanged(np.int32(3), _launch._remember(np.int32(4)))
    assert _launch._unchanged(None, _launch._remember(None))
    assert not _launch._unchanged(np.int32(0), _launch._remember(None))
    assert not _launch._unchanged(cl.LocalMemory(16), _launch._remember(cl.LocalMemory(16)))


def test_the_memo_holds_no_buffer(device):
    buf = cla.to_device(device.queue, np.ones((2, 4), np.float32))
    out = cla.empty(device.queue, (2, 4), np.float32)
    quantize_ops.dequantize_rows(buf, out, kv_dtype="fp32", queue=device.queue)
    out.get()
    kernel = device.kernel("quantize.cl", "dequantize_rows", quantize_ops._program_defines(
        quantize_ops._dtypes.kv_dtype("fp32"), 0, False))
    assert _launch.remembered_buffers(kernel) == 2
    probes = _probes([buf.base_data, out.base_data])
    del buf, out
    gc.collect()
    assert [p() for p in probes] == [None, None]
    assert _launch.remembered_buffers(kernel) == 0


# ---- threads ----------------------------------------------------------------------------------

def _in_threads(work, n=2):
    """Run ``work(i)`` in ``n`` threads that switch often; re-raise the first failure."""
    errors = []

    def run(i):
        try:
            work(i)
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # interleave the threads between any two bytecodes, nearly
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]


def test_two_threads_launch_the_same_kernel_with_different_arguments(device):
    def work(i):
        rng = np.random.default_rng(100 + i)
        # each thread its own queue and its own buffers; the kernel object is shared
        queue = cl.CommandQueue(device.context, device.device)
        for _ in range(150):
            rows = int(rng.integers(1, 9))
            host = rng.standard_normal((rows, 16)).astype(np.float32)
            np.testing.assert_array_equal(_fp32_round_trip(queue, host), host)
    _in_threads(work)


def _paged_case(rng, lens, block_size=16, num_kv_heads=2, group=2, head_dim=32):
    """fp32 pools, a shuffled page table and one query per sequence, as host arrays."""
    npages = [-(-n // block_size) for n in lens]
    num_blocks = sum(npages) + 2
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    return dict(queries=rng.standard_normal((len(lens), num_kv_heads * group, head_dim)).astype(np.float32),
                k_pool=rng.standard_normal(shape).astype(np.float32),
                v_pool=rng.standard_normal(shape).astype(np.float32), indptr=indptr,
                indices=rng.permutation(num_blocks)[:indptr[-1]].astype(np.int32),
                last_page_len=np.array([n - (p - 1) * block_size for n, p in zip(lens, npages)], np.int32),
                q_indptr=np.arange(len(lens) + 1, dtype=np.int32))


def _split_k_in_threads(device, queue_of):
    cases = [_paged_case(np.random.default_rng(200 + i), (97, 54)) for i in range(2)]
    order = ("queries", "k_pool", "v_pool", "indptr", "indices", "last_page_len", "q_indptr")
    wants = [attention_ref.paged_attention(*(c[k] for k in order), kv_dtype="fp32") for c in cases]

    def work(i):
        q = queue_of(i)
        args = [cla.to_device(q, cases[i][k]) for k in order]
        out = cla.empty(q, cases[i]["queries"].shape, np.float32)
        for _ in range(300):
            attention_ops.paged_attention(*args, out, max_q_len=1, max_kv_len=97, partition_size=16,
                                          queue=q)
            # to_host, not out.get(): Mesa 22's rusticl ends a blocking read early while the
            # other thread enqueues on the queue (the host copy seen half-done, then right)
            np.testing.assert_allclose(_launch.to_host(out), wants[i], rtol=1e-4, atol=1e-5)
    _in_threads(work)


def test_two_threads_enqueue_split_k_sequences_on_one_queue(device):
    # the decode kernel and its merge share the queue's workspace: each thread's pair must reach
    # the queue together
    _split_k_in_threads(device, lambda i: device.queue)


def test_two_threads_split_k_on_two_queues_of_one_context(device):
    # two queues run at once: each needs its own workspace (one per context raced here)
    queues = [cl.CommandQueue(device.context, device.device) for _ in range(2)]
    _split_k_in_threads(device, lambda i: queues[i])
