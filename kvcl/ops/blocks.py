"""Launchers for ``kernels/blocks.cl``: block copy, block gather/scatter, positional extract/inject.

These move bytes and never look at values, so they work on every storage dtype (float32,
fp16 bits, int8, fp8 bytes) and on scale arrays alike:

* a **pool** is any array ``[num_blocks, ...]`` — K/V pools ``[num_blocks, num_kv_heads,
  block_size, head_dim]`` and scales ``[num_blocks, num_kv_heads, block_size]`` (a pool with
  head_dim 1) go through the same call;
* a **contiguous cache** (oxibonsai's ``KvCache`` layer) is ``[num_heads, capacity, ...]``,
  usually ``[num_heads, capacity, head_dim]``.

Every argument is validated before anything is enqueued (ids in range, destinations distinct,
shapes and dtypes), so bad input leaves the pool byte-identical. Block ids may be numpy arrays
or sequences (uploaded here) or int32 device arrays (read back once for validation: a small
blocking copy). The numpy twins are in :mod:`kvcl.reference.blocks`.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl

from ..errors import DtypeError, InvalidArgument, ShapeError
from ..runtime import get_kernel
from ..validate import check_array, check_int, is_device_array
from ._launch import device_array, launch, resolve_queue

__all__ = ["copy_blocks", "extract_blocks", "inject_blocks", "extract_positions", "inject_positions"]

_SOURCE = "blocks.cl"
_LOCAL = 64  # dim-0 padding; the device picks the actual local size







def _word_bytes(*byte_counts: int) -> int:
    """32-bit words when every size and offset allows it, else bytes."""
    return 4 if all(n % 4 == 0 for n in byte_counts) else 1


def _kernel(context, name: str, word_bytes: int) -> cl.Kernel:
    return get_kernel(context, _SOURCE, name, {"WORD_BYTES": word_bytes})


class _Ids:
    """Validated block ids: host copy for the checks, device buffer + element base for the kernel."""

    def __init__(self, name: str, ids, num_blocks: int, queue, *, distinct: bool):
        if is_device_array(ids):
            device_array(name, ids, ndim=1, dtype=np.int32, context=queue.context)
            host = ids.get(queue=queue)
            self.buffer, self.base = ids.base_data, ids.offset // 4
        else:
            host = np.asarray(ids)
            if host.dtype == object or (host.size == 0 and host.dtype.kind == "f"):
                host = host.astype(np.int64)
            check_array(name, host, ndim=1)
            if host.dtype.kind not in "iu":
                raise DtypeError(f"{name}: expected integer block ids, got dtype {host.dtype}")
            self.buffer, self.base = None, 0
        bad = np.flatnonzero((host < 0) | (host >= num_blocks))
        if bad.size:
            i = int(bad[0])
            check_int(f"{name}[{i}] (block id)", int(host[i]), low=0, high=num_blocks)
        if distinct:
            _check_distinct(name, host)
        self.host = host.astype(np.int32)
        if self.buffer is None and len(self.host):
            self.buffer = cl.Buffer(queue.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                                    hostbuf=self.host)

    def __len__(self) -> int:
        return len(self.host)


def _check_distinct(name: str, host: np.ndarray) -> None:
    values, counts = np.unique(host, return_counts=True)
    if (counts > 1).any():
        value = int(values[counts > 1][0])
        where = np.flatnonzero(host == value)[:2].tolist()
        raise InvalidArgument(
            f"{name}: block {value} appears more than once (indices {where[0]} and {where[1]}); "
            "destination blocks must be distinct"
        )


def _block_shape(name: str, pool) -> tuple[int, int]:
    """(num_blocks, bytes per block) of a pool [num_blocks, ...]."""
    if len(pool.shape) < 1:
        raise ShapeError(f"{name}: expected shape (num_blocks, ...), got {tuple(pool.shape)}")
    num_blocks = int(pool.shape[0])
    per_block = int(np.prod(pool.shape[1:], dtype=np.int64)) * pool.dtype.itemsize
    return num_blocks, per_block


def _enqueue(queue, kernel, global_size, args, wait_for):
    global_size = (-(-global_size[0] // _LOCAL) * _LOCAL,) + tuple(global_size[1:])
    return launch(queue, kernel, global_size, None, args, wait_for)


def copy_blocks(pool, src_ids, dst_ids, *, queue=None, wait_for=None) -> cl.Event:
    """Copy whole blocks ``pool[dst_ids[i]] = pool[src_ids[i]]`` (copy-on-write fork).

    Parameters
    ----------
    pool : pyopencl.array.Array, any dtype, shape [num_blocks, ...]
        E.g. ``[num_blocks, num_kv_heads, block_size, head_dim]`` or scales
        ``[num_blocks, num_kv_heads, block_size]``; modified in place.
    src_ids : int array, shape [n]
        Source block ids in ``[0, num_blocks)`` (numpy/sequence, or an int32 device array).
    dst_ids : int array, shape [n]
        Destination block ids: in range, distinct, and none of them a source (the copies run
        in parallel, so a destination that is also read would race).
    queue : pyopencl.CommandQueue, optional
        Defaults to ``pool``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Raises
    ------
    OutOfRangeError
        An id outside ``[0, num_blocks)`` (the message names the argument and index).
    InvalidArgument
        Duplicate destinations, or a destination that is also a source.

    Examples
    --------
    >>> copy_blocks(pool, [3], [7]).wait()   # doctest: +SKIP
    """
    queue = resolve_queue(queue, pool=pool)
    device_array("pool", pool, context=queue.context)
    num_blocks, block_bytes = _block_shape("pool", pool)
    src = _Ids("src_ids", src_ids, num_blocks, queue, distinct=False)
    dst = _Ids("dst_ids", dst_ids, num_blocks, queue, distinct=True)
    if len(src) != len(dst):
        raise ShapeError(f"dst_ids: expected shape ({len(src)},) like src_ids, got ({len(dst)},)")
    overlap = np.intersect1d(src.host, dst.host)
    if overlap.size:
        raise InvalidArgument(
            f"dst_ids: block {int(overlap[0])} is also in src_ids; copies run in parallel, "
            "so a destination may not be a source"
        )
    if len(src) == 0 or block_bytes == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    word = _word_bytes(block_bytes, pool.offset)
    words = block_bytes // word
    args = (pool.base_data, np.uint64(pool.offset // word), src.buffer, np.uint64(src.base),
            dst.buffer, np.uint64(dst.base), np.uint64(words))
    return _enqueue(queue, _kernel(queue.context, "copy_blocks", word), (words, len(src)), args, wait_for)


def extract_blocks(pool, block_ids, out, *, queue=None, wait_for=None) -> cl.Event:
    """Gather ``out[i] = pool[block_ids[i]]`` into a contiguous array.

    Parameters
    ----------
    pool : pyopencl.array.Array, any dtype, shape [num_blocks, ...]
        E.g. ``[num_blocks, num_kv_heads, block_size, head_dim]`` or its scales
        ``[num_blocks, num_kv_heads, block_size]``.
    block_ids : int array, shape [n]
        Ids in ``[0, num_blocks)``; repeats allowed.
    out : pyopencl.array.Array, ``pool.dtype``, shape ``[n, *pool.shape[1:]]``
    queue : pyopencl.CommandQueue, optional
        Defaults to ``out``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Examples
    --------
    >>> out = cla.empty(q, (2,) + pool.shape[1:], pool.dtype)   # doctest: +SKIP
    >>> extract_blocks(pool, [5, 1], out).wait()                 # doctest: +SKIP
    """
    queue = resolve_queue(queue, out=out, pool=pool)
    device_array("pool", pool, context=queue.context)
    num_blocks, block_bytes = _block_shape("pool", pool)
    ids = _Ids("block_ids", block_ids, num_blocks, queue, distinct=False)
    device_array("out", out, shape=(len(ids),) + tuple(pool.shape[1:]), dtype=pool.dtype,
                  context=queue.context)
    if len(ids) == 0 or block_bytes == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    word = _word_bytes(block_bytes, pool.offset, out.offset)
    words = block_bytes // word
    args = (pool.base_data, np.uint64(pool.offset // word), ids.buffer, np.uint64(ids.base),
            out.base_data, np.uint64(out.offset // word), np.uint64(words))
    return _enqueue(queue, _kernel(queue.context, "extract_blocks", word), (words, len(ids)), args, wait_for)


def inject_blocks(src, block_ids, pool, *, queue=None, wait_for=None) -> cl.Event:
    """Scatter ``pool[block_ids[i]] = src[i]`` (the inverse of :func:`extract_blocks`).

    Parameters
    ----------
    src : pyopencl.array.Array, ``pool.dtype``, shape ``[n, *pool.shape[1:]]``
    block_ids : int array, shape [n]
        Distinct ids in ``[0, num_blocks)``.
    pool : pyopencl.array.Array, any dtype, shape [num_blocks, ...]
        Modified in place.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``pool``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Examples
    --------
    >>> inject_blocks(saved, [5, 1], pool).wait()   # doctest: +SKIP
    """
    queue = resolve_queue(queue, pool=pool, src=src)
    device_array("pool", pool, context=queue.context)
    num_blocks, block_bytes = _block_shape("pool", pool)
    ids = _Ids("block_ids", block_ids, num_blocks, queue, distinct=True)
    device_array("src", src, shape=(len(ids),) + tuple(pool.shape[1:]), dtype=pool.dtype,
                  context=queue.context)
    if len(ids) == 0 or block_bytes == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    word = _word_bytes(block_bytes, pool.offset, src.offset)
    words = block_bytes // word
    args = (src.base_data, np.uint64(src.offset // word), ids.buffer, np.uint64(ids.base),
            pool.base_data, np.uint64(pool.offset // word), np.uint64(words))
    return _enqueue(queue, _kernel(queue.context, "inject_blocks", word), (words, len(ids)), args, wait_for)


def _cache_shape(name: str, cache) -> tuple[int, int, int]:
    """(num_heads, capacity, bytes per position row) of a cache [num_heads, capacity, ...]."""
    if len(cache.shape) < 2:
        raise ShapeError(f"{name}: expected shape (num_heads, capacity, head_dim), got {tuple(cache.shape)}")
    row_bytes = int(np.prod(cache.shape[2:], dtype=np.int64)) * cache.dtype.itemsize
    return int(cache.shape[0]), int(cache.shape[1]), row_bytes


def extract_positions(cache, start_pos: int, count: int, out, *, queue=None, wait_for=None) -> cl.Event:
    """Copy positions ``[start_pos, start_pos + count)`` of a contiguous cache layer.

    The twin of oxibonsai's ``KvCache::extract_block`` for one of K or V: positions at or past
    the capacity come back as zeros.

    Parameters
    ----------
    cache : pyopencl.array.Array, any dtype, shape [num_heads, capacity, head_dim]
        (any trailing shape: ``[num_heads, capacity]`` scales work too).
    start_pos : int
        ``>= 0``; may be past the capacity (everything then reads as zeros).
    count : int
        Number of positions, ``>= 0``.
    out : pyopencl.array.Array, ``cache.dtype``, shape [num_heads, count, head_dim]
    queue : pyopencl.CommandQueue, optional
        Defaults to ``out``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Examples
    --------
    >>> out = cla.empty(q, (H, 4, D), np.float32)      # doctest: +SKIP
    >>> extract_positions(keys[layer], 4, 4, out).wait()  # doctest: +SKIP
    """
    queue = resolve_queue(queue, out=out, cache=cache)
    device_array("cache", cache, context=queue.context)
    num_heads, capacity, row_bytes = _cache_shape("cache", cache)
    start_pos = check_int("start_pos", start_pos, low=0, high=2**62)
    count = check_int("count", count, low=0, high=2**32)
    device_array("out", out, shape=(num_heads, count) + tuple(cache.shape[2:]), dtype=cache.dtype,
                  context=queue.context)
    if num_heads == 0 or count == 0 or row_bytes == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    word = _word_bytes(row_bytes, cache.offset, out.offset)
    words = row_bytes // word
    args = (cache.base_data, np.uint64(cache.offset // word), out.base_data, np.uint64(out.offset // word),
            np.uint64(capacity), np.uint64(start_pos), np.uint64(count), np.uint64(words))
    return _enqueue(queue, _kernel(queue.context, "extract_positions", word), (words, count, num_heads),
                    args, wait_for)


def inject_positions(src, start_pos: int, cache, *, queue=None, wait_for=None) -> cl.Event:
    """Write ``src`` into positions ``start_pos ..`` of a contiguous cache layer.

    The twin of oxibonsai's ``KvCache::inject_block`` for one of K or V: positions at or past
    the capacity are skipped.

    Parameters
    ----------
    src : pyopencl.array.Array, ``cache.dtype``, shape [num_heads, count, head_dim]
    start_pos : int
        ``>= 0``.
    cache : pyopencl.array.Array, any dtype, shape [num_heads, capacity, head_dim]
        Modified in place.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``cache``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Examples
    --------
    >>> inject_positions(block_keys, 4, keys[layer]).wait()   # doctest: +SKIP
    """
    queue = resolve_queue(queue, cache=cache, src=src)
    device_array("cache", cache, context=queue.context)
    num_heads, capacity, row_bytes = _cache_shape("cache", cache)
    start_pos = check_int("start_pos", start_pos, low=0, high=2**62)
    device_array("src", src, shape=(num_heads, None) + tuple(cache.shape[2:]), dtype=cache.dtype,
                  context=queue.context)
    count = check_int("src.shape[1] (count)", int(src.shape[1]), high=2**32)
    written = max(0, min(count, capacity - start_pos))
    if num_heads == 0 or written == 0 or row_bytes == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    word = _word_bytes(row_bytes, cache.offset, src.offset)
    words = row_bytes // word
    args = (src.base_data, np.uint64(src.offset // word), cache.base_data, np.uint64(cache.offset // word),
            np.uint64(capacity), np.uint64(start_pos), np.uint64(count), np.uint64(words))
    # Only the positions that fit are launched; the kernel's own bound check is a second guard.
    return _enqueue(queue, _kernel(queue.context, "inject_positions", word), (words, written, num_heads),
                    args, wait_for)
