"""Launchers for ``kernels/turboquant.cl``: TurboQuant (PolarQuant + QJL) encode, decode, scores.

The maths is documented once, in :mod:`kvcl.reference.turboquant`, whose functions of the same
names are the numpy twins of these launchers. Each kernel is specialised from its arguments'
shapes: ``HEAD_DIM`` from the row length, ``BITS`` from the angle table (``2**bits`` rows),
``PROJECTIONS`` from the projection matrix or the prepared queries.

Storage arrays (written by :func:`polar_encode` / :func:`qjl_sketch`, read by
:func:`polar_decode` / :func:`attention_scores`) are laid out ``[T, 2, num_heads, ...]``:
token, kind (0 key, 1 value), head. Encoding takes rows ``[..., num_heads]`` (head fastest)
and writes them at a row offset into storage flattened to rows, so one push of a token's keys
and values for every head is one contiguous block of ``2 * num_heads`` rows.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl

from ..errors import ShapeError
from ..reference.turboquant import QJL_CONSTANT, code_dtype, sign_bytes
from ..runtime import get_kernel
from ..validate import check_int
from ._launch import device_array, launch, resolve_queue

__all__ = ["matvec_rows", "polar_encode", "qjl_sketch", "polar_decode", "attention_scores"]

_SOURCE = "turboquant.cl"
_U32 = 2**32


def _whole(name: str, arr):
    """The array's buffer; the kernels index from its start, so views at an offset are refused."""
    if arr.offset:
        raise ShapeError(f"{name}: views starting at a byte offset ({arr.offset}) are not supported "
                         "by the turboquant kernels; pass a copy (arr.copy())")
    return arr.base_data


def _buffers(**arrays) -> list:
    return [_whole(name, arr) for name, arr in arrays.items()]


def _bits_of_table(table) -> int:
    levels = int(table.shape[0]) if len(table.shape) == 2 else 0
    bits = levels.bit_length() - 1
    if len(table.shape) != 2 or table.shape[1] != 2 or levels != 1 << bits or not 1 <= bits <= 16:
        raise ShapeError(f"angle_table: expected shape (2**bits, 2) with 1 <= bits <= 16, "
                         f"got {tuple(table.shape)}")
    return bits


def _storage_rows(name: str, arr, row_len: int) -> int:
    """Rows of a storage array whose last axis is ``row_len`` (leading axes flattened)."""
    if len(arr.shape) < 1 or arr.shape[-1] != row_len:
        raise ShapeError(f"{name}: expected shape (..., {row_len}), got {tuple(arr.shape)}")
    return int(arr.size) // row_len


def _head_dim(name: str, arr) -> int:
    head_dim = int(arr.shape[-1])
    if head_dim == 0 or head_dim % 2:
        raise ShapeError(f"{name}: head_dim (last axis) must be even and > 0, got {head_dim}")
    check_int(f"{name}.shape[-1] (head_dim)", head_dim, high=_U32)
    return head_dim


def _heads(num_heads, num_rows: int, per: str) -> int:
    num_heads = check_int("num_heads", num_heads, low=1, high=_U32)
    if num_rows % num_heads:
        raise ShapeError(f"{per}: {num_rows} rows are not a whole number of [..., {num_heads}] "
                         f"head groups (row r belongs to head r % num_heads)")
    return num_heads


def matvec_rows(x, matrices, out, *, num_heads: int, transpose: bool = False,
                queue=None, wait_for=None) -> cl.Event:
    """``out[r] = M_h·x[r]`` (``M_hᵀ·x[r]`` when ``transpose``) with ``h = r % num_heads``.

    Rotates rows into the TurboQuant space (``R``), back out of it (``Rᵀ``), and projects
    rotated queries (``G``).

    Parameters
    ----------
    x : pyopencl.array.Array, float32, shape [num_rows, in_dim]
    matrices : pyopencl.array.Array, float32, shape [num_heads, out_dim, in_dim]
        ``[num_heads, in_dim, out_dim]`` when ``transpose``.
    out : pyopencl.array.Array, float32, shape [num_rows, out_dim]
    num_heads : int
        ``num_rows`` must be a multiple of it.
    transpose : bool
    queue : pyopencl.CommandQueue, optional
        Defaults to ``out``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event

    Examples
    --------
    >>> import numpy as np, pyopencl.array as cla, kvcl                    # doctest: +SKIP
    >>> q = kvcl.Device().queue                                            # doctest: +SKIP
    >>> x = cla.to_device(q, np.array([[1, 2]], np.float32))               # doctest: +SKIP
    >>> m = cla.to_device(q, np.array([[[0, 1], [1, 0]]], np.float32))     # doctest: +SKIP
    >>> out = cla.empty(q, (1, 2), np.float32)                             # doctest: +SKIP
    >>> matvec_rows(x, m, out, num_heads=1).wait(); out.get()              # doctest: +SKIP
    array([[2., 1.]], dtype=float32)
    """
    queue = resolve_queue(queue, out=out, x=x, matrices=matrices)
    context = queue.context
    device_array("x", x, ndim=2, dtype=np.float32, context=context)
    num_rows, in_dim = int(x.shape[0]), int(x.shape[1])
    num_heads = _heads(num_heads, num_rows, "x")
    device_array("matrices", matrices, ndim=3, dtype=np.float32, context=context)
    want = (num_heads, in_dim, None) if transpose else (num_heads, None, in_dim)
    device_array("matrices", matrices, shape=want, context=context)
    out_dim = int(matrices.shape[2] if transpose else matrices.shape[1])
    device_array("out", out, shape=(num_rows, out_dim), dtype=np.float32, context=context)
    for name, value in (("num_rows", num_rows), ("in_dim", in_dim), ("out_dim", out_dim)):
        check_int(name, value, high=_U32)
    if num_rows == 0 or out_dim == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    buffers = _buffers(x=x, matrices=matrices, out=out)
    kernel = get_kernel(context, _SOURCE, "matvec_rows")
    args = (*buffers, np.uint32(num_rows), np.uint32(num_heads), np.uint32(in_dim), np.uint32(out_dim),
            np.uint32(bool(transpose)))
    return launch(queue, kernel, (out_dim, num_rows), None, args, wait_for)


def polar_encode(rotated, angle_table, codes, radii, residual, *, row_offset: int = 0,
                 queue=None, wait_for=None) -> cl.Event:
    """PolarQuant rotated rows: angle codes and radii into storage, residual into ``residual``.

    Parameters
    ----------
    rotated : pyopencl.array.Array, float32, shape [num_rows, head_dim]
        Rows already multiplied by their head's rotation (:func:`matvec_rows`).
    angle_table : pyopencl.array.Array, float32, shape [2**bits, 2]
        :func:`kvcl.reference.turboquant.angle_table`; fixes ``bits``.
    codes : pyopencl.array.Array, uint8 (bits ≤ 8) or uint16, shape [..., head_dim/2]
        Storage, treated as ``[R, head_dim/2]``; rows ``[row_offset, row_offset + num_rows)``
        are written.
    radii : pyopencl.array.Array, float32, shape of ``codes``
    residual : pyopencl.array.Array, float32, shape [num_rows, head_dim]
        Receives ``rotated − polar_decode``, the input of :func:`qjl_sketch`.
    row_offset : int
    queue : pyopencl.CommandQueue, optional
        Defaults to ``codes``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
    """
    queue = resolve_queue(queue, codes=codes, rotated=rotated, angle_table=angle_table,
                          radii=radii, residual=residual)
    context = queue.context
    device_array("rotated", rotated, ndim=2, dtype=np.float32, context=context)
    num_rows = int(rotated.shape[0])
    head_dim = _head_dim("rotated", rotated)
    device_array("angle_table", angle_table, dtype=np.float32, context=context)
    bits = _bits_of_table(angle_table)
    device_array("codes", codes, dtype=code_dtype(bits), context=context)
    total = _storage_rows("codes", codes, head_dim // 2)
    device_array("radii", radii, shape=tuple(codes.shape), dtype=np.float32, context=context)
    device_array("residual", residual, shape=(num_rows, head_dim), dtype=np.float32, context=context)
    row_offset = check_int("row_offset", row_offset, low=0, high=max(total - num_rows, 0) + 1)
    if num_rows > total:
        raise ShapeError(f"rotated: {num_rows} rows do not fit in codes' {total} rows")
    check_int("rotated.shape[0] (rows)", num_rows, high=_U32)
    if num_rows == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    buffers = _buffers(rotated=rotated, angle_table=angle_table, codes=codes, radii=radii,
                       residual=residual)
    kernel = get_kernel(context, _SOURCE, "polar_encode", {"HEAD_DIM": head_dim, "BITS": bits})
    args = (*buffers, np.uint64(row_offset), np.uint32(num_rows))
    return launch(queue, kernel, (head_dim // 2, num_rows), None, args, wait_for)


def qjl_sketch(residual, projections, signs, norms, *, num_heads: int, row_offset: int = 0,
               queue=None, wait_for=None) -> cl.Event:
    """QJL-sketch residual rows: packed sign bits of ``G_h·e`` and ``‖e‖₂`` into storage.

    Parameters
    ----------
    residual : pyopencl.array.Array, float32, shape [num_rows, head_dim]
        Row ``r`` belongs to head ``r % num_heads``.
    projections : pyopencl.array.Array, float32, shape [num_heads, m, head_dim]
        Fixes ``m`` (``PROJECTIONS``).
    signs : pyopencl.array.Array, uint8, shape [..., ⌈m/8⌉]
        Storage, treated as ``[R, ⌈m/8⌉]``; bit p of byte p // 8 (LSB first) is ``G_p·e ≥ 0``.
    norms : pyopencl.array.Array, float32, shape ``signs.shape[:-1]``
    num_heads : int
    row_offset : int
        First storage row written.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``signs``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
    """
    queue = resolve_queue(queue, signs=signs, residual=residual, projections=projections, norms=norms)
    context = queue.context
    device_array("residual", residual, ndim=2, dtype=np.float32, context=context)
    num_rows = int(residual.shape[0])
    head_dim = _head_dim("residual", residual)
    num_heads = _heads(num_heads, num_rows, "residual")
    device_array("projections", projections, ndim=3, dtype=np.float32, context=context)
    m = int(projections.shape[1])
    device_array("projections", projections, shape=(num_heads, m, head_dim), context=context)
    check_int("projections.shape[1] (projections)", m, low=1, high=65536)
    device_array("signs", signs, dtype=np.uint8, context=context)
    total = _storage_rows("signs", signs, sign_bytes(m))
    device_array("norms", norms, shape=tuple(signs.shape[:-1]), dtype=np.float32, context=context)
    if num_rows > total:
        raise ShapeError(f"residual: {num_rows} rows do not fit in signs' {total} rows")
    row_offset = check_int("row_offset", row_offset, low=0, high=total - num_rows + 1)
    check_int("residual.shape[0] (rows)", num_rows, high=_U32)
    if num_rows == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    buffers = _buffers(residual=residual, projections=projections, signs=signs, norms=norms)
    kernel = get_kernel(context, _SOURCE, "qjl_sketch", {"HEAD_DIM": head_dim, "PROJECTIONS": m})
    args = (*buffers, np.uint64(row_offset), np.uint32(num_rows), np.uint32(num_heads))
    return launch(queue, kernel, (sign_bytes(m) + 1, num_rows), None, args, wait_for)


def _storage(codes, radii, angle_table, context, *, num_tokens, num_heads):
    device_array("angle_table", angle_table, dtype=np.float32, context=context)
    bits = _bits_of_table(angle_table)
    device_array("codes", codes, ndim=4, dtype=code_dtype(bits), context=context)
    if codes.shape[1] != 2 or codes.shape[2] != num_heads or codes.shape[0] < num_tokens:
        raise ShapeError(f"codes: expected shape (>= {num_tokens}, 2, {num_heads}, head_dim/2), "
                         f"got {tuple(codes.shape)}")
    head_dim = 2 * int(codes.shape[3])
    if head_dim == 0:
        raise ShapeError("codes: head_dim/2 (last axis) must be > 0")
    device_array("radii", radii, shape=tuple(codes.shape), dtype=np.float32, context=context)
    return bits, head_dim


def polar_decode(codes, radii, angle_table, out, *, kind: int, num_tokens: int,
                 queue=None, wait_for=None) -> cl.Event:
    """Decode stored codes of the first ``num_tokens`` tokens into the rotated space.

    Parameters
    ----------
    codes : pyopencl.array.Array, uint8 / uint16, shape [T, 2, num_heads, head_dim/2]
    radii : pyopencl.array.Array, float32, shape of ``codes``
    angle_table : pyopencl.array.Array, float32, shape [2**bits, 2]
    out : pyopencl.array.Array, float32, shape [num_tokens, num_heads, head_dim]
        ``polar_decode`` of each (token, head); apply ``Rᵀ`` (:func:`matvec_rows` with
        ``transpose=True``) for the original space.
    kind : int
        0 keys, 1 values.
    num_tokens : int
        At most ``T``.
    queue : pyopencl.CommandQueue, optional
        Defaults to ``out``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
    """
    queue = resolve_queue(queue, out=out, codes=codes, radii=radii, angle_table=angle_table)
    context = queue.context
    kind = check_int("kind", kind, low=0, high=2)
    num_tokens = check_int("num_tokens", num_tokens, low=0, high=_U32)
    device_array("codes", codes, ndim=4, context=context)
    num_heads = int(codes.shape[2])
    bits, head_dim = _storage(codes, radii, angle_table, context, num_tokens=num_tokens,
                              num_heads=num_heads)
    device_array("out", out, shape=(num_tokens, num_heads, head_dim), dtype=np.float32,
                 context=context)
    check_int("num_tokens * num_heads", num_tokens * num_heads, high=_U32)
    if num_tokens == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    buffers = _buffers(codes=codes, radii=radii, angle_table=angle_table, out=out)
    kernel = get_kernel(context, _SOURCE, "polar_decode", {"HEAD_DIM": head_dim, "BITS": bits})
    args = (*buffers, np.uint32(kind), np.uint32(num_tokens), np.uint32(num_heads))
    return launch(queue, kernel, (head_dim // 2, num_tokens * num_heads), None, args, wait_for)


def attention_scores(codes, radii, signs, norms, angle_table, rotated_queries, projected_queries,
                     scores, *, num_tokens: int, queue=None, wait_for=None) -> cl.Event:
    """Scores of prepared queries against the stored keys of the first ``num_tokens`` tokens.

    ``scores[h, t] = (⟨polar_decode(key code), R_h q_h⟩ + ‖e‖·√(π/2)/m·Σ_p ±(G_h R_h q_h)_p) / √d``,
    the QJL term 0 when ``‖e‖ < 1e-30``; not softmaxed. One launch covers every (token, head).

    Parameters
    ----------
    codes : pyopencl.array.Array, uint8 / uint16, shape [T, 2, num_heads, head_dim/2]
    radii : pyopencl.array.Array, float32, shape of ``codes``
    signs : pyopencl.array.Array, uint8, shape [T, 2, num_heads, ⌈m/8⌉]
    norms : pyopencl.array.Array, float32, shape [T, 2, num_heads]
    angle_table : pyopencl.array.Array, float32, shape [2**bits, 2]
    rotated_queries : pyopencl.array.Array, float32, shape [num_heads, head_dim]
        ``R_h·q_h`` (:func:`matvec_rows`).
    projected_queries : pyopencl.array.Array, float32, shape [num_heads, m]
        ``G_h·R_h·q_h`` (:func:`matvec_rows` again); fixes ``m``.
    scores : pyopencl.array.Array, float32, shape [num_heads, num_tokens]
    num_tokens : int
    queue : pyopencl.CommandQueue, optional
        Defaults to ``scores``'s queue.
    wait_for : list of pyopencl.Event, optional

    Returns
    -------
    pyopencl.Event
    """
    queue = resolve_queue(queue, scores=scores, codes=codes, radii=radii, signs=signs, norms=norms,
                          angle_table=angle_table, rotated_queries=rotated_queries,
                          projected_queries=projected_queries)
    context = queue.context
    num_tokens = check_int("num_tokens", num_tokens, low=0, high=_U32)
    device_array("codes", codes, ndim=4, context=context)
    num_heads = int(codes.shape[2])
    bits, head_dim = _storage(codes, radii, angle_table, context, num_tokens=num_tokens,
                              num_heads=num_heads)
    device_array("projected_queries", projected_queries, ndim=2, dtype=np.float32, context=context)
    m = int(projected_queries.shape[1])
    device_array("projected_queries", projected_queries, shape=(num_heads, m), context=context)
    check_int("projected_queries.shape[1] (projections)", m, low=1, high=65536)
    device_array("rotated_queries", rotated_queries, shape=(num_heads, head_dim), dtype=np.float32,
                 context=context)
    lead = tuple(codes.shape[:3])
    device_array("signs", signs, shape=lead + (sign_bytes(m),), dtype=np.uint8, context=context)
    device_array("norms", norms, shape=lead, dtype=np.float32, context=context)
    device_array("scores", scores, shape=(num_heads, num_tokens), dtype=np.float32, context=context)
    if num_tokens == 0:
        return cl.enqueue_marker(queue, wait_for=wait_for)
    defines = {"HEAD_DIM": head_dim, "BITS": bits, "PROJECTIONS": m}
    buffers = _buffers(codes=codes, radii=radii, signs=signs, norms=norms,
                       angle_table=angle_table, rotated_queries=rotated_queries,
                       projected_queries=projected_queries, scores=scores)
    kernel = get_kernel(context, _SOURCE, "attention_scores", defines)
    inv_sqrt_dim = np.float32(1.0) / np.sqrt(np.float32(head_dim))
    args = (*buffers, np.uint32(num_tokens), np.uint32(num_heads), np.float32(QJL_CONSTANT),
            inv_sqrt_dim)
    return launch(queue, kernel, (num_tokens, num_heads), None, args, wait_for)
