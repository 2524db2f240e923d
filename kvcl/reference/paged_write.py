"""Numpy reference of the fused paged write (the twin of ``kernels/paged_write.cl``).

Per token ``t`` and head row: split the input into Q, K and V heads → optional RMS norm of Q
and K (``x · rsqrt(mean(x²) + eps) · w``) → RoPE of Q and K at ``positions[t]`` (``"none"``,
``"half"``-split or ``"interleaved"``) → store Q rotated into ``q_out[t]`` and K, V encoded in
the pool's dtype at ``slot_mapping[t]`` (``slot = block_id · block_size + offset``). V is
never normed or rotated. All maths in float32, written for clarity, not speed.

``status[0]`` bits (set, never cleared, exactly as the kernel sets them):

* bit 0 (``STATUS_NONFINITE``): a K or V row held NaN/Inf after norm and RoPE (int4: or a
  rotated value beyond ±65504, see :func:`kvcl.reference.quantize.int4_out_of_range`); that row was
  not written (its slot keeps its old bytes; the other rows of the token are written);
* bit 1 (``STATUS_BAD_SLOT``): a slot ``>= num_blocks · block_size``; the token's K and V were
  not written (Q was);
* bit 2 (``STATUS_BAD_POSITION``): with RoPE, a position outside ``[0, len(cos))``; nothing of
  that token was written (neither Q nor K nor V).

A negative slot means "padding": K and V of that token are skipped silently; Q is written.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import INT8_MODE_AWAY, kv_dtype
from .quantize import encode_kv, int4_out_of_range

ROPE_MODES = ("none", "half", "interleaved")

STATUS_NONFINITE = 1
STATUS_BAD_SLOT = 2
STATUS_BAD_POSITION = 4


def rms_norm(x: np.ndarray, w: "np.ndarray | None", eps: float) -> np.ndarray:
    """RMS norm over the last axis: ``x · 1/sqrt(mean(x²) + eps) · w`` in float32.

    Parameters
    ----------
    x : ndarray, shape ``[..., head_dim]``
    w : ndarray, shape ``[head_dim]``, or None for all ones
    eps : float
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        inv = (np.float32(1.0) / np.sqrt(ms + np.float32(eps))).astype(np.float32)
        y = (x * inv).astype(np.float32)
        if w is not None:
            y = (y * np.asarray(w, dtype=np.float32)).astype(np.float32)
    return y


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: str) -> np.ndarray:
    """Rotary position embedding over the last axis, in float32.

    Parameters
    ----------
    x : ndarray, shape ``[..., head_dim]``
    cos, sin : ndarray, shape broadcastable to ``[..., head_dim // 2]``
        The table rows of each vector's position (e.g. ``cos[positions][:, None, :]`` for
        ``x`` of shape ``[T, heads, head_dim]``).
    mode : {"none", "half", "interleaved"}
        ``"half"``: ``out[i] = x[i]·c[i] − x[i+D/2]·s[i]``, ``out[i+D/2] = x[i+D/2]·c[i] + x[i]·s[i]``;
        ``"interleaved"``: the same on pairs ``(x[2i], x[2i+1])``.
    """
    if mode not in ROPE_MODES:
        raise ValueError(f"rope: expected one of {', '.join(ROPE_MODES)}, got {mode!r}")
    x = np.asarray(x, dtype=np.float32)
    if mode == "none":
        return x.copy()
    c = np.asarray(cos, dtype=np.float32)
    s = np.asarray(sin, dtype=np.float32)
    half = x.shape[-1] // 2
    if mode == "half":
        x0, x1 = x[..., :half], x[..., half:]
    else:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    with np.errstate(over="ignore", invalid="ignore"):
        y0 = (x0 * c - x1 * s).astype(np.float32)
        y1 = (x1 * c + x0 * s).astype(np.float32)
    out = np.empty_like(x)
    if mode == "half":
        out[..., :half], out[..., half:] = y0, y1
    else:
        out[..., 0::2], out[..., 1::2] = y0, y1
    return out


def _scatter(rows: np.ndarray, slot_mapping: np.ndarray, ok: np.ndarray, pool: np.ndarray,
             scales: "np.ndarray | None", kv_dtype_name: str, int8_mode: int, block_size: int,
             status: np.ndarray) -> None:
    """Encode rows ``[T, num_kv_heads, head_dim]`` and store them at their slots (in place)."""
    for t in range(rows.shape[0]):
        if not ok[t]:
            continue
        block, offset = divmod(int(slot_mapping[t]), block_size)
        for h in range(rows.shape[1]):
            row = rows[t, h]
            refused = (int4_out_of_range(row) if kv_dtype_name == "int4" else
                       not np.all(np.isfinite(row)))
            if refused:
                status[0] |= STATUS_NONFINITE
                continue
            data, scale = encode_kv(row, kv_dtype_name, int8_mode=int8_mode)
            pool[block, h, offset] = data
            if scales is not None:
                scales[block, h, offset] = scale


def _write(q, k, v, slot_mapping, positions, k_pool, v_pool, q_out, *, block_size, kv_dtype_name,
           int8_mode, k_scales, v_scales, cos, sin, q_norm_weight, k_norm_weight, eps, rope, status):
    T = k.shape[0]
    q_out = None if q_out is None else np.array(q_out, copy=True)
    k_pool, v_pool = np.array(k_pool, copy=True), np.array(v_pool, copy=True)
    k_scales = None if k_scales is None else np.array(k_scales, copy=True)
    v_scales = None if v_scales is None else np.array(v_scales, copy=True)
    status = np.zeros(1, np.int32) if status is None else np.array(status, dtype=np.int32, copy=True)
    slot_mapping = np.asarray(slot_mapping, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    num_slots = k_pool.shape[0] * block_size

    # which tokens can be written at all
    if rope != "none":
        pos_ok = (positions >= 0) & (positions < cos.shape[0])
        if not pos_ok.all():
            status[0] |= STATUS_BAD_POSITION
    else:
        pos_ok = np.ones(T, dtype=bool)
    bad_slot = pos_ok & (slot_mapping >= num_slots)
    if bad_slot.any():
        status[0] |= STATUS_BAD_SLOT
    kv_ok = pos_ok & (slot_mapping >= 0) & (slot_mapping < num_slots)

    # norm, then RoPE (Q and K only)
    if q is not None and q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    if rope != "none":
        rows = np.clip(positions, 0, cos.shape[0] - 1)
        c = np.asarray(cos, np.float32)[rows][:, None, :]
        s = np.asarray(sin, np.float32)[rows][:, None, :]
        if q is not None:
            q = apply_rope(q, c, s, rope)
        k = apply_rope(k, c, s, rope)

    if q is not None:
        q_out[pos_ok] = q[pos_ok]
    _scatter(k, slot_mapping, kv_ok, k_pool, k_scales, kv_dtype_name, int8_mode, block_size, status)
    _scatter(v, slot_mapping, kv_ok, v_pool, v_scales, kv_dtype_name, int8_mode, block_size, status)
    return q_out, k_pool, v_pool, k_scales, v_scales, status


def paged_write_qkv(qkv, slot_mapping, positions, k_pool, v_pool, q_out, *, num_q_heads,
                    num_kv_heads, head_dim, block_size, kv_dtype="fp32", int8_mode=INT8_MODE_AWAY,
                    k_scales=None, v_scales=None, cos=None, sin=None, q_norm_weight=None,
                    k_norm_weight=None, eps=1e-6, rope="half", status=None):
    """Fused split-QKV → norm → RoPE → quantize → scatter (numpy reference).

    Parameters
    ----------
    qkv : ndarray float32, shape ``[T, (num_q_heads + 2·num_kv_heads)·head_dim]``
        Per token: all Q heads, then the K heads, then the V heads.
    slot_mapping : ndarray int32, shape ``[T]``
        ``block_id · block_size + offset``; negative = skip the token's K and V.
    positions : ndarray int32, shape ``[T]``
        Row of ``cos`` / ``sin`` for each token (unused with ``rope="none"``).
    k_pool, v_pool : ndarray, shape ``[num_blocks, num_kv_heads, block_size, head_dim]``
        Storage dtype of ``kv_dtype`` (float32, uint16 fp16 bits, int8, uint8 fp8).
    q_out : ndarray float32, shape ``[T, num_q_heads, head_dim]``
    k_scales, v_scales : ndarray, shape ``[num_blocks, num_kv_heads, block_size]``
        int8 only: float32 (``int8_mode`` 0) or uint16 fp16 bits (``int8_mode`` 1).
    cos, sin : ndarray float32, shape ``[max_position, head_dim // 2]``
    q_norm_weight, k_norm_weight : ndarray float32, shape ``[head_dim]``, optional
    status : ndarray int32, shape ``[1]``, optional

    Returns
    -------
    tuple
        Updated copies ``(q_out, k_pool, v_pool, k_scales, v_scales, status)``.
    """
    if rope not in ROPE_MODES:
        raise ValueError(f"rope: expected one of {', '.join(ROPE_MODES)}, got {rope!r}")
    qkv = np.asarray(qkv, dtype=np.float32)
    T = qkv.shape[0]
    Hq, Hkv, D = num_q_heads, num_kv_heads, head_dim
    q = qkv[:, : Hq * D].reshape(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].reshape(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D: (Hq + 2 * Hkv) * D].reshape(T, Hkv, D)
    return _write(q, k, v, slot_mapping, positions, k_pool, v_pool, q_out, block_size=block_size,
                  kv_dtype_name=kv_dtype_name(kv_dtype), int8_mode=int8_mode, k_scales=k_scales,
                  v_scales=v_scales, cos=cos, sin=sin, q_norm_weight=q_norm_weight,
                  k_norm_weight=k_norm_weight, eps=eps, rope=rope, status=status)


def paged_write_kv(keys, values, slot_mapping, k_pool, v_pool, *, block_size, kv_dtype="fp32",
                   int8_mode=INT8_MODE_AWAY, k_scales=None, v_scales=None, status=None):
    """Plain write of already-computed K and V rows (no norm, no RoPE; numpy reference).

    Parameters
    ----------
    keys, values : ndarray float32, shape ``[T, num_kv_heads, head_dim]``
    slot_mapping : ndarray int32, shape ``[T]``
    k_pool, v_pool, k_scales, v_scales, status
        As in :func:`paged_write_qkv`.

    Returns
    -------
    tuple
        Updated copies ``(k_pool, v_pool, k_scales, v_scales, status)``.
    """
    keys = np.asarray(keys, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    _, k_pool, v_pool, k_scales, v_scales, status = _write(
        None, keys, values, slot_mapping, np.zeros(keys.shape[0], np.int32), k_pool, v_pool, None,
        block_size=block_size, kv_dtype_name=kv_dtype_name(kv_dtype), int8_mode=int8_mode,
        k_scales=k_scales, v_scales=v_scales, cos=None, sin=None, q_norm_weight=None,
        k_norm_weight=None, eps=0.0, rope="none", status=status)
    return k_pool, v_pool, k_scales, v_scales, status


def kv_dtype_name(name) -> str:
    return kv_dtype(name).name
