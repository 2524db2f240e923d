"""Launchers of the fused paged write (``kernels/paged_write.cl``).

:func:`paged_write_qkv` splits packed QKV rows, applies the optional RMS q/k-norm and RoPE,
writes Q (rotated) to ``q_out`` and K, V quantized into the paged pools at ``slot_mapping``.
:func:`paged_write_kv` writes already-computed K and V rows with the same kernel (no Q, no
norm, no RoPE). Both validate every argument before enqueueing and return the ``cl.Event``.

Errors the kernel can only see on the device are reported in ``status[0]`` (int32 bits, OR-ed,
never cleared by the kernel; the caller reads it when it next synchronises and raises):

* ``1``: a K or V row held NaN/Inf after norm and RoPE and was not written (its slot keeps
  its old bytes; the token's other rows are written);
* ``2``: a slot ``>= num_blocks · block_size``: that token's K and V were not written;
* ``4``: with RoPE, a position outside ``[0, cos.shape[0])``: nothing of that token was written.

A negative slot is padding: the token's K and V are skipped, its Q is written.
The numpy twin is :mod:`kvcl.reference.paged_write`.
"""

from __future__ import annotations

import math

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from ..dtypes import INT4 as _INT4, INT8_MODE_AWAY, INT8_MODE_EVEN, kv_dtype as _kv_dtype
from ..errors import DeviceMismatchError, InvalidArgument
from ..reference.paged_write import (ROPE_MODES, STATUS_BAD_POSITION, STATUS_BAD_SLOT,
                                     STATUS_NONFINITE)
from ..runtime import get_kernel, work_items_are_threads
from ..validate import check_float, check_int
from ._launch import Launch, device_array, element_base, enqueue

__all__ = ["paged_write_qkv", "paged_write_kv", "launch_config", "row_vec", "STATUS_NONFINITE",
           "STATUS_BAD_SLOT", "STATUS_BAD_POSITION", "ROPE_MODES"]

_SOURCE = "paged_write.cl"
_ROPE_CODE = {"none": 0, "half": 1, "interleaved": 2}
_INT_MAX = 2**31 - 1

_config_cache: dict = {}


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def launch_config(device: cl.Device, head_dim: int, num_rows: int, stage: bool = False) -> tuple[int, int]:
    """``(LX, ROWS)``: work-items per row and rows per work-group, from the device's limits.

    GPUs get LX = up to 32 work-items per row (one or two rotation pairs each) and about 256
    work-items per group; CPUs (PoCL, where work-items of a group become one vectorised loop and
    every barrier costs a loop split) get LX = 1 and a group of up to 16 whole rows (only where
    the row kernel of :func:`row_vec` cannot be used).
    Both are capped by ``max_work_group_size``, ``max_work_item_sizes`` and ``local_mem_size``
    (``stage``: each row also stages its ``head_dim`` floats there, int4 with non-interleaved
    pairs).
    """
    max_wg = int(device.max_work_group_size)
    sizes = [int(s) for s in device.max_work_item_sizes]
    local_mem = int(device.local_mem_size)
    half = head_dim // 2
    if work_items_are_threads(device):
        lx, target = 1, 16
    else:
        lx, target = min(32, _pow2_floor(half)), 256
    lx = max(1, min(lx, _pow2_floor(min(max_wg, sizes[0]))))
    rows = max(1, min(target // lx, num_rows, max_wg // lx, sizes[1]))
    # local memory: one float per work-item for the reductions (+ the staged row); keep well
    # under the limit
    per_row = lx + (head_dim if stage else 0)
    while rows > 1 and rows * per_row * 4 > local_mem // 4:
        rows //= 2
    return lx, rows


def row_vec(device: cl.Device, head_dim: int, rope: str, align: int) -> int:
    """``ROW_VEC`` of the CPU row kernel (``paged_write_rows``), or 0 for the work-group kernel.

    CPUs get one work-item per (token, head row) holding the row in ``ROW_VEC``-wide vectors:
    the largest of 16, 8, 4, 2 dividing ``head_dim`` (``head_dim / 2`` for half RoPE) and
    ``align`` (every source element offset and token stride), so that every vector access is
    naturally aligned.  16 measured ~6-15% faster than 8 on PoCL / AVX2 (LLVM splits it in two
    registers; fewer loop trips, 16-byte int8 stores).  GPUs, and rows no width fits, use the
    work-group kernel.
    """
    if not work_items_are_threads(device):
        return 0
    for vec in (16, 8, 4, 2):
        if head_dim % vec or (rope == "half" and (head_dim // 2) % vec) or align % vec:
            continue
        return vec
    return 0


def _row_rows(device: cl.Device, num_rows: int) -> int:
    """Rows per work-group of the row kernel: a whole token where the device allows."""
    limit = min(int(device.max_work_group_size), int(device.max_work_item_sizes[1]), 64)
    groups = -(-num_rows // limit)
    return max(1, -(-num_rows // groups))  # balanced: little padding when num_rows > limit


# Tests set this to (LX, ROWS, TREE_REDUCE) to exercise GPU-shaped launches on any device,
# or _force_row_vec to a ROW_VEC (2, 4, 8, 16) to run the CPU row kernel on any device.
_force_config: "tuple[int, int, int] | None" = None
_force_row_vec: "int | None" = None


def _kernel(context: cl.Context, device: cl.Device, defines: dict, head_dim: int, num_rows: int,
            rope: str = "none", align: int = 0):
    """Build (memoized) with a local size the compiled kernel accepts: ``(kernel, LX, ROWS)``."""
    vec = 0
    if _force_config is None:
        vec = _force_row_vec if _force_row_vec is not None else row_vec(device, head_dim, rope, align)
    key = (context.int_ptr, device.int_ptr, tuple(sorted(defines.items())), num_rows, _force_config, vec)
    hit = _config_cache.get(key)
    if hit is not None:
        return hit
    if vec:
        rows = _row_rows(device, num_rows)
        while True:
            kernel = get_kernel(context, _SOURCE, "paged_write_rows", dict(defines, ROW_VEC=vec, ROWS=rows), device)
            limit = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, device)
            if rows <= limit or rows == 1:
                break
            rows //= 2
        _config_cache[key] = (kernel, 1, rows)
        return kernel, 1, rows
    if _force_config is not None:
        lx, rows, tree = _force_config
    else:
        stage = defines["KV_DTYPE"] == _INT4.code   # int4 rotates its rows in local memory
        lx, rows = launch_config(device, head_dim, num_rows, stage)
        # CPUs: one barrier and a serial sum beat a halving loop of barriers (TREE_REDUCE)
        tree = 0 if work_items_are_threads(device) else 1
    while True:
        full = dict(defines, LX=lx, ROWS=rows, TREE_REDUCE=tree if lx > 1 else 1)
        kernel = get_kernel(context, _SOURCE, "paged_write", full, device)
        limit = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, device)
        if lx * rows <= limit or (lx == 1 and rows == 1):
            break
        if rows > 1:
            rows //= 2
        else:
            lx //= 2
    _config_cache[key] = (kernel, lx, rows)
    return kernel, lx, rows


def _check_whole(name: str, x) -> None:
    """The kernel addresses these buffers from their start: no views with an offset or strides."""
    if x.offset != 0 or not x.flags.c_contiguous:
        raise InvalidArgument(f"{name}: expected a contiguous array starting at its buffer's "
                              f"beginning (offset 0), got a view (offset {x.offset} bytes, "
                              f"strides {x.strides}); pass a copy")


def _check_pools(k_pool, v_pool, k_scales, v_scales, *, dt, int8_mode, num_kv_heads, head_dim,
                 block_size, context):
    device_array("k_pool", k_pool, shape=(None, num_kv_heads, block_size, dt.row_elems(head_dim)),
                dtype=dt.storage, context=context)
    device_array("v_pool", v_pool, shape=tuple(k_pool.shape), dtype=dt.storage, context=context)
    _check_whole("k_pool", k_pool)
    _check_whole("v_pool", v_pool)
    if dt.has_scale:
        scale_dtype = np.uint16 if int8_mode == INT8_MODE_EVEN else np.float32
        for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
            if sc is None:
                raise InvalidArgument(f"{name}: required with kv_dtype {dt.name!r}")
            device_array(name, sc, shape=tuple(k_pool.shape[:3]), dtype=scale_dtype, context=context)
            _check_whole(name, sc)
    else:
        for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
            if sc is not None:
                raise InvalidArgument(f"{name}: only used with kv_dtype 'int8' or 'int4', got kv_dtype {dt.name!r}")
    num_slots = int(k_pool.shape[0]) * block_size
    if num_slots > _INT_MAX or k_pool.size > 2**62:
        raise InvalidArgument(f"k_pool: {num_slots} slots do not fit the kernel's int32 slot index")
    return num_slots


def _check_status(status, context):
    if status is not None:
        device_array("status", status, shape=(1,), dtype=np.int32, context=context)
        _check_whole("status", status)


def _resolve_kv_dtype(kv_dtype, int8_mode):
    try:
        dt = _kv_dtype(kv_dtype)
    except InvalidArgument as exc:
        raise InvalidArgument(f"kv_dtype: {str(exc).split(': ', 1)[1]}") from None
    int8_mode = check_int("int8_mode", int8_mode, low=INT8_MODE_AWAY, high=INT8_MODE_EVEN + 1)
    dt.check_int8_mode(int8_mode)
    return dt, int8_mode


def _resolve_queue(queue, first, context):
    if queue is None:
        queue = first.queue
        if queue is None:
            raise InvalidArgument("queue: none given and the first array has no queue")
    if queue.context != context:
        raise DeviceMismatchError("queue: belongs to another OpenCL context than the arrays")
    return queue


def _ready(kernel, lx, rows, num_rows, num_tokens, args) -> Launch:
    return Launch(kernel, (lx, -(-num_rows // rows) * rows, num_tokens), (lx, rows, 1), args)


def _add_event(event, outputs):
    for arr in outputs:
        if arr is not None:
            arr.add_event(event)


def _empty_event(queue, wait_for):
    return cl.enqueue_marker(queue, wait_for=wait_for)


def paged_write_qkv(qkv, slot_mapping, positions, k_pool, v_pool, q_out, *, num_q_heads,
                    num_kv_heads, head_dim, block_size, kv_dtype="fp32", int8_mode=0,
                    k_scales=None, v_scales=None, cos=None, sin=None, q_norm_weight=None,
                    k_norm_weight=None, eps=1e-6, rope="half", status=None, queue=None,
                    wait_for=None) -> "cl.Event":
    """Split packed QKV rows, norm, rotate, quantize and scatter K/V into the paged pools.

    Per token ``t``: Q heads → optional RMS norm (``q_norm_weight``) → RoPE at ``positions[t]``
    → ``q_out[t]``; K heads → optional RMS norm (``k_norm_weight``) → RoPE → encoded into
    ``k_pool`` at ``slot_mapping[t]``; V heads → encoded into ``v_pool`` unchanged.
    RMS norm is ``x · rsqrt(mean(x²) + eps) · w``; all maths in float32.

    Parameters
    ----------
    qkv : pyopencl.array.Array float32, shape ``[T, (num_q_heads + 2·num_kv_heads)·head_dim]``
        Per token: all Q heads, then the K heads, then the V heads.
    slot_mapping : Array int32, shape ``[T]``
        ``block_id · block_size + offset_in_block``; negative: skip the token's K and V.
    positions : Array int32, shape ``[T]``
        The row of ``cos`` / ``sin`` used for each token (not read with ``rope="none"``).
    k_pool, v_pool : Array, shape ``[num_blocks, num_kv_heads, block_size, head_dim]``
        Storage of ``kv_dtype``: float32 (fp32), uint16 fp16 bits (fp16), int8 (int8),
        uint8 (fp8_e4m3, fp8_e5m2; int4 with a last axis of ``head_dim / 2`` bytes, two codes
        each).
    q_out : Array float32, shape ``[T, num_q_heads, head_dim]``
        Receives Q after norm and RoPE.
    num_q_heads, num_kv_heads, head_dim, block_size : int
        ``head_dim`` must be even.
    kv_dtype : {"fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"}
    int8_mode : {0, 1}
        0: float32 scales ``max(absmax/127, FLT_EPSILON)``, round half away from zero (kvcl);
        1: fp16 scales ``max(absmax, 1e-8)/127``, round half to even (ferrum's KvInt8).
        int4: 0 only (rotated rows, codes 0..15, float16 scale and minimum: :mod:`kvcl.dtypes`).
    k_scales, v_scales : Array, shape ``[num_blocks, num_kv_heads, block_size]``
        int8 and int4 only (required then): float32 for ``int8_mode`` 0, uint16 fp16 bits for 1.
        One scale per (token, kv head) row, from the row's absmax after norm and RoPE.
    cos, sin : Array float32, shape ``[max_position, head_dim // 2]``
        Required unless ``rope="none"``.
    q_norm_weight, k_norm_weight : Array float32, shape ``[head_dim]``, optional
        Each enables the RMS norm of its heads.
    eps : float
    rope : {"none", "half", "interleaved"}
        Half-split pairs ``(i, i + D/2)`` or interleaved pairs ``(2i, 2i + 1)``.
    status : Array int32, shape ``[1]``, optional
        Error bits OR-ed in by the kernel (see the module docstring); a scratch one if None.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``qkv.queue``.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
    """
    dt, int8_mode = _resolve_kv_dtype(kv_dtype, int8_mode)
    Hq = check_int("num_q_heads", num_q_heads, low=1)
    Hkv = check_int("num_kv_heads", num_kv_heads, low=1)
    D = check_int("head_dim", head_dim, low=2)
    if D % 2:
        raise InvalidArgument(f"head_dim: expected an even number, got {D}")
    bs = check_int("block_size", block_size, low=1)
    if not isinstance(rope, str) or rope not in ROPE_MODES:
        raise InvalidArgument(f"rope: expected one of {', '.join(ROPE_MODES)}, got {rope!r}")
    eps = check_float("eps", eps)

    device_array("qkv", qkv, shape=(None, (Hq + 2 * Hkv) * D), dtype=np.float32)
    context = qkv.context
    T = int(qkv.shape[0])
    device_array("slot_mapping", slot_mapping, shape=(T,), dtype=np.int32, context=context)
    device_array("positions", positions, shape=(T,), dtype=np.int32, context=context)
    _check_whole("slot_mapping", slot_mapping)
    _check_whole("positions", positions)
    num_slots = _check_pools(k_pool, v_pool, k_scales, v_scales, dt=dt, int8_mode=int8_mode,
                             num_kv_heads=Hkv, head_dim=D, block_size=bs, context=context)
    device_array("q_out", q_out, shape=(T, Hq, D), dtype=np.float32, context=context)
    _check_whole("q_out", q_out)
    max_position = 0
    if rope != "none":
        for name, tab in (("cos", cos), ("sin", sin)):
            if tab is None:
                raise InvalidArgument(f"{name}: required with rope={rope!r}")
            device_array(name, tab, shape=(None, D // 2), dtype=np.float32, context=context)
            _check_whole(name, tab)
        device_array("sin", sin, shape=tuple(cos.shape), dtype=np.float32, context=context)
        max_position = int(cos.shape[0])
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            device_array(name, w, shape=(D,), dtype=np.float32, context=context)
            _check_whole(name, w)
    _check_status(status, context)
    row = (Hq + 2 * Hkv) * D
    if T * row + element_base(qkv) > _INT_MAX:
        raise InvalidArgument(f"qkv: {T} tokens of {row} floats exceed the kernel's int32 indexing; "
                              "write in chunks")
    queue = _resolve_queue(queue, qkv, context)
    wait_for = list(wait_for) if wait_for else None

    if status is None:
        status = cl_array.zeros(queue, 1, np.int32)
    if T == 0:
        return _empty_event(queue, wait_for)
    event = launch_qkv_buffers(
        queue, qkv.base_data, element_base(qkv), slot_mapping.data, positions.data, k_pool.data,
        v_pool.data, q_out.data, None if k_scales is None else k_scales.data,
        None if v_scales is None else v_scales.data,
        None if cos is None or rope == "none" else cos.data,
        None if sin is None or rope == "none" else sin.data,
        None if q_norm_weight is None else q_norm_weight.data,
        None if k_norm_weight is None else k_norm_weight.data, status.data, num_tokens=T,
        num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=bs, kvd=dt, int8_mode=int8_mode,
        num_slots=num_slots, max_position=max_position, eps=eps, rope=rope, wait_for=wait_for)
    _add_event(event, (q_out, k_pool, v_pool, k_scales, v_scales, status))
    return event


def launch_qkv_buffers(queue, *args, wait_for=None, **kwargs) -> cl.Event:
    """Enqueue the fused write on ``pyopencl.Buffer`` arguments (None for an absent optional
    one), with no argument checks: for a caller that made and validated every buffer itself
    (:class:`kvcl.PagedKVCache`). Arguments as :func:`qkv_launch`."""
    return enqueue(queue, [qkv_launch(queue, *args, **kwargs)], wait_for)


#: the positions of the ``qkv`` buffer in :func:`qkv_launch`'s arguments (Q, K and V views),
#: and of the pools in its and :func:`kv_launch`'s
QKV_ARGS = (0, 3, 6)
K_POOL_ARG, V_POOL_ARG, K_SCALES_ARG, V_SCALES_ARG = 18, 19, 20, 21


def qkv_launch(queue, qkv, qkv_base, slot_mapping, positions, k_pool, v_pool, q_out, k_scales,
               v_scales, cos, sin, q_norm_weight, k_norm_weight, status, *, num_tokens,
               num_q_heads, num_kv_heads, head_dim, block_size, kvd, int8_mode, num_slots,
               max_position, eps, rope) -> Launch:
    """The fused write's :class:`~kvcl.ops._launch.Launch` on ``pyopencl.Buffer`` arguments.
    Arguments mean what they mean in :func:`paged_write_qkv`; ``qkv_base`` is the element
    offset of row 0 in ``qkv`` (``qkv`` is argument :data:`QKV_ARGS` of the launch),
    ``num_slots`` the pool's ``num_blocks · block_size``, ``kvd`` a :class:`kvcl.dtypes.KvDtype`."""
    Hq, Hkv, D = num_q_heads, num_kv_heads, head_dim
    defines = {"KV_DTYPE": kvd.code, "INT8_MODE": int8_mode if kvd.has_scale else 0,
               "HEAD_DIM": D, "ROPE": _ROPE_CODE[rope],
               "Q_NORM": int(q_norm_weight is not None), "K_NORM": int(k_norm_weight is not None)}
    num_rows = Hq + 2 * Hkv
    row = num_rows * D
    align = math.gcd(qkv_base, row, Hq * D)
    kernel, lx, rows = _kernel(queue.context, queue.device, defines, D, num_rows, rope, align)
    stride = np.int32(row)
    args = (qkv, np.int32(qkv_base), stride,
            qkv, np.int32(qkv_base + Hq * D), stride,
            qkv, np.int32(qkv_base + (Hq + Hkv) * D), stride,
            slot_mapping, positions, cos, sin, np.int32(max_position), q_norm_weight, k_norm_weight,
            np.float32(eps), q_out, k_pool, v_pool, k_scales, v_scales, status,
            np.int32(Hq), np.int32(Hkv), np.int32(block_size), np.int32(num_slots))
    return _ready(kernel, lx, rows, num_rows, num_tokens, args)


def paged_write_kv(keys, values, slot_mapping, k_pool, v_pool, *, block_size, kv_dtype="fp32",
                   int8_mode=0, k_scales=None, v_scales=None, status=None, queue=None,
                   wait_for=None) -> "cl.Event":
    """Write already-computed K and V rows into the paged pools (no norm, no RoPE).

    Same kernel as :func:`paged_write_qkv` with no Q heads.

    Parameters
    ----------
    keys, values : pyopencl.array.Array float32, shape ``[T, num_kv_heads, head_dim]``
        ``head_dim`` even.
    slot_mapping : Array int32, shape ``[T]``
        ``block_id · block_size + offset_in_block``; negative: skip the token.
    k_pool, v_pool : Array, shape ``[num_blocks, num_kv_heads, block_size, head_dim]``
        Storage dtype of ``kv_dtype`` (see :func:`paged_write_qkv`).
    block_size : int
    kv_dtype : {"fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"}
    int8_mode : {0, 1}
    k_scales, v_scales : Array, shape ``[num_blocks, num_kv_heads, block_size]``
        int8 and int4 only: float32 (``int8_mode`` 0) or uint16 fp16 bits (``int8_mode`` 1).
    status : Array int32, shape ``[1]``, optional
        Error bits (1: non-finite row not written; 2: slot out of range); scratch if None.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``keys.queue``.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
    """
    dt, int8_mode = _resolve_kv_dtype(kv_dtype, int8_mode)
    bs = check_int("block_size", block_size, low=1)
    device_array("keys", keys, ndim=3, dtype=np.float32)
    context = keys.context
    T, Hkv, D = (int(s) for s in keys.shape)
    if Hkv < 1:
        raise InvalidArgument(f"keys: expected at least one kv head, got shape {tuple(keys.shape)}")
    if D < 2 or D % 2:
        raise InvalidArgument(f"keys: expected an even head_dim (last axis), got {D}")
    device_array("values", values, shape=(T, Hkv, D), dtype=np.float32, context=context)
    device_array("slot_mapping", slot_mapping, shape=(T,), dtype=np.int32, context=context)
    _check_whole("slot_mapping", slot_mapping)
    num_slots = _check_pools(k_pool, v_pool, k_scales, v_scales, dt=dt, int8_mode=int8_mode,
                             num_kv_heads=Hkv, head_dim=D, block_size=bs, context=context)
    _check_status(status, context)
    for name, x in (("keys", keys), ("values", values)):
        if x.size + element_base(x) > _INT_MAX:
            raise InvalidArgument(f"{name}: too many elements for the kernel's int32 indexing; write in chunks")
    queue = _resolve_queue(queue, keys, context)
    wait_for = list(wait_for) if wait_for else None

    if status is None:
        status = cl_array.zeros(queue, 1, np.int32)
    if T == 0:
        return _empty_event(queue, wait_for)
    event = launch_kv_buffers(queue, keys.base_data, element_base(keys), values.base_data, element_base(values),
                      slot_mapping.data, k_pool.data, v_pool.data,
                      None if k_scales is None else k_scales.data,
                      None if v_scales is None else v_scales.data, status.data, num_tokens=T,
                      num_kv_heads=Hkv, head_dim=D, block_size=bs, kvd=dt, int8_mode=int8_mode,
                      num_slots=num_slots, wait_for=wait_for)
    _add_event(event, (k_pool, v_pool, k_scales, v_scales, status))
    return event


def launch_kv_buffers(queue, *args, wait_for=None, **kwargs) -> cl.Event:
    """:func:`paged_write_kv` on ``pyopencl.Buffer`` arguments with no argument checks (see
    :func:`launch_qkv_buffers`); arguments as :func:`kv_launch`."""
    return enqueue(queue, [kv_launch(queue, *args, **kwargs)], wait_for)


#: the positions of the ``keys`` and ``values`` buffers in :func:`kv_launch`'s arguments
KV_ARGS = (3, 6)


def kv_launch(queue, keys, keys_base, values, values_base, slot_mapping, k_pool, v_pool, k_scales,
              v_scales, status, *, num_tokens, num_kv_heads, head_dim, block_size, kvd, int8_mode,
              num_slots) -> Launch:
    """:func:`paged_write_kv`'s :class:`~kvcl.ops._launch.Launch` on ``pyopencl.Buffer``
    arguments; ``keys_base`` / ``values_base`` are the element offsets of row 0."""
    D, Hkv = head_dim, num_kv_heads
    defines = {"KV_DTYPE": kvd.code, "INT8_MODE": int8_mode if kvd.has_scale else 0,
               "HEAD_DIM": D, "ROPE": 0, "Q_NORM": 0, "K_NORM": 0}
    num_rows = 2 * Hkv
    stride = np.int32(Hkv * D)
    align = math.gcd(keys_base, values_base, Hkv * D)
    kernel, lx, rows = _kernel(queue.context, queue.device, defines, D, num_rows, "none", align)
    args = (None, np.int32(0), np.int32(0),
            keys, np.int32(keys_base), stride,
            values, np.int32(values_base), stride,
            slot_mapping, None, None, None, np.int32(0), None, None, np.float32(0.0),
            None, k_pool, v_pool, k_scales, v_scales, status,
            np.int32(0), np.int32(Hkv), np.int32(block_size), np.int32(num_slots))
    return _ready(kernel, lx, rows, num_rows, num_tokens, args)
