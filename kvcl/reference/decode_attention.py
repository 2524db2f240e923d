"""Numpy reference of decode attention over a paged or contiguous KV cache.

The twin of ``kernels/decode_attention.cl`` (launched by :mod:`kvcl.ops.decode_attention`),
written for clarity, not speed: each sequence's K and V are gathered from the pages and
dequantised with :func:`kvcl.reference.quantize.decode_kv`, and the attention is computed in
float64 with an explicit bottom-right causal mask.

Maths, for query token ``i`` (0-based within its sequence of ``q_len`` tokens, ``kv_len``
cached tokens including its own) and query head ``h`` reading kv head ``h // group``::

    hi = kv_len - q_len + 1 + i            # exclusive end: itself and everything before
    lo = max(0, hi - window) if window > 0 else 0
    logits[j] = scale * q[i, h] . k[j, h // group]      for j in [lo, hi)
    out[i, h] = sum_j softmax(logits)[j] * v[j, h // group]
"""

from __future__ import annotations

import numpy as np

from .quantize import decode_kv


def gather_sequence(pool: np.ndarray, scales: np.ndarray | None, indptr: np.ndarray,
                    indices: np.ndarray, last_page_len: np.ndarray, b: int,
                    kv_dtype: str = "fp32", int8_mode: int = 0) -> np.ndarray:
    """Sequence ``b``'s cached rows, dequantised, in token order.

    Parameters
    ----------
    pool : numpy.ndarray
        ``[num_blocks, num_kv_heads, block_size, head_dim]`` storage dtype of ``kv_dtype``.
    scales : numpy.ndarray or None
        ``[num_blocks, num_kv_heads, block_size]`` (int8 only): float32, or uint16 fp16 bits
        (``int8_mode`` 1; the dtype of ``scales`` decides how they are read).
    indptr : numpy.ndarray
        ``[B + 1]`` int32: pages of sequence ``b`` are ``indices[indptr[b]:indptr[b + 1]]``.
    indices : numpy.ndarray
        ``[nnz]`` int32 block ids.
    last_page_len : numpy.ndarray
        ``[B]`` int32, tokens used in each sequence's last page (1..block_size).
    b : int
        The sequence.
    kv_dtype : str
        Storage dtype name (see :mod:`kvcl.dtypes`).
    int8_mode : int
        Accepted for symmetry with the kernels; the scale dtype already tells the mode apart.

    Returns
    -------
    numpy.ndarray
        ``[kv_len, num_kv_heads, head_dim]`` float32.
    """
    del int8_mode  # the stored scale's dtype (float32 or fp16 bits) carries it
    block_size = pool.shape[2]
    pages = np.asarray(indices[int(indptr[b]):int(indptr[b + 1])], dtype=np.int64)
    kv_len = (len(pages) - 1) * block_size + int(last_page_len[b])
    data = pool[pages]                                   # [npages, Hkv, BS, D]
    sc = scales[pages] if scales is not None else None   # [npages, Hkv, BS]
    rows = decode_kv(data, sc, kv_dtype)                 # float32, same shape as data
    rows = rows.transpose(0, 2, 1, 3).reshape(len(pages) * block_size, pool.shape[1], pool.shape[3])
    return rows[:kv_len]


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int) -> np.ndarray:
    """One sequence: ``q [q_len, Hq, D]``, ``k``/``v`` ``[kv_len, Hkv, D]`` → ``[q_len, Hq, D]``."""
    q_len, hq, _ = q.shape
    kv_len, hkv, _ = k.shape
    group = hq // hkv
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    out = np.zeros(q.shape, dtype=np.float64)
    for i in range(q_len):
        hi = kv_len - q_len + 1 + i
        lo = max(0, hi - window) if window > 0 else 0
        for h in range(hq):
            kh = h // group
            logits = scale * (k64[lo:hi, kh] @ q64[i, h])
            p = np.exp(logits - logits.max())
            out[i, h] = (p @ v64[lo:hi, kh]) / p.sum()
    return out


def paged_attention(queries, k_pool, v_pool, indptr, indices, last_page_len, q_indptr, out=None, *,
                    k_scales=None, v_scales=None, kv_dtype="fp32", int8_mode=0, scale=None,
                    window=0, max_q_len=None, max_kv_len=None, partition_size=None,
                    workspace=None, queue=None, wait_for=None) -> np.ndarray:
    """Reference paged decode attention (see the module docstring for the maths).

    Parameters
    ----------
    queries : numpy.ndarray
        ``[total_q, num_q_heads, head_dim]`` float32.
    k_pool, v_pool : numpy.ndarray
        ``[num_blocks, num_kv_heads, block_size, head_dim]`` in the storage dtype.
    indptr : numpy.ndarray
        ``[B + 1]`` int32 page-table row pointers.
    indices : numpy.ndarray
        ``[nnz]`` int32 block ids.
    last_page_len : numpy.ndarray
        ``[B]`` int32.
    q_indptr : numpy.ndarray
        ``[B + 1]`` int32: query rows of sequence ``b`` are ``q_indptr[b]:q_indptr[b + 1]``.
    out : numpy.ndarray, optional
        ``[total_q, num_q_heads, head_dim]`` float32, written if given.
    k_scales, v_scales : numpy.ndarray, optional
        ``[num_blocks, num_kv_heads, block_size]`` (int8 only).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    window : int
        Sliding window (0: none).

    The remaining keyword arguments mirror the kernel launcher and are ignored.

    Returns
    -------
    numpy.ndarray
        ``[total_q, num_q_heads, head_dim]`` float32.
    """
    queries = np.asarray(queries, dtype=np.float32)
    head_dim = queries.shape[2]
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    result = np.zeros(queries.shape, dtype=np.float32)
    for b in range(len(indptr) - 1):
        k = gather_sequence(k_pool, k_scales, indptr, indices, last_page_len, b, kv_dtype, int8_mode)
        v = gather_sequence(v_pool, v_scales, indptr, indices, last_page_len, b, kv_dtype, int8_mode)
        r0, r1 = int(q_indptr[b]), int(q_indptr[b + 1])
        result[r0:r1] = _attend(queries[r0:r1], k, v, float(scale), int(window))
    if out is not None:
        out[...] = result
        return out
    return result


def contiguous_attention(queries, k_cache, v_cache, kv_lens, q_indptr, out=None, *, k_scales=None,
                         v_scales=None, kv_dtype="fp32", int8_mode=0, scale=None, window=0,
                         max_q_len=None, max_kv_len=None, partition_size=None, workspace=None,
                         queue=None, wait_for=None) -> np.ndarray:
    """Reference attention over a contiguous cache (one page of ``capacity`` tokens per sequence).

    Parameters
    ----------
    queries : numpy.ndarray
        ``[total_q, num_q_heads, head_dim]`` float32.
    k_cache, v_cache : numpy.ndarray
        ``[B, num_kv_heads, capacity, head_dim]`` in the storage dtype.
    kv_lens : numpy.ndarray
        ``[B]`` int32 tokens cached per sequence (1..capacity).
    q_indptr : numpy.ndarray
        ``[B + 1]`` int32.
    k_scales, v_scales : numpy.ndarray, optional
        ``[B, num_kv_heads, capacity]`` (int8 only).

    Returns
    -------
    numpy.ndarray
        ``[total_q, num_q_heads, head_dim]`` float32.
    """
    batch = k_cache.shape[0]
    indptr = np.arange(batch + 1, dtype=np.int32)
    indices = np.arange(batch, dtype=np.int32)
    return paged_attention(queries, k_cache, v_cache, indptr, indices, np.asarray(kv_lens), q_indptr,
                           out, k_scales=k_scales, v_scales=v_scales, kv_dtype=kv_dtype,
                           int8_mode=int8_mode, scale=scale, window=window)
