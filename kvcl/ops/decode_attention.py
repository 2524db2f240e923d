"""Decode attention over a paged (or contiguous) KV cache: the launchers of
``kernels/decode_attention.cl``.

Both entry points validate every argument (shape, dtype, context) before the first enqueue,
pick the kernel specialisation from the device's reported limits, and return the
``pyopencl.Event`` of the last kernel they enqueued. The numpy twin with the same names is
:mod:`kvcl.reference.decode_attention`; its module docstring states the maths.

Work decomposition (see the header comments in the ``.cl`` file): one work-group per
(q-row tile, kv head, sequence × split-K partition) serving every query head of the GQA
group, so each K/V byte is read once per group. Two kernel variants: on CPU devices the
*serial* one (one work-item per work-group, explicit vector code, no barriers, inline exp2,
software prefetch where the compiler lowers it), elsewhere the *cooperative* one (WG work-items
per tile, derived from the device's and kernel's work-group limits). Split-K (flash-decoding) is
used only when ``B · num_kv_heads · q_tiles`` work-groups cannot fill the device; a second
kernel then merges the partitions with log-sum-exp weights.

The layout (variant, defines, work-group shape, split-K) is chosen in
:mod:`kvcl.ops.decode_plan`, whose constants are the knobs tools and tests reassign. Measured
figures (PoCL on the 2-core development VM, NVIDIA's OpenCL on an H100): the kernel's header
comment and ``docs/performance.md``.
"""

from __future__ import annotations

import math

import numpy as np
import pyopencl as cl

from ..dtypes import FP32, INT8_MODE_AWAY, INT8_MODE_EVEN
from ..dtypes import kv_dtype as _kv_dtype
from ..errors import (
    CapacityError,
    DeviceMismatchError,
    DtypeError,
    InvalidArgument,
    ShapeError,
)
from ..runtime import get_kernel
from ..validate import check_array, check_float, check_int, is_device_array
from . import decode_plan as layout
from ._launch import Launch, enqueue
from .decode_plan import INT8_DOTS, VARIANTS, Plan, int8_dot_for, plan, variant_for

# the layout names are re-exported: callers plan and launch through this module
__all__ = ["INT8_DOTS", "Plan", "VARIANTS", "contiguous_attention", "int8_dot_for", "paged_attention",
           "plan", "variant_for"]

_dummies: dict = {}
_workspaces: dict = {}
_page_tables: dict = {}


# ---- validation -----------------------------------------------------------------------------

def _check_kv_dtype(name):
    try:
        return _kv_dtype(name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"kv_dtype: {exc}") from None


def _dev(name, x, **kw):
    """check_array for an argument that must be a device array (offset 0, C-contiguous)."""
    if not is_device_array(x):
        raise DtypeError(f"{name}: expected a pyopencl.array.Array, got {type(x).__name__}")
    check_array(name, x, **kw)
    if getattr(x, "offset", 0) != 0 or not x.flags.c_contiguous:
        raise InvalidArgument(f"{name}: expected a C-contiguous array at offset 0 (not a view); "
                              "copy it first")
    return x


def _check_scales(kvd, int8_mode, k_scales, v_scales, shape, context):
    if not kvd.has_scale:
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s is not None:
                raise InvalidArgument(f"{name}: only int8 and int4 KV have scales; got an array for {kvd.name}")
        return
    want = np.float32 if int8_mode == INT8_MODE_AWAY else np.uint16
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
        if s is None:
            raise InvalidArgument(f"{name}: required for {kvd.name} KV, shape {shape}")
        _dev(name, s, shape=shape, dtype=want, context=context)


def _check_common(queries, out, q_indptr, batch, kvd, int8_mode, num_kv_heads, head_dim, context,
                  scale, window, max_q_len, max_kv_len, partition_size, queue, int8_dot=None):
    total_q, num_q_heads, _ = queries.shape
    if num_q_heads % num_kv_heads:
        raise ShapeError(f"queries: num_q_heads {num_q_heads} is not a multiple of the cache's "
                         f"num_kv_heads {num_kv_heads}")
    if head_dim % 4:
        raise ShapeError(f"queries: head_dim {head_dim} is not a multiple of 4")
    _dev("q_indptr", q_indptr, shape=(batch + 1,), dtype=np.int32, context=context)
    _dev("out", out, shape=(total_q, num_q_heads, head_dim), dtype=np.float32, context=context)
    if out.data == queries.data:
        raise InvalidArgument("out: must not alias queries")
    check_int("int8_mode", int8_mode, low=INT8_MODE_AWAY, high=INT8_MODE_EVEN + 1)
    kvd.check_int8_mode(int8_mode)
    if scale is not None:
        check_float("scale", scale)
    check_int("window", window, low=0)
    check_int("max_q_len", max_q_len, low=1)   # upper bounds: larger only costs idle work-groups
    check_int("max_kv_len", max_kv_len, low=1)
    if partition_size is not None:
        check_int("partition_size", partition_size, low=1)
    if layout._check_int8_dot(int8_dot) == "integer" and int8_dot is not None:   # refused before any build
        if kvd.name not in layout.INTEGER_KV:
            raise InvalidArgument(f"int8_dot: 'integer' needs kv_dtype int8 or int4, got {kvd.name}")
        if head_dim > layout._INT8_DOT_MAX_HEAD_DIM:
            raise InvalidArgument(f"int8_dot: 'integer' supports head_dim <= {layout._INT8_DOT_MAX_HEAD_DIM} "
                                  f"(int32 sums), got {head_dim}")
    if queue is not None and queue.context != context:
        raise DeviceMismatchError("queue: belongs to another OpenCL context than the arrays")


# ---- launch ---------------------------------------------------------------------------------

def _dummy(context):
    buf = _dummies.get(context.int_ptr)
    if buf is None:
        buf = _dummies.setdefault(context.int_ptr, cl.Buffer(context, cl.mem_flags.READ_ONLY, 16))
    return buf


def _workspace(queue, nbytes: int):
    """The split-K scratch of ``queue``, grown to ``nbytes``. One per queue, not per context:
    two queues run at once, and :func:`~kvcl.ops._launch.enqueue` keeps a kernel and its merge
    together on one queue only. The buffer keeps its context alive, so a context's handle is
    not reused while it is cached; a queue's handle may be (after its work is done), by a queue
    of another context, hence the check."""
    buf = _workspaces.get(queue.int_ptr)
    if buf is None or buf.size < nbytes or buf.context.int_ptr != queue.context.int_ptr:
        buf = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, max(nbytes, 4))
        _workspaces[queue.int_ptr] = buf
    return buf


def _launch(queue, queries, k_pool, v_pool, k_scales, v_scales, indptr, indices, last_page_len,
            q_indptr, out, **kw):
    """:func:`launch_buffers` on checked pyopencl Arrays (offset 0, so ``.data`` is the whole buffer)."""
    total_q, num_q_heads, head_dim = queries.shape
    return launch_buffers(queue, queries.data, k_pool.data, v_pool.data,
                  None if k_scales is None else k_scales.data,
                  None if v_scales is None else v_scales.data, indptr.data, indices.data,
                  last_page_len.data, q_indptr.data, out.data, total_q=total_q,
                  num_q_heads=num_q_heads, head_dim=head_dim, batch=q_indptr.shape[0] - 1, **kw)


def launch_buffers(queue, *args, wait_for=None, **kwargs) -> cl.Event:
    """Enqueue the decode kernel (and the split-K merge) on ``pyopencl.Buffer`` arguments, with
    no argument checks: for a caller that made and validated every buffer itself, such as
    :class:`kvcl.PagedKVCache`, whose per-layer calls would otherwise pay for re-checking (and
    for building pyopencl Arrays: ~20 µs each). Arguments as :func:`launches`."""
    return enqueue(queue, launches(queue, *args, **kwargs), wait_for)


def launches(queue, queries, k_pool, v_pool, k_scales, v_scales, indptr, indices, last_page_len,
             q_indptr, out, *, total_q, num_q_heads, head_dim, batch, kvd, int8_mode, num_kv_heads,
             block_size, scale, window, max_q_len, max_kv_len, partition_size=None, workspace=None,
             local_size=None, variant=None, int8_dot=None, fresh=None) -> list:
    """The decode kernel's :class:`~kvcl.ops._launch.Launch` (and the split-K merge's) on
    ``pyopencl.Buffer`` arguments. Arguments mean what they mean in :func:`paged_attention`;
    ``kvd`` is a :class:`kvcl.dtypes.KvDtype`; ``k_scales`` / ``v_scales`` are None unless the
    format has scales. ``fresh``: two float32 buffers [total_q, num_kv_heads, head_dim], the
    step's own K and V: each query row then reads its own token from them (a second launch,
    :func:`_fresh_launch`) and every other token from the cache, the two merged as split-K
    partitions (int4's decode through the engine; reference
    :func:`kvcl.reference.decode_attention.attend_self_fresh`)."""
    context = queue.context
    p = plan(context, batch=batch, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
             head_dim=head_dim, block_size=block_size, max_q_len=max_q_len, max_kv_len=max_kv_len,
             kv_dtype=kvd, int8_mode=int8_mode, partition_size=partition_size, local_size=local_size,
             variant=variant, device=queue.device, int8_dot=int8_dot)
    defines = dict(p.defines)
    ws_parts = p.num_parts + (fresh is not None)
    ws_floats = total_q * num_q_heads * ws_parts * (head_dim + 2) if ws_parts > 1 else 0
    if ws_floats:
        if workspace is None:
            ws = _workspace(queue, 4 * ws_floats)
        else:
            ws = workspace.base_data if is_device_array(workspace) else workspace
            if not isinstance(ws, cl.Buffer):
                raise DtypeError(f"workspace: expected a pyopencl Buffer or Array, got {type(workspace).__name__}")
            if ws.size < 4 * ws_floats:
                raise CapacityError(f"workspace: needs {4 * ws_floats:,} bytes for {ws_parts} "
                                    f"split-K partitions, got {ws.size:,}")
    else:
        ws = _dummy(context)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    ks = k_scales if k_scales is not None else _dummy(context)
    vs = v_scales if v_scales is not None else _dummy(context)
    acc_offset = np.uint64(total_q * num_q_heads * ws_parts * 2)
    attn = get_kernel(context, layout.SOURCE, "paged_decode_attention", defines, queue.device)
    gsize = (p.local_size * p.q_tiles, num_kv_heads // p.kv_heads_per_group, batch * p.num_parts)
    result = [Launch(attn, gsize, (p.local_size, 1, 1),
                     (queries, k_pool, v_pool, ks, vs, indptr, indices, last_page_len, q_indptr, out,
                      ws, acc_offset, np.int32(num_kv_heads), np.float32(scale * math.log2(math.e)),
                      np.int32(window), np.int32(p.partition_size), np.int32(p.num_parts), np.int32(0),
                      np.int32(ws_parts), np.int32(fresh is not None)))]
    if fresh is not None:
        result.append(_fresh_launch(queue, queries, fresh, q_indptr, out, ws, acc_offset, ws_parts,
                                    total_q=total_q, num_q_heads=num_q_heads, head_dim=head_dim,
                                    batch=batch, num_kv_heads=num_kv_heads, scale=scale,
                                    max_q_len=max_q_len, variant=variant))
    if ws_parts > 1:   # after the decode kernel(s) in the (in-order) queue
        merge = get_kernel(context, layout.SOURCE, "paged_decode_attention_merge", defines, queue.device)
        result.append(Launch(merge, (head_dim, num_q_heads, total_q), None,
                             (ws, out, acc_offset, np.int32(num_q_heads), np.int32(ws_parts))))
    return result


def _fresh_launch(queue, queries, fresh, q_indptr, out, ws, acc_offset, ws_parts, *, total_q,
                  num_q_heads, head_dim, batch, num_kv_heads, scale, max_q_len, variant):
    """Each query row's attention to its own token, from the step's float32 K/V (``fresh``: two
    buffers [total_q, num_kv_heads, head_dim]), as the last workspace partition: the buffers read
    as an fp32 pool of one-token pages (sequence b's pages q_indptr[b] .. q_indptr[b + 1]) with a
    window of 1 (whatever the caller's window: a row's own token is always inside it), so row i
    sees exactly its own token; the cache launch leaves that token out."""
    context = queue.context
    p = plan(context, batch=batch, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
             head_dim=head_dim, block_size=1, max_q_len=max_q_len, max_kv_len=max_q_len,
             kv_dtype=FP32, int8_mode=INT8_MODE_AWAY, partition_size=max_q_len, variant=variant,
             device=queue.device)
    indices, ones = _fresh_tables(context, total_q, batch)
    attn = get_kernel(context, layout.SOURCE, "paged_decode_attention", dict(p.defines), queue.device)
    gsize = (p.local_size * p.q_tiles, num_kv_heads // p.kv_heads_per_group, batch)
    d = _dummy(context)
    return Launch(attn, gsize, (p.local_size, 1, 1),
                  (queries, fresh[0], fresh[1], d, d, q_indptr, indices, ones, q_indptr, out,
                   ws, acc_offset, np.int32(num_kv_heads), np.float32(scale * math.log2(math.e)),
                   np.int32(1), np.int32(max_q_len), np.int32(1), np.int32(ws_parts - 1),
                   np.int32(ws_parts), np.int32(0)))


_fresh: dict = {}


def _fresh_tables(context, total_q: int, batch: int):
    """Device int32 buffers arange(>= total_q) and ones(>= batch), cached per context."""
    have = _fresh.get(context.int_ptr)
    if have is None or have[2] < total_q or have[3] < batch:
        n, b = max(total_q, 64), max(batch, 64)
        flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
        have = (cl.Buffer(context, flags, hostbuf=np.arange(n, dtype=np.int32)),
                cl.Buffer(context, flags, hostbuf=np.ones(b, np.int32)), n, b)
        _fresh[context.int_ptr] = have
    return have[0], have[1]


#: the positions of the queries, K pool, V pool, K scales, V scales and output buffers in the
#: decode kernel's :func:`launches` arguments
QUERY_ARG, K_POOL_ARG, V_POOL_ARG, K_SCALES_ARG, V_SCALES_ARG, OUT_ARG = 0, 1, 2, 3, 4, 9


def paged_attention(queries, k_pool, v_pool, indptr, indices, last_page_len, q_indptr, out, *,
                    k_scales=None, v_scales=None, kv_dtype="fp32", int8_mode=0, scale=None,
                    window=0, max_q_len, max_kv_len, partition_size=None, workspace=None,
                    queue=None, wait_for=None, int8_dot=None, _local_size=None, _variant=None) -> cl.Event:
    """Attention of ``queries`` over a paged KV cache, written to ``out``.

    Query token ``i`` of sequence ``b`` (``q_len`` tokens, ``kv_len`` cached including
    them) attends the cached positions ``[lo, hi)`` with ``hi = kv_len - q_len + 1 + i`` and
    ``lo = max(0, hi - window)`` when ``window > 0`` (else 0); query head ``h`` reads kv head
    ``h // (num_q_heads // num_kv_heads)``. Softmax and accumulation are fp32; quantised K/V
    are dequantised on the fly.

    Parameters
    ----------
    queries : pyopencl.array.Array
        ``[total_q, num_q_heads, head_dim]`` float32; ``head_dim`` a multiple of 4.
    k_pool, v_pool : pyopencl.array.Array
        ``[num_blocks, num_kv_heads, block_size, head_dim]`` in the storage dtype of
        ``kv_dtype`` (fp32 float32, fp16 uint16 bits, int8 int8, fp8 uint8; int4 uint8 with a
        last axis of ``head_dim / 2``: two values per byte, see :mod:`kvcl.dtypes`).
    indptr : pyopencl.array.Array
        ``[B + 1]`` int32: the pages of sequence ``b`` are ``indices[indptr[b]:indptr[b + 1]]``.
    indices : pyopencl.array.Array
        ``[nnz]`` int32 block ids.
    last_page_len : pyopencl.array.Array
        ``[B]`` int32, 1..block_size: ``kv_len_b = (npages_b - 1) * block_size + last_page_len_b``.
    q_indptr : pyopencl.array.Array
        ``[B + 1]`` int32: query rows of sequence ``b``; ``1 <= q_len_b <= kv_len_b``.
    out : pyopencl.array.Array
        ``[total_q, num_q_heads, head_dim]`` float32, written.
    k_scales, v_scales : pyopencl.array.Array, optional
        ``[num_blocks, num_kv_heads, block_size]`` row scales of int8 (float32 for
        ``int8_mode=0``, fp16 bits as uint16 for 1) and int4 (float32). Required for those only.
    kv_dtype : str
        ``"fp32"``, ``"fp16"``, ``"int8"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"int4"``.
    int8_mode : int
        0 or 1, see ``kernels/common.h``.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    window : int
        Sliding-window length (0: none).
    max_q_len, max_kv_len : int
        Upper bounds of ``q_len_b`` and ``kv_len_b`` (host ints: they size the grid and the
        split-K partition count; a sequence longer than ``max_kv_len`` is cut short).
    partition_size : int, optional
        Split-K partition length in tokens; ``None`` chooses (see :func:`plan`).
    workspace : pyopencl.Buffer or pyopencl.array.Array, optional
        Split-K scratch reused across calls (``Plan.workspace_floats`` float32 elements);
        by default one buffer per queue is cached and grown.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``queries.queue``.
    wait_for : list of pyopencl.Event, optional
    int8_dot : str, optional
        How int8 KV's logits are computed: ``"float"`` (the float query times the dequantised
        codes, as every format), ``"integer"`` (the query quantized per token and head to
        16-bit codes of ``max|q| / 32767``, integer multiply-adds on the stored codes, the two
        scales applied once per logit: within the int8 accuracy bounds of the fp32-KV output,
        not bit-identical to the float path; ``head_dim`` <= 512), or ``"auto"``: integer where it
        measured faster (the serial variant on x86 PoCL with AVX2), float elsewhere. None (the
        default): the module's ``_INT8_DOT``, ``"auto"``. int4 KV likewise, on the rotated query
        against the codes 0..15 (the serial variant only; ``"auto"`` takes it where ``head_dim``
        is a multiple of 32). Other KV dtypes: float logits; ``"integer"`` is refused for them.

    Returns
    -------
    pyopencl.Event
        The event of the last kernel enqueued.

    Notes
    -----
    The page table's contents (block ids in range, ``indptr`` monotone, lengths consistent)
    are trusted: checking them would need a device-to-host copy on the hot path. The paging
    layer produces them.
    """
    kvd = _check_kv_dtype(kv_dtype)
    _dev("queries", queries, ndim=3, dtype=np.float32)
    context = queries.context
    head_dim = queries.shape[2]
    _dev("k_pool", k_pool, shape=(None, None, None, kvd.row_elems(head_dim)), dtype=kvd.storage, context=context)
    _dev("v_pool", v_pool, shape=tuple(k_pool.shape), dtype=kvd.storage, context=context)
    num_blocks, num_kv_heads, block_size, _ = k_pool.shape
    _dev("indptr", indptr, ndim=1, dtype=np.int32, context=context)
    batch = indptr.shape[0] - 1
    if batch < 1:
        raise ShapeError(f"indptr: expected shape (B + 1,) with B >= 1, got {tuple(indptr.shape)}")
    _dev("indices", indices, ndim=1, dtype=np.int32, context=context)
    _dev("last_page_len", last_page_len, shape=(batch,), dtype=np.int32, context=context)
    _check_common(queries, out, q_indptr, batch, kvd, int8_mode, num_kv_heads, head_dim, context,
                  scale, window, max_q_len, max_kv_len, partition_size, queue, int8_dot)
    _check_scales(kvd, int8_mode, k_scales, v_scales, (num_blocks, num_kv_heads, block_size), context)
    return _launch(queue or queries.queue, queries, k_pool, v_pool, k_scales, v_scales, indptr,
                   indices, last_page_len, q_indptr, out, kvd=kvd, int8_mode=int8_mode,
                   num_kv_heads=num_kv_heads, block_size=block_size, scale=scale, window=window,
                   max_q_len=max_q_len, max_kv_len=max_kv_len, partition_size=partition_size,
                   workspace=workspace, wait_for=wait_for, local_size=_local_size,
                   variant=_variant, int8_dot=int8_dot)


def _contiguous_table(queue, batch: int):
    key = (queue.context.int_ptr, batch)
    found = _page_tables.get(key)
    if found is None:
        import pyopencl.array as cla
        found = (cla.to_device(queue, np.arange(batch + 1, dtype=np.int32)),
                 cla.to_device(queue, np.arange(batch, dtype=np.int32)))
        queue.finish()
        _page_tables[key] = found
    return found


def contiguous_attention(queries, k_cache, v_cache, kv_lens, q_indptr, out, *, k_scales=None,
                         v_scales=None, kv_dtype="fp32", int8_mode=0, scale=None, window=0,
                         max_q_len, max_kv_len, partition_size=None, workspace=None, queue=None,
                         wait_for=None, int8_dot=None, _local_size=None, _variant=None) -> cl.Event:
    """Attention over a contiguous cache: the paged kernel with one ``capacity``-token page per
    sequence (same maths as :func:`paged_attention`, whose other parameters and return value
    this shares).

    Parameters
    ----------
    queries : pyopencl.array.Array
        ``[total_q, num_q_heads, head_dim]`` float32.
    k_cache, v_cache : pyopencl.array.Array
        ``[B, num_kv_heads, capacity, head_dim]`` in the storage dtype of ``kv_dtype``.
    kv_lens : pyopencl.array.Array
        ``[B]`` int32, tokens cached per sequence (1..capacity).
    q_indptr : pyopencl.array.Array
        ``[B + 1]`` int32.
    out : pyopencl.array.Array
        ``[total_q, num_q_heads, head_dim]`` float32, written.
    k_scales, v_scales : pyopencl.array.Array, optional
        ``[B, num_kv_heads, capacity]`` (int8 and int4 only; float32 or fp16 bits per ``int8_mode``).
    """
    kvd = _check_kv_dtype(kv_dtype)
    _dev("queries", queries, ndim=3, dtype=np.float32)
    context = queries.context
    head_dim = queries.shape[2]
    _dev("k_cache", k_cache, shape=(None, None, None, kvd.row_elems(head_dim)), dtype=kvd.storage, context=context)
    _dev("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=kvd.storage, context=context)
    batch, num_kv_heads, capacity, _ = k_cache.shape
    _dev("kv_lens", kv_lens, shape=(batch,), dtype=np.int32, context=context)
    _check_common(queries, out, q_indptr, batch, kvd, int8_mode, num_kv_heads, head_dim, context,
                  scale, window, max_q_len, max_kv_len, partition_size, queue, int8_dot)
    check_int("max_kv_len", max_kv_len, low=1, high=capacity + 1)
    _check_scales(kvd, int8_mode, k_scales, v_scales, (batch, num_kv_heads, capacity), context)
    queue = queue or queries.queue
    indptr, indices = _contiguous_table(queue, batch)
    return _launch(queue, queries, k_cache, v_cache, k_scales, v_scales, indptr, indices, kv_lens,
                   q_indptr, out, kvd=kvd, int8_mode=int8_mode, num_kv_heads=num_kv_heads,
                   block_size=capacity, scale=scale, window=window, max_q_len=max_q_len,
                   max_kv_len=max_kv_len, partition_size=partition_size, workspace=workspace,
                   wait_for=wait_for, local_size=_local_size, variant=_variant, int8_dot=int8_dot)
