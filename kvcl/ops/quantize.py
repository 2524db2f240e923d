"""Launchers for ``kernels/quantize.cl``: float32 rows to any KV storage dtype and back.

The numerics are those of ``kernels/common.h`` (see :mod:`kvcl.dtypes`); the numpy twins
with the same names are in :mod:`kvcl.reference.quantize` and match the stored bytes exactly.
Storage arrays may have any number of dimensions: their last axis is ``head_dim`` and the rest
is flattened into rows, so a pool ``[num_blocks, num_kv_heads, block_size, head_dim]`` is
``R = num_blocks * num_kv_heads * block_size`` rows. int4 (two values per byte) stores a row in
``head_dim / 2`` bytes: its last axis is ``head_dim / 2`` (:meth:`kvcl.KvDtype.row_elems`).
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl

from .. import dtypes as _dtypes
from ..errors import InvalidArgument, ShapeError
from ..runtime import get_kernel
from ..validate import check_int
from ._launch import device_array, element_base, launch, resolve_queue

__all__ = ["quantize_rows", "dequantize_rows"]

_SOURCE = "quantize.cl"
_group_limits: dict[tuple, int] = {}
_MAX_LANES = 256      # one row rarely needs more; keeps the reduction tree short
_GROUP_TARGET = 128   # work-items per group when several short rows share one


def _check_fp8_row_scale(fp8_row_scale, dt) -> bool:
    """The ``fp8_row_scale`` keyword: a bool, True only with an fp8 ``kv_dtype``."""
    if not isinstance(fp8_row_scale, (bool, np.bool_)):
        raise InvalidArgument(f"fp8_row_scale: expected True or False, got {fp8_row_scale!r}")
    if fp8_row_scale and not dt.name.startswith("fp8_"):
        raise InvalidArgument(f"fp8_row_scale: only for kv_dtype fp8_e4m3 or fp8_e5m2, got {dt.name}")
    return bool(fp8_row_scale)


def _as_rows(name: str, arr, head_dim: int | None = None, per_elem: int = 1) -> tuple[int, int]:
    """(rows, head_dim) of an array whose last axis is head_dim / per_elem (int4 storage: 2)."""
    if len(arr.shape) < 1 or (head_dim is not None and arr.shape[-1] * per_elem != head_dim):
        want = (f"(..., {head_dim // per_elem})" if head_dim is not None else
                "(..., head_dim)" if per_elem == 1 else "(..., head_dim / 2)")
        raise ShapeError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    d = int(arr.shape[-1]) * per_elem
    return int(np.prod(arr.shape[:-1], dtype=np.int64)), d


_INT4_MAX_HEAD_DIM = 4096   # quantize_rows stages an int4 row in local memory (16 KiB)


def _check_int4(dt, int8_mode: int, head_dim: int, name: str) -> None:
    """int4: the one scale convention (int8_mode 0), an even head_dim, one that local memory holds."""
    dt.check_int8_mode(int8_mode)
    if dt.codes_per_elem > 1 and head_dim % 2:
        raise ShapeError(f"{name}: int4 packs two values per byte; head_dim must be even, got {head_dim}")
    if dt.codes_per_elem > 1 and head_dim > _INT4_MAX_HEAD_DIM:
        raise ShapeError(f"{name}: int4 rotates rows in local memory; head_dim must be <= "
                         f"{_INT4_MAX_HEAD_DIM}, got {head_dim}")


def _scale_dtypes(dt, int8_mode: int) -> tuple:
    if int8_mode == _dtypes.INT8_MODE_EVEN:
        return (np.uint16, np.float16)  # fp16 scales, as bits or as float16
    return (np.float32,)


def _check_scales(scales, dt, int8_mode: int, storage, rows: int, context, fp8_row_scale: bool = False):
    if fp8_row_scale:
        if scales is None:
            raise InvalidArgument(f"scales: fp8_row_scale=True stores one float32 scale per row; "
                                  f"pass scales=[{rows}] float32 array")
        dtypes = (np.float32,)
    elif not dt.has_scale:
        if scales is not None:
            hint = " (or fp8_row_scale=True for per-row scales)" if dt.name.startswith("fp8_") else ""
            raise InvalidArgument(f"scales: {dt.name} rows have no scale; pass scales=None{hint}")
        return None
    else:
        if scales is None:
            raise InvalidArgument(f"scales: {dt.name} stores one scale per row; pass scales=[{rows}] array")
        dtypes = _scale_dtypes(dt, int8_mode)
    shape = tuple(storage.shape[:-1]) if len(scales.shape) == len(storage.shape) - 1 else (rows,)
    return device_array("scales", scales, shape=shape, dtype=dtypes, context=context)


def _program_defines(dt, int8_mode: int, fp8_row_scale: bool = False) -> dict:
    defines = {"KV_DTYPE": dt.code, "INT8_MODE": int8_mode if dt.has_scale else 0}
    if fp8_row_scale:
        defines["FP8_ROW_SCALE"] = 1
    return defines


def _max_group(kernel: cl.Kernel, device: cl.Device) -> int:
    key = (kernel.int_ptr, device.int_ptr)
    limit = _group_limits.get(key)
    if limit is None:
        limit = min(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, device),
                    device.max_work_group_size)
        _group_limits[key] = limit
    return limit


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _launch_shape(kernel, device, num_rows: int, head_dim: int) -> tuple[int, int]:
    """(lanes per row, rows per group) within the kernel's and the device's limits."""
    limit = _max_group(kernel, device)
    item_sizes = device.max_work_item_sizes
    cap = min(limit, item_sizes[0], _MAX_LANES)
    lanes = min(_pow2_floor(cap), 1 << max(head_dim - 1, 0).bit_length())
    rows = max(1, min(_GROUP_TARGET // lanes, limit // lanes, item_sizes[1], num_rows))
    # Local memory: lanes * rows floats, at most _GROUP_TARGET * 4 or 1 KiB, below every device's 32 KiB.
    return lanes, rows


def quantize_rows(x, out, *, scales=None, kv_dtype, int8_mode: int = 0, out_row_offset: int = 0,
                  fp8_row_scale: bool = False, queue=None, wait_for=None) -> cl.Event:
    """Encode float32 rows into a KV storage dtype on the device.

    Parameters
    ----------
    x : pyopencl.array.Array, float32, shape [N, head_dim]
        The rows to store.
    out : pyopencl.array.Array, the storage dtype of ``kv_dtype``, shape [..., head_dim]
        Treated as ``[R, head_dim]`` (leading axes flattened); rows
        ``[out_row_offset, out_row_offset + N)`` are written, the others are untouched.
        Storage dtypes: fp32 float32, fp16 uint16 (binary16 bits), int8 int8, fp8 uint8, int4
        uint8 with a last axis of ``head_dim / 2`` (two values per byte).
    scales : pyopencl.array.Array, shape ``out.shape[:-1]`` or [R], optional
        int8 and int4 (required then): one scale per row, float32 for ``int8_mode=0``, float16 or
        its uint16 bits for ``int8_mode=1``. fp8 with ``fp8_row_scale=True`` (required then):
        float32. Written at the same rows as ``out``; refused for the other cases.
    kv_dtype : str or KvDtype
        ``"fp32"``, ``"fp16"``, ``"int8"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"int4"``
        (rows rotated, codes 0..15 between the row's minimum and maximum, the scale and the
        minimum as two float16 in the float32 scale slot; see :mod:`kvcl.dtypes`).
    int8_mode : int
        0: ``scale = max(absmax/127, FLT_EPSILON)`` (float32), round half away from zero
        (kvcl's engine, oxibonsai). 1: ``scale = max(absmax, 1e-8)/127`` stored as fp16,
        round half to even (ferrum). Ignored for the scale-free dtypes; int4 takes 0 only.
    out_row_offset : int
        First row of ``out`` (and ``scales``) to write.
    fp8_row_scale : bool
        fp8 dtypes only: scale each row as oxibonsai's ``Fp8KvLayer`` does,
        ``scale = max(absmax / FP8_MAX, FLT_EPSILON)`` (float32, FP8_MAX 448 for E4M3, 57344 for
        E5M2), store ``fp8(x / scale)`` (correctly rounded division; quotients that round past
        FP8_MAX saturate) and the scale. With ``head_dim == 0`` the rows' scales are still
        written (``FLT_EPSILON``). Default False: plain fp8, no scale.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``out``'s (or ``x``'s) queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
        The kernel's completion event (a marker when ``N == 0``).

    Notes
    -----
    Non-finite input is not checked on the device: fp formats encode NaN as NaN and saturate
    ±Inf; for int8 the absmax ignores NaN (which encodes to 0) and ±Inf makes the scale Inf.
    Callers that promise finite data validate it on the host first.

    Examples
    --------
    >>> import pyopencl.array as cla, numpy as np, kvcl          # doctest: +SKIP
    >>> dev = kvcl.Device(); q = dev.queue                       # doctest: +SKIP
    >>> x = cla.to_device(q, np.array([[127, -127, 0]], np.float32))        # doctest: +SKIP
    >>> data = cla.empty(q, (1, 3), np.int8); s = cla.empty(q, (1,), np.float32)  # doctest: +SKIP
    >>> quantize_rows(x, data, scales=s, kv_dtype="int8").wait()  # doctest: +SKIP
    >>> data.get(), s.get()                                        # doctest: +SKIP
    (array([[ 127, -127,    0]], dtype=int8), array([1.], dtype=float32))
    """
    dt = _dtypes.kv_dtype(kv_dtype)
    int8_mode = check_int("int8_mode", int8_mode, low=0, high=2)
    fp8_row_scale = _check_fp8_row_scale(fp8_row_scale, dt)
    queue = resolve_queue(queue, out=out, x=x)
    context = queue.context
    device_array("x", x, ndim=2, dtype=np.float32, context=context)
    num_rows, head_dim = int(x.shape[0]), int(x.shape[1])
    _check_int4(dt, int8_mode, head_dim, "x")
    device_array("out", out, dtype=dt.storage, context=context)
    total_rows, _ = _as_rows("out", out, head_dim, dt.codes_per_elem)
    scales = _check_scales(scales, dt, int8_mode, out, total_rows, context, fp8_row_scale)
    if num_rows > total_rows:
        raise ShapeError(f"x: {num_rows} rows do not fit in out's {total_rows} rows")
    out_row_offset = check_int("out_row_offset", out_row_offset, low=0, high=total_rows - num_rows + 1)
    check_int("x.shape[1] (head_dim)", head_dim, high=2**32)
    check_int("x.shape[0] (rows)", num_rows, high=2**32)
    if num_rows == 0 or (head_dim == 0 and not fp8_row_scale):
        return cl.enqueue_marker(queue, wait_for=wait_for)

    kernel = get_kernel(context, _SOURCE, "quantize_rows", _program_defines(dt, int8_mode, fp8_row_scale))
    lanes, rows_per_group = _launch_shape(kernel, queue.device, num_rows, head_dim)
    scratch = lanes
    if dt.codes_per_elem > 1:   # int4 stages its rows: head_dim + lanes floats each, <= 32 KiB in all
        scratch = head_dim + lanes
        rows_per_group = max(1, min(rows_per_group, 8192 // scratch))
    groups = -(-num_rows // rows_per_group)
    scale_buf, scale_base = None, 0
    if scales is not None:
        scale_buf, scale_base = scales.base_data, element_base(scales) + out_row_offset
    args = (x.base_data, np.uint64(element_base(x)),
            out.base_data, np.uint64(element_base(out) + out_row_offset * dt.row_elems(head_dim)),
            scale_buf, np.uint64(scale_base),
            np.uint32(num_rows), np.uint32(head_dim),
            cl.LocalMemory(4 * scratch * rows_per_group))
    return launch(queue, kernel, (lanes, groups * rows_per_group), (lanes, rows_per_group), args,
                  wait_for)


def dequantize_rows(data, out, *, scales=None, kv_dtype, int8_mode: int = 0, row_offset: int = 0,
                    num_rows: int | None = None, fp8_row_scale: bool = False, queue=None,
                    wait_for=None) -> cl.Event:
    """Decode stored rows back to float32 on the device.

    Parameters
    ----------
    data : pyopencl.array.Array, the storage dtype of ``kv_dtype``, shape [..., head_dim]
        (int4: [..., head_dim / 2] bytes). Treated as ``[R, head_dim]``; rows ``[row_offset, row_offset + num_rows)`` are decoded.
    out : pyopencl.array.Array, float32, shape [num_rows, head_dim] (or any shape of that many rows)
    scales : pyopencl.array.Array, shape ``data.shape[:-1]`` or [R], optional
        int8 and int4 (required then): float32 for ``int8_mode=0``, float16 / uint16 bits for 1 (int8).
        fp8 with ``fp8_row_scale=True`` (required then): float32.
    kv_dtype : str or KvDtype
    int8_mode : int
        Selects the scale dtype (0: float32, 1: fp16); the decode is ``q * scale`` in both.
    row_offset : int
    num_rows : int, optional
        Defaults to ``R - row_offset``.
    fp8_row_scale : bool
        fp8 dtypes only: the decode is ``fp8_decode(byte) * scale`` (float32), the inverse of
        :func:`quantize_rows` with the same keyword.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``out``'s (or ``data``'s) queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Examples
    --------
    >>> out = cla.empty(q, (1, 3), np.float32)                                # doctest: +SKIP
    >>> dequantize_rows(data, out, scales=s, kv_dtype="int8").wait()          # doctest: +SKIP
    >>> out.get()                                                             # doctest: +SKIP
    array([[ 127., -127.,    0.]], dtype=float32)
    """
    dt = _dtypes.kv_dtype(kv_dtype)
    int8_mode = check_int("int8_mode", int8_mode, low=0, high=2)
    fp8_row_scale = _check_fp8_row_scale(fp8_row_scale, dt)
    queue = resolve_queue(queue, out=out, data=data)
    context = queue.context
    device_array("data", data, dtype=dt.storage, context=context)
    total_rows, head_dim = _as_rows("data", data, per_elem=dt.codes_per_elem)
    _check_int4(dt, int8_mode, head_dim, "data")
    scales = _check_scales(scales, dt, int8_mode, data, total_rows, context, fp8_row_scale)
    row_offset = check_int("row_offset", row_offset, low=0, high=total_rows + 1)
    if num_rows is None:
        num_rows = total_rows - row_offset
    num_rows = check_int("num_rows", num_rows, low=0, high=total_rows - row_offset + 1)
    device_array("out", out, dtype=np.float32, context=context)
    out_rows, _ = _as_rows("out", out, head_dim)
    if out_rows != num_rows:
        raise ShapeError(f"out: expected shape ({num_rows}, {head_dim}), got {tuple(out.shape)}")
    check_int("data.shape[-1] (head_dim)", head_dim, high=2**32)
    total = num_rows * head_dim
    if total == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)

    kernel = get_kernel(context, _SOURCE, "dequantize_rows", _program_defines(dt, int8_mode, fp8_row_scale))
    scale_buf, scale_base = None, 0
    if scales is not None:
        scale_buf, scale_base = scales.base_data, element_base(scales) + row_offset
    local = 64
    items = num_rows if dt.codes_per_elem > 1 else total   # int4: one work-item per row
    args = (data.base_data, np.uint64(element_base(data) + row_offset * dt.row_elems(head_dim)),
            scale_buf, np.uint64(scale_base),
            out.base_data, np.uint64(element_base(out)),
            np.uint32(head_dim), np.uint64(total))
    return launch(queue, kernel, (-(-items // local) * local,), None, args, wait_for)
