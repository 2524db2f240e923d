"""Numpy reference of ``kernels/blocks.cl`` (same names as :mod:`kvcl.ops.blocks`).

Numpy in, numpy out: inputs are never modified, results are new arrays. No validation here
beyond what numpy does itself; the device launchers validate.

Layouts: a pool is ``[num_blocks, ...]`` (``[num_blocks, num_kv_heads, block_size, head_dim]``,
or scales ``[num_blocks, num_kv_heads, block_size]``); a contiguous cache layer is
``[num_heads, capacity, ...]`` (oxibonsai's ``KvCache`` keeps ``[layer][head][pos][dim]``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["copy_blocks", "extract_blocks", "inject_blocks", "extract_positions", "inject_positions"]


def copy_blocks(pool: np.ndarray, src_ids, dst_ids) -> np.ndarray:
    """``pool`` with ``pool[dst_ids[i]] = pool[src_ids[i]]`` for every i.

    pool: [num_blocks, ...]; src_ids, dst_ids: [n] ints (dst distinct, disjoint from src).
    """
    new = np.array(pool, copy=True)
    new[np.asarray(dst_ids, dtype=np.int64)] = pool[np.asarray(src_ids, dtype=np.int64)]
    return new


def extract_blocks(pool: np.ndarray, block_ids) -> np.ndarray:
    """The listed blocks, contiguous: ``[n, *pool.shape[1:]]``, ``pool.dtype``."""
    return pool[np.asarray(block_ids, dtype=np.int64)].copy()


def inject_blocks(src: np.ndarray, block_ids, pool: np.ndarray) -> np.ndarray:
    """``pool`` with ``pool[block_ids[i]] = src[i]``; src: ``[n, *pool.shape[1:]]``, ids distinct."""
    new = np.array(pool, copy=True)
    new[np.asarray(block_ids, dtype=np.int64)] = src
    return new


def extract_positions(cache: np.ndarray, start_pos: int, count: int) -> np.ndarray:
    """Positions ``[start_pos, start_pos + count)`` of cache [num_heads, capacity, ...].

    Returns [num_heads, count, ...] of ``cache.dtype``; positions >= capacity read as zeros.
    """
    num_heads, capacity = cache.shape[:2]
    out = np.zeros((num_heads, count) + cache.shape[2:], dtype=cache.dtype)
    stop = min(start_pos + count, capacity)
    if stop > start_pos:
        out[:, : stop - start_pos] = cache[:, start_pos:stop]
    return out


def inject_positions(src: np.ndarray, start_pos: int, cache: np.ndarray) -> np.ndarray:
    """``cache`` with positions ``start_pos ..`` replaced by src [num_heads, count, ...].

    Positions >= capacity are skipped.
    """
    new = np.array(cache, copy=True)
    capacity = cache.shape[1]
    stop = min(start_pos + src.shape[1], capacity)
    if stop > start_pos:
        new[:, start_pos:stop] = src[:, : stop - start_pos]
    return new
