"""Launcher of ``kernels/stream_read.cl`` (the bandwidth yardstick of ``kvcl bench``)."""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ..errors import ShapeError
from ..runtime import get_kernel, work_items_are_threads
from ._launch import device_array, launch, resolve_queue


def stream_read_config(device: cl.Device) -> tuple[int, int]:
    """(global size, local size): enough work-groups to keep every compute unit streaming.

    Where work-items are a thread's loop iterations (PoCL) each streams one contiguous chunk;
    GPUs and llvmpipe get many work-groups of coalesced grid-stride readers.
    """
    if work_items_are_threads(device):
        return device.max_compute_units * 64, 1
    local = min(128, device.max_work_group_size)
    groups = device.max_compute_units * 16
    return groups * local, local


def stream_read(src, partial, *, queue=None, wait_for=None) -> cl.Event:
    """Read every element of ``src`` once; write per-work-item partial sums to ``partial``.

    Parameters
    ----------
    src : pyopencl.array.Array, float32 [n], n a multiple of 16
    partial : pyopencl.array.Array, float32 [global size] (see :func:`stream_read_config`)
    """
    queue = resolve_queue(queue, src=src, partial=partial)
    device_array("src", src, ndim=1, dtype=np.float32, context=queue.context)
    global_size, local = stream_read_config(queue.device)
    device_array("partial", partial, shape=(global_size,), dtype=np.float32, context=queue.context)
    if src.size % 16:
        raise ShapeError(f"src: expected a length that is a multiple of 16, got {src.size}")
    cpu = work_items_are_threads(queue.device)
    vec = 16 if cpu else 4
    kernel = get_kernel(queue.context, "stream_read.cl", "stream_read", {"CONTIGUOUS": int(cpu), "VEC": vec})
    return launch(queue, kernel, (global_size,), (local,),
                  (src.base_data, np.uint32(src.size // vec), partial.base_data), wait_for)


def empty_partial(queue) -> cla.Array:
    return cla.empty(queue, (stream_read_config(queue.device)[0],), np.float32)
