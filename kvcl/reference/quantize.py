"""Numpy reference of kvcl's KV storage formats (the twin of ``kernels/common.h``).

Every function reproduces the kernels bit for bit: the arithmetic is float32 where the
kernels compute in float, and every rounding step is exact (power-of-two scaling, rint,
round-half-away-from-zero done in float64), so tests compare stored bytes with ``==``.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import INT8_MODE_AWAY, INT8_MODE_EVEN, KvDtype, kv_dtype

FLT_EPSILON = np.float32(np.finfo(np.float32).eps)

# (mantissa bits, minimum normal exponent, bias, max finite, NaN code)
_FP8 = {
    "e4m3": (3, -6, 7, 448.0, 0x7F),
    "e5m2": (2, -14, 15, 57344.0, 0x7E),
}


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (C ``round``), exact for every float32."""
    x64 = np.asarray(x, dtype=np.float64)
    return (np.sign(x64) * np.floor(np.abs(x64) + 0.5)).astype(np.float32)


# ---- fp8 ----------------------------------------------------------------------------------------

def fp8_encode(x: np.ndarray, fmt: str) -> np.ndarray:
    """Encode float32 values as OCP fp8 bytes (``fmt`` ``"e4m3"`` or ``"e5m2"``).

    Round to nearest even, saturating finite overflow and infinities to the largest finite
    value, subnormals kept, NaN to the format's NaN code (sign preserved).
    """
    man_bits, emin, bias, max_value, nan_code = _FP8[fmt]
    x = np.asarray(x, dtype=np.float32)
    sign = np.where(np.signbit(x), 0x80, 0).astype(np.uint8)
    a = np.minimum(np.abs(x), np.float32(max_value))
    _, e = np.frexp(a)
    ex = np.maximum(e - 1, emin)
    quantum = np.ldexp(np.float32(1.0), ex - man_bits).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.minimum(np.rint(a / quantum) * quantum, np.float32(max_value)).astype(np.float32)
    _, qe = np.frexp(q)
    qe = qe - 1
    sub = (q * np.ldexp(np.float32(1.0), man_bits - emin)).astype(np.int64)
    with np.errstate(invalid="ignore"):
        mant = ((q * np.ldexp(np.float32(1.0), -qe) - 1.0) * (1 << man_bits)).astype(np.float32)
    mant = np.nan_to_num(mant).astype(np.int64)
    normal = ((qe + bias) << man_bits) | mant
    body = np.where(q == 0, 0, np.where(qe < emin, sub, normal))
    body = np.where(np.isnan(x), nan_code, body)
    return (sign | body.astype(np.uint8)).astype(np.uint8)


def fp8_decode(b: np.ndarray, fmt: str) -> np.ndarray:
    """Decode OCP fp8 bytes to float32."""
    man_bits, emin, bias, _, _ = _FP8[fmt]
    b = np.asarray(b, dtype=np.uint8).astype(np.int64)
    exp_mask = (1 << (7 - man_bits)) - 1
    ex = (b >> man_bits) & exp_mask
    m = b & ((1 << man_bits) - 1)
    normal = np.ldexp(1.0 + m / float(1 << man_bits), ex - bias)
    sub = np.ldexp(m.astype(np.float64), emin - man_bits)
    v = np.where(ex == 0, sub, normal)
    if fmt == "e4m3":
        v = np.where((b & 0x7F) == 0x7F, np.nan, v)
    else:
        v = np.where(ex == exp_mask, np.where(m == 0, np.inf, np.nan), v)
    v = np.where(b & 0x80, -v, v)
    return v.astype(np.float32)


# ---- fp8 with a per-row scale (oxibonsai's Fp8KvLayer; FP8_ROW_SCALE in quantize.cl) ----------

def fp8_row_scale(absmax: np.ndarray, fmt: str) -> np.ndarray:
    """``max(absmax / FP8_MAX, FLT_EPSILON)`` in float32 (FP8_MAX 448 for e4m3, 57344 for e5m2)."""
    absmax = np.asarray(absmax, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.fmax(absmax / np.float32(_FP8[fmt][3]), FLT_EPSILON).astype(np.float32)


def quantize_fp8_rows_scaled(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scaled fp8 (last axis): ``scale = max(max|x| / FP8_MAX, FLT_EPSILON)``, bytes
    ``fp8_encode(x / scale)`` (quotients that round past FP8_MAX saturate).

    Returns ``(bytes uint8 with x's shape, scale float32 with the last axis dropped)``. As the
    kernel's ``fmax`` reduction, the absmax ignores NaN; an empty row has absmax 0.
    """
    x = np.asarray(x, dtype=np.float32)
    absmax = np.fmax.reduce(np.abs(x), axis=-1, initial=np.float32(0.0)).astype(np.float32)
    scale = fp8_row_scale(absmax, fmt)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scaled = (x / scale[..., None]).astype(np.float32)
        return fp8_encode(scaled, fmt), scale  # NaN: a discarded branch casts it


def dequantize_fp8_rows_scaled(b: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
    """``fp8_decode(b) * scale`` per row (float32)."""
    scale = np.asarray(scale, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return (fp8_decode(b, fmt) * scale[..., None]).astype(np.float32)


# ---- fp16 ---------------------------------------------------------------------------------------

def fp16_encode(x: np.ndarray) -> np.ndarray:
    """float32 → IEEE binary16 bits (uint16), round to nearest even (``vstore_half_rte``)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def fp16_decode(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


# ---- int8 ---------------------------------------------------------------------------------------

def int8_scale(absmax: np.ndarray, mode: int = INT8_MODE_AWAY) -> np.ndarray:
    """The float32 scale of each row from its absmax (see ``INT8_MODE`` in common.h)."""
    absmax = np.asarray(absmax, dtype=np.float32)
    if mode == INT8_MODE_EVEN:
        return (np.maximum(absmax, np.float32(1e-8)) / np.float32(127.0)).astype(np.float32)
    return np.maximum(absmax / np.float32(127.0), FLT_EPSILON).astype(np.float32)


def quantize_int8_rows(x: np.ndarray, mode: int = INT8_MODE_AWAY) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 per row (last axis).

    Returns ``(q, scale)``: ``q`` int8 with ``x``'s shape and ``scale`` with the last axis
    dropped — float32 for ``INT8_MODE_AWAY``, float16 bits (uint16) for ``INT8_MODE_EVEN``,
    as stored. ``x / scale`` uses the float32 scale in both modes.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = int8_scale(np.max(np.abs(x), axis=-1), mode)
    with np.errstate(invalid="ignore"):
        r = (x / scale[..., None]).astype(np.float32)
    r = np.rint(r) if mode == INT8_MODE_EVEN else round_half_away(r)
    q = np.clip(r, -127, 127).astype(np.int8)
    stored = fp16_encode(scale) if mode == INT8_MODE_EVEN else scale
    return q, stored


def dequantize_int8_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q * scale`` per row; ``scale`` float32, or uint16 fp16 bits (ferrum mode)."""
    scale = np.asarray(scale)
    if scale.dtype == np.uint16:
        scale = fp16_decode(scale)
    return (np.asarray(q, dtype=np.float32) * scale.astype(np.float32)[..., None]).astype(np.float32)


# ---- int4 ---------------------------------------------------------------------------------------
# Rotated asymmetric codes (kernels/common.h, "int4"): y = hadamard_rows(x); per row
# lo = fp16(min y), sc = fp16(max((max y - lo) / 15, FLT_EPSILON)), c = clip(round_half_away(
# (y - lo) / sc), 0, 15), byte j = c[2j] | c[2j+1] << 4, and the row's float32 scale slot holds the
# bits fp16(sc) | fp16(lo) << 16 (a minimum of -0 stored as +0).

INT4_MAXABS = np.float32(65504.0)  # |y| beyond the largest float16 has no float16 minimum


def hadamard_block(head_dim: int) -> int:
    """P, the order of int4's rotation: the largest power of two dividing ``head_dim``."""
    return head_dim & -head_dim if head_dim else 1


def hadamard_rows(x: np.ndarray) -> np.ndarray:
    """int4's rotation of each row (last axis): ``H x / sqrt(P)`` per P-block, float32.

    In-place butterflies ``(x_i, x_{i+h}) -> (x_i + x_{i+h}, x_i - x_{i+h})`` for h = 1, 2, ..
    P/2 over indices i with bit h clear, then the scaling by float32(1 / sqrt(P)): the kernels'
    operations in the same order, so the bits match. Orthonormal and symmetric: its own inverse
    (up to float32 rounding).
    """
    x = np.array(x, dtype=np.float32)
    d = x.shape[-1]
    p = hadamard_block(d)
    lead = x.shape[:-1]
    h = 1
    with np.errstate(invalid="ignore", over="ignore"):
        while h < p:
            v = x.reshape(lead + (d // (2 * h), 2, h))
            a, b = v[..., 0, :], v[..., 1, :]
            x = np.stack((a + b, a - b), axis=-2).reshape(lead + (d,))
            h *= 2
        return (x * np.float32(1.0 / np.sqrt(p))).astype(np.float32)


def pack_int4(c: np.ndarray) -> np.ndarray:
    """Codes in [0, 15] (last axis even) to bytes: ``c[2j] | c[2j+1] << 4``."""
    n = np.asarray(c).astype(np.uint8)
    return (n[..., 0::2] | (n[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(b: np.ndarray) -> np.ndarray:
    """Bytes back to codes (uint8 in [0, 15], last axis doubled): the inverse of :func:`pack_int4`."""
    b = np.asarray(b, dtype=np.uint8)
    c = np.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=np.uint8)
    c[..., 0::2] = b & 0xF
    c[..., 1::2] = b >> 4
    return c


def int4_slot(sc: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The float32 scale slot holding fp16 ``sc`` (low half) and fp16 ``lo`` (high half)."""
    bits = fp16_encode(sc).astype(np.uint32) | (fp16_encode(lo).astype(np.uint32) << 16)
    return bits.view(np.float32)


def int4_params(slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sc, lo)`` float32 of each row from its scale slot (the inverse of :func:`int4_slot`)."""
    bits = np.ascontiguousarray(slot, dtype=np.float32).view(np.uint32)
    return (fp16_decode((bits & 0xFFFF).astype(np.uint16)),
            fp16_decode((bits >> 16).astype(np.uint16)))


def int4_out_of_range(x: np.ndarray) -> np.ndarray:
    """Which rows int4 cannot store: a rotated value non-finite or beyond ±65504 (bool [...])."""
    x = np.asarray(x, dtype=np.float32)
    if not x.shape[-1]:
        return np.zeros(x.shape[:-1], bool)
    with np.errstate(invalid="ignore", over="ignore"):
        return ~(np.abs(hadamard_rows(x)).max(-1) <= INT4_MAXABS)


def quantize_int4_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int4 rows (last axis, even): ``(packed uint8 [..., d/2], scale slots float32 [...])``.

    A row int4 cannot store (:func:`int4_out_of_range`) gets codes 0 and a scale slot of two
    float16 NaN (it decodes as NaN), as ``kvcl.ops.quantize.quantize_rows`` stores it; the fused
    write refuses such rows instead.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % 2:
        raise ValueError(f"int4 packs two values per byte; head_dim must be even, got {x.shape[-1]}")
    y = hadamard_rows(x)
    if not y.shape[-1]:
        zero = np.zeros(x.shape[:-1], np.float32)
        return np.zeros(x.shape[:-1] + (0,), np.uint8), int4_slot(np.maximum(zero, FLT_EPSILON), zero)
    with np.errstate(invalid="ignore", over="ignore"):
        lo = y.min(-1).astype(np.float16).astype(np.float32) + np.float32(0)   # -0 -> +0
        sc = np.maximum(((y.max(-1) - lo) / np.float32(15)).astype(np.float32), FLT_EPSILON)
        sc = sc.astype(np.float16).astype(np.float32)
        r = round_half_away(((y - lo[..., None]) / sc[..., None]).astype(np.float32))
        c = np.nan_to_num(np.clip(r, 0, 15))
        bad = ~(np.abs(y).max(-1) <= INT4_MAXABS)
    c = np.where(bad[..., None], 0, c)
    bits = np.where(bad, np.uint32(0x7E007E00), int4_slot(sc, lo).view(np.uint32)).astype(np.uint32)
    return pack_int4(c), bits.view(np.float32)


def dequantize_int4_rows(b: np.ndarray, slot: np.ndarray, *, rotated: bool = False) -> np.ndarray:
    """Stored rows back to float32: ``c * sc + lo`` (the rotated basis with ``rotated=True``),
    rotated back by :func:`hadamard_rows` otherwise."""
    sc, lo = int4_params(slot)
    y = (unpack_int4(b).astype(np.float32) * sc[..., None] + lo[..., None]).astype(np.float32)
    return y if rotated else hadamard_rows(y)


# ---- any KV dtype -------------------------------------------------------------------------------

def encode_kv(x: np.ndarray, dtype: "str | KvDtype", *, int8_mode: int = INT8_MODE_AWAY
              ) -> tuple[np.ndarray, "np.ndarray | None"]:
    """Encode rows ``x[..., head_dim]`` (float32) into the storage of ``dtype``.

    Returns ``(data, scales)``; ``scales`` is ``None`` for formats without a row scale. int4's
    data has a last axis of ``head_dim / 2`` bytes.
    """
    dt = kv_dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    if dt.name == "fp32":
        return x.copy(), None
    if dt.name == "fp16":
        return fp16_encode(x), None
    if dt.name == "int8":
        return quantize_int8_rows(x, int8_mode)
    if dt.name == "int4":
        return quantize_int4_rows(x)
    return fp8_encode(x, dt.name.split("_")[1]), None


def decode_kv(data: np.ndarray, scales: "np.ndarray | None", dtype: "str | KvDtype") -> np.ndarray:
    """Stored rows back to float32 (scales applied for int8 and int4)."""
    dt = kv_dtype(dtype)
    if dt.name == "fp32":
        return np.asarray(data, dtype=np.float32).copy()
    if dt.name == "fp16":
        return fp16_decode(data)
    if dt.name == "int8":
        return dequantize_int8_rows(data, scales)
    if dt.name == "int4":
        return dequantize_int4_rows(data, scales)
    return fp8_decode(data, dt.name.split("_")[1])


def roundtrip(x: np.ndarray, dtype: "str | KvDtype", *, int8_mode: int = INT8_MODE_AWAY) -> np.ndarray:
    """What a value reads back as after being stored in ``dtype``."""
    data, scales = encode_kv(x, dtype, int8_mode=int8_mode)
    return decode_kv(data, scales, dtype)


# ---- the twins of kvcl.ops.quantize --------------------------------------------------------------

def _fp8_format(dtype: str | KvDtype, fp8_row_scale: bool) -> str | None:
    """``"e4m3"`` / ``"e5m2"`` when ``fp8_row_scale`` is set (refused for non-fp8 dtypes)."""
    if not fp8_row_scale:
        return None
    name = kv_dtype(dtype).name
    if not name.startswith("fp8_"):
        raise ValueError(f"fp8_row_scale: only for kv_dtype fp8_e4m3 or fp8_e5m2, got {name}")
    return name.split("_")[1]


def quantize_rows(x: np.ndarray, out: np.ndarray, *, scales: "np.ndarray | None" = None,
                  kv_dtype: "str | KvDtype", int8_mode: int = INT8_MODE_AWAY,
                  out_row_offset: int = 0, fp8_row_scale: bool = False
                  ) -> tuple[np.ndarray, "np.ndarray | None"]:
    """Numpy twin of :func:`kvcl.ops.quantize.quantize_rows` (inputs are not modified).

    Parameters
    ----------
    x : numpy.ndarray, float32, shape [N, head_dim]
    out : numpy.ndarray, the storage dtype, shape [..., head_dim]
        Treated as ``[R, head_dim]``.
    scales : numpy.ndarray, shape ``out.shape[:-1]`` or [R], optional
        int8: float32 (``int8_mode=0``) or fp16 bits uint16 (``int8_mode=1``); fp8 with
        ``fp8_row_scale``: float32.
    kv_dtype : str or KvDtype
    int8_mode : int
    out_row_offset : int
    fp8_row_scale : bool
        fp8 only: :func:`quantize_fp8_rows_scaled` instead of plain :func:`fp8_encode`.

    Returns
    -------
    (out, scales)
        Copies of ``out`` and ``scales`` (``None`` without scales) with rows
        ``[out_row_offset, out_row_offset + N)`` replaced by ``encode_kv(x)`` (or by
        :func:`quantize_fp8_rows_scaled` with ``fp8_row_scale``).
    """
    x = np.asarray(x, dtype=np.float32)
    fmt = _fp8_format(kv_dtype, fp8_row_scale)
    if fmt is not None:
        if scales is None:
            raise ValueError("scales: fp8_row_scale=True stores one float32 scale per row")
        data, row_scales = quantize_fp8_rows_scaled(x, fmt)
    else:
        data, row_scales = encode_kv(x, kv_dtype, int8_mode=int8_mode)
    new_out = np.array(out, copy=True)
    rows = new_out.reshape(-1, data.shape[-1])
    rows[out_row_offset:out_row_offset + len(x)] = data
    new_scales = None
    if scales is not None:
        new_scales = np.array(scales, copy=True)
        flat = new_scales.reshape(-1)
        flat[out_row_offset:out_row_offset + len(x)] = row_scales.view(flat.dtype)
    return new_out, new_scales


def dequantize_rows(data: np.ndarray, *, scales: "np.ndarray | None" = None,
                    kv_dtype: "str | KvDtype", int8_mode: int = INT8_MODE_AWAY,
                    row_offset: int = 0, num_rows: "int | None" = None,
                    fp8_row_scale: bool = False) -> np.ndarray:
    """Numpy twin of :func:`kvcl.ops.quantize.dequantize_rows`.

    Parameters
    ----------
    data : numpy.ndarray, the storage dtype, shape [..., head_dim]
        Treated as ``[R, head_dim]``.
    scales : numpy.ndarray, shape ``data.shape[:-1]`` or [R], optional
        int8 only: float32 (``int8_mode=0``) or fp16 as uint16 bits / float16 (``int8_mode=1``).
    kv_dtype : str or KvDtype
    int8_mode : int
        Only tells how to read ``scales``.
    row_offset, num_rows : int
        Rows ``[row_offset, row_offset + num_rows)`` (default: to the end).
    fp8_row_scale : bool
        fp8 only: :func:`dequantize_fp8_rows_scaled` with the float32 ``scales`` (required).

    Returns
    -------
    numpy.ndarray, float32, shape [num_rows, head_dim]
    """
    data = np.asarray(data)
    head_dim = data.shape[-1]
    rows = data.reshape(-1, head_dim)
    if num_rows is None:
        num_rows = len(rows) - row_offset
    picked = rows[row_offset:row_offset + num_rows]
    row_scales = None
    fmt = _fp8_format(kv_dtype, fp8_row_scale)
    if fmt is not None:
        if scales is None:
            raise ValueError("scales: fp8_row_scale=True needs the float32 row scales")
        row_scales = np.asarray(scales, dtype=np.float32).reshape(-1)[row_offset:row_offset + num_rows]
        return dequantize_fp8_rows_scaled(picked, row_scales, fmt)
    if scales is not None:
        row_scales = np.asarray(scales).reshape(-1)[row_offset:row_offset + num_rows]
        if int8_mode == INT8_MODE_EVEN:
            row_scales = row_scales.view(np.uint16)  # fp16 bits, decoded by decode_kv
    return decode_kv(picked, row_scales, kv_dtype)
