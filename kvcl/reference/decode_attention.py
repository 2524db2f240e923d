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

int8 KV with ``int8_dot="integer"`` (the kernel's INT8_DOT path) is twinned exactly up to the
logits: the query row quantized as the kernel does it (:func:`quantize_query`), the integer
sums over the stored codes, and the float32 products in the kernel's order give the kernel's
logits bit for bit (:func:`integer_logits`); softmax and V then as above, in float64::

    step = float32(max|q[i, h]| / QMAX)          QMAX = 32767 (16-bit codes) or 127 (8-bit)
    c = clip(rint(float32(q[i, h] / step)), -QMAX, QMAX)        (0 where that is NaN)
    logits2[j] = float32(float32(float32(c . k_codes[j]) * float32(step * qk_scale_log2)) * k_scale[j])
    logits[j] = logits2[j] * ln(2)              (logits2 is in the log2 domain, like the kernel)

with ``qk_scale_log2 = float32(scale * log2(e))``.

int4 KV with ``int8_dot="integer"``: the query rotated into int4's basis first,
``q' = hadamard_rows(float32(q * qk_scale_log2))`` (the kernel's bits), quantized to 16- or
8-bit codes as above, the sums taken over the stored codes 0..15 and each row's scale and minimum applied
(:func:`int4_integer_logits`)::

    logits2[j] = float32(float32(c . codes[j]) * step) * sc[j] + lo[j] * sum(q')

exact up to the last sum and product (the kernel's float32 order there is its own).
"""

from __future__ import annotations

import math

import numpy as np

from .quantize import decode_kv, fp16_decode, hadamard_rows, int4_params, unpack_int4

#: bits of the query codes of the integer path, and their largest magnitude
INT8_DOT_QMAX = {16: 32767.0, 8: 127.0}


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
    rows = rows.transpose(0, 2, 1, 3).reshape(len(pages) * block_size, pool.shape[1], rows.shape[3])
    return rows[:kv_len]


def gather_codes(pool: np.ndarray, scales: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                 last_page_len: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ``b``'s stored int8 codes ``[kv_len, Hkv, D]`` (int8) and row scales
    ``[kv_len, Hkv]`` (float32; fp16 bits as uint16 are decoded), in token order; for int4
    the packed bytes ``[kv_len, Hkv, D / 2]`` and the scale slots as stored (float32 bits)."""
    block_size = pool.shape[2]
    pages = np.asarray(indices[int(indptr[b]):int(indptr[b + 1])], dtype=np.int64)
    kv_len = (len(pages) - 1) * block_size + int(last_page_len[b])
    codes = pool[pages].transpose(0, 2, 1, 3).reshape(len(pages) * block_size, pool.shape[1], pool.shape[3])
    sc = np.asarray(scales)[pages]
    sc = fp16_decode(sc) if sc.dtype == np.uint16 else sc.astype(np.float32)
    sc = sc.transpose(0, 2, 1).reshape(len(pages) * block_size, pool.shape[1])
    return codes[:kv_len], sc[:kv_len]


def quantize_query(q: np.ndarray, bits: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The integer path's query codes: per row (last axis) ``step = max|q| / QMAX`` in float32
    and ``c = clip(rint(q / step), -QMAX, QMAX)``, 0 where that is NaN (a zero row: 0 / 0; an
    Inf / NaN row: its step is Inf / NaN). Returns ``(codes int32 [..., D], step float32 [...])``,
    bit for bit the kernel's."""
    if bits not in INT8_DOT_QMAX:
        raise ValueError(f"bits: expected one of {sorted(INT8_DOT_QMAX)}, got {bits!r}")
    qmax = np.float32(INT8_DOT_QMAX[bits])
    q = np.asarray(q, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        amax = np.abs(q).max(axis=-1)                      # NaN propagates, as in the kernel
        step = (amax / qmax).astype(np.float32)
        c = np.rint((q / step[..., None]).astype(np.float32))
    c = np.clip(c, -qmax, qmax)
    c[np.isnan(c)] = 0
    return c.astype(np.int32), step


def integer_logits(q: np.ndarray, k_codes: np.ndarray, k_scales: np.ndarray, qk_scale_log2,
                   bits: int = 16) -> np.ndarray:
    """The integer path's logits (log2 domain, float32) of query rows ``q [..., D]`` against
    codes ``k_codes [T, D]`` with row scales ``k_scales [T]``: ``[..., T]``, the kernel's bit
    for bit (exact integer sums, then ``(float32(sum) * (step * qk_scale_log2)) * k_scale``)."""
    codes, step = quantize_query(q, bits)
    sums = codes.astype(np.int64) @ np.asarray(k_codes, dtype=np.int64).T
    qsc = (step * np.float32(qk_scale_log2)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        out = (sums.astype(np.float32) * qsc[..., None]).astype(np.float32)
        return (out * np.asarray(k_scales, dtype=np.float32)).astype(np.float32)


def int4_integer_logits(q: np.ndarray, k_codes: np.ndarray, k_sc: np.ndarray, k_lo: np.ndarray,
                        qk_scale_log2, bits: int = 16) -> np.ndarray:
    """int4's integer-path logits (log2 domain) of query rows ``q [..., D]`` against the stored
    codes ``k_codes [T, D]`` (0..15, the rotated basis) with each row's scale ``k_sc`` and minimum
    ``k_lo`` ``[T]``: the query rotated (:func:`~kvcl.reference.quantize.hadamard_rows` of
    ``float32(q * qk_scale_log2)``), quantized to codes of ``bits`` (16 or 8) bits
    (:func:`quantize_query`), exact integer sums, then ``float32(float32(sum) * step) * sc + lo *
    sum(q')`` in float64."""
    qr = hadamard_rows((np.asarray(q, np.float32) * np.float32(qk_scale_log2)).astype(np.float32))
    codes, step = quantize_query(qr, bits)
    sums = codes.astype(np.int64) @ np.asarray(k_codes, dtype=np.int64).T
    with np.errstate(invalid="ignore", over="ignore"):
        x = (sums.astype(np.float32) * step[..., None]).astype(np.float32)
        qsum = qr.astype(np.float64).sum(-1)[..., None]
        return x * np.asarray(k_sc, np.float64) + np.asarray(k_lo, np.float64) * qsum


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int,
            integer: "tuple | None" = None) -> np.ndarray:
    """One sequence: ``q [q_len, Hq, D]``, ``k``/``v`` ``[kv_len, Hkv, D]`` → ``[q_len, Hq, D]``.
    ``integer``: ``(k_codes, k_scales, bits)`` for int8's integer-path logits, or
    ``(k_codes, (k_sc, k_lo), ("int4", bits))`` for int4's."""
    q_len, hq, _ = q.shape
    kv_len, hkv, _ = k.shape
    group = hq // hkv
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    out = np.zeros(q.shape, dtype=np.float64)
    qk_scale_log2 = np.float32(scale * math.log2(math.e))
    for i in range(q_len):
        hi = kv_len - q_len + 1 + i
        lo = max(0, hi - window) if window > 0 else 0
        for h in range(hq):
            kh = h // group
            if integer is None:
                logits = scale * (k64[lo:hi, kh] @ q64[i, h])
            else:
                codes, ks, bits = integer
                if isinstance(bits, tuple):   # ("int4", bits)
                    logits2 = int4_integer_logits(q[i, h], codes[lo:hi, kh], ks[0][lo:hi, kh], ks[1][lo:hi, kh],
                                                  qk_scale_log2, bits[1])
                else:
                    logits2 = integer_logits(q[i, h], codes[lo:hi, kh], ks[lo:hi, kh], qk_scale_log2, bits)
                logits = np.asarray(logits2, np.float64) * math.log(2.0)
            with np.errstate(invalid="ignore"):
                p = np.exp(logits - logits.max())
                out[i, h] = (p @ v64[lo:hi, kh]) / p.sum()
    return out


def attend_self_fresh(queries, k, v, fresh_k, fresh_v, scale: float, window: int) -> np.ndarray:
    """One sequence's step (``queries`` [n, Hq, D]; ``k``, ``v`` [kv_len, Hkv, D] as cached, the
    step's tokens last): query row i attends the cached tokens before it and its own token with
    the float32 K/V of ``fresh_k[i]`` / ``fresh_v[i]``."""
    n, kv_len = len(queries), len(k)
    out = np.empty(queries.shape, np.float32)
    for i in range(n):
        pos = kv_len - n + i
        ki, vi = k[:pos + 1].copy(), v[:pos + 1].copy()
        ki[pos], vi[pos] = fresh_k[i], fresh_v[i]
        out[i:i + 1] = _attend(queries[i:i + 1], ki, vi, scale, window, None)
    return out


def paged_attention(queries, k_pool, v_pool, indptr, indices, last_page_len, q_indptr, out=None, *,
                    k_scales=None, v_scales=None, kv_dtype="fp32", int8_mode=0, scale=None,
                    window=0, max_q_len=None, max_kv_len=None, partition_size=None,
                    workspace=None, queue=None, wait_for=None, int8_dot=None,
                    int8_dot_bits: int = 16, fresh_keys=None, fresh_values=None) -> np.ndarray:
    """Reference paged decode attention (see the module docstring for the maths).

    Parameters
    ----------
    queries : numpy.ndarray
        ``[total_q, num_q_heads, head_dim]`` float32.
    k_pool, v_pool : numpy.ndarray
        ``[num_blocks, num_kv_heads, block_size, head_dim]`` in the storage dtype (int4: a last
        axis of ``head_dim / 2`` bytes).
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
        ``[num_blocks, num_kv_heads, block_size]`` (int8 and int4 only).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    window : int
        Sliding window (0: none).
    int8_dot : str, optional
        ``"integer"`` (int8 and int4 KV): the logits of the kernel's integer path, with query
        codes of ``int8_dot_bits`` (16 or 8) bits; ``None`` / ``"float"``:
        float logits.
    fresh_keys, fresh_values : numpy.ndarray, optional
        ``[total_q, num_kv_heads, head_dim]`` float32: each query row reads its own token from
        its row here instead of the cache, every other token from the cache (the launcher's
        ``fresh``, int4's decode through the engine's write + attend).

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
    if int8_dot not in (None, "float", "integer"):
        raise ValueError(f"int8_dot: expected None, 'float' or 'integer', got {int8_dot!r}")
    integer = int8_dot == "integer"
    if integer and kv_dtype not in ("int8", "int4"):
        raise ValueError(f"int8_dot: 'integer' needs kv_dtype int8 or int4, got {kv_dtype!r}")
    result = np.zeros(queries.shape, dtype=np.float32)
    for b in range(len(indptr) - 1):
        k = gather_sequence(k_pool, k_scales, indptr, indices, last_page_len, b, kv_dtype, int8_mode)
        v = gather_sequence(v_pool, v_scales, indptr, indices, last_page_len, b, kv_dtype, int8_mode)
        r0, r1 = int(q_indptr[b]), int(q_indptr[b + 1])
        if fresh_keys is not None:
            result[r0:r1] = attend_self_fresh(queries[r0:r1], k, v, np.asarray(fresh_keys)[r0:r1],
                                              np.asarray(fresh_values)[r0:r1], float(scale), int(window))
            continue
        codes = None
        if integer and kv_dtype == "int4":
            stored, slots = gather_codes(k_pool, k_scales, indptr, indices, last_page_len, b)
            codes = (unpack_int4(stored), int4_params(slots), ("int4", int8_dot_bits))
        elif integer:
            codes = gather_codes(k_pool, k_scales, indptr, indices, last_page_len, b) + (int8_dot_bits,)
        result[r0:r1] = _attend(queries[r0:r1], k, v, float(scale), int(window), codes)
    if out is not None:
        out[...] = result
        return out
    return result


def contiguous_attention(queries, k_cache, v_cache, kv_lens, q_indptr, out=None, *, k_scales=None,
                         v_scales=None, kv_dtype="fp32", int8_mode=0, scale=None, window=0,
                         max_q_len=None, max_kv_len=None, partition_size=None, workspace=None,
                         queue=None, wait_for=None, int8_dot=None, int8_dot_bits: int = 16) -> np.ndarray:
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
        ``[B, num_kv_heads, capacity]`` (int8 and int4 only).

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
                           int8_mode=int8_mode, scale=scale, window=window, int8_dot=int8_dot,
                           int8_dot_bits=int8_dot_bits)
