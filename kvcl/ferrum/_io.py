"""Boundary helpers of the ferrum mirror: turn numpy / device arguments into validated device
arrays, read the block table, resolve the pools. Everything here only checks and uploads;
nothing writes to a cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ..errors import (
    CapacityError,
    DtypeError,
    InvalidArgument,
    OutOfRangeError,
    ShapeError,
)
from ..validate import check_array, is_device_array
from ..ops._launch import to_host

_F32 = np.dtype(np.float32)


def as_input(name: str, x: Any, shape: tuple, layer, *, finite: bool = True) -> cla.Array:
    """A float32 input with exactly ``prod(shape)`` elements, as a device array of ``shape``.

    numpy arrays are checked (finite when asked) and uploaded; device arrays must be float32
    on the layer's context and C-contiguous; a view with an offset is copied to a whole array
    (the kernels address some arguments from their buffer's start).
    """
    size = int(np.prod(shape, dtype=np.int64))
    ctx = layer.device.context
    queue = layer.device.queue
    if x is None:
        raise InvalidArgument(f"{name}: required, got None")
    check_array(name, x, dtype=np.float32, context=ctx, finite=finite)
    if x.size != size:
        raise ShapeError(f"{name}: expected {size} float32 elements (shape {shape}), got shape "
                         f"{tuple(x.shape)}")
    if not is_device_array(x):
        return cla.to_device(queue, np.ascontiguousarray(x).reshape(shape))
    if not x.flags.c_contiguous:
        raise ShapeError(f"{name}: expected a C-contiguous device array, got strides {x.strides}")
    if x.offset:
        whole = cla.empty(queue, shape, np.float32)
        cl.enqueue_copy(queue, whole.data, x.base_data, byte_count=size * 4, src_offset=x.offset,
                        wait_for=x.events or None)
        return whole
    return x.reshape(shape)


def as_output(name: str, out: Any, shape: tuple, layer, *, like_device: bool):
    """``(device_array, host_target)`` for an output argument.

    ``out`` None: a new device array; the caller returns numpy unless ``like_device``.
    A numpy ``out`` (float32, C-contiguous, writeable, ``prod(shape)`` elements) is filled
    after the kernel; a device ``out`` (float32, offset 0, C-contiguous) is written in place.
    """
    size = int(np.prod(shape, dtype=np.int64))
    queue = layer.device.queue
    if out is None:
        return cla.empty(queue, shape, np.float32), (None if like_device else "numpy")
    check_array(name, out, dtype=np.float32, context=layer.device.context)
    if out.size != size:
        raise ShapeError(f"{name}: expected {size} float32 elements (shape {shape}), got shape "
                         f"{tuple(out.shape)}")
    if is_device_array(out):
        if out.offset or not out.flags.c_contiguous:
            raise ShapeError(f"{name}: expected a C-contiguous device array at offset 0, got "
                             f"offset {out.offset} bytes, strides {out.strides}")
        return out.reshape(shape), None
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ShapeError(f"{name}: expected a writeable C-contiguous numpy array")
    return cla.empty(queue, shape, np.float32), out


def finish_output(dev: cla.Array, target: Any, given: Any):
    """What an operation returns: the filled numpy ``out``, a new numpy array, or the device array."""
    if target is None:
        return given if given is not None else dev
    result = to_host(dev)
    if isinstance(target, np.ndarray):
        np.copyto(target, result.reshape(target.shape))
        return target
    return result


def optional_input(name: str, x: Any, shape: tuple, layer):
    return None if x is None else as_input(name, x, shape, layer)


def read_block_table(layer, first_block: int, last_block: int, num_pool_blocks: int) -> np.ndarray:
    """The device block table's entries ``[first_block, last_block]``, checked against the pool.

    Read back from the device (a small blocking copy) because that is what a kernel would
    follow; ferrum trusts it and writes out of bounds when an entry is past the pool.
    """
    table = to_host(layer.block_table)
    needed = table[first_block:last_block + 1].astype(np.int64)
    bad = np.flatnonzero(needed >= num_pool_blocks)
    if bad.size:
        i = int(bad[0])
        raise OutOfRangeError(
            f"block_table[{first_block + i}]: physical block {int(needed[i])} is outside the pool "
            f"of {num_pool_blocks} blocks; set the layer's block table first "
            "(KvLayer.set_block_table)")
    return needed


def check_capacity(layer, end: int, what: str) -> None:
    if end > layer.capacity:
        raise CapacityError(f"{what}: position {end - 1} is past the layer's capacity of "
                            f"{layer.capacity} tokens")


def check_pool(name: str, pool: Any, layer, storage: np.dtype, block_size: int) -> cla.Array:
    """A shared pool ``[num_blocks, num_kv_heads, block_size, head_dim]`` of ``storage``."""
    if pool is None:
        raise InvalidArgument(f"{name}: required for a paged {layer.kind.NAME} layer (pass the "
                              "shared pool, or bind one with alloc_paged(pool_k=..., pool_v=...))")
    if not is_device_array(pool):
        raise DtypeError(f"{name}: expected a pyopencl.array.Array, got {type(pool).__name__}")
    check_array(name, pool, shape=(None, layer.num_kv_heads, block_size, layer.head_dim),
                dtype=storage, context=layer.device.context)
    if pool.offset or not pool.flags.c_contiguous:
        raise ShapeError(f"{name}: expected a whole C-contiguous pool (offset 0), got a view")
    if pool.shape[0] < 1:
        raise ShapeError(f"{name}: expected at least one block, got shape {tuple(pool.shape)}")
    return pool


def upload_ints(layer, *arrays) -> list:
    queue = layer.device.queue
    return [cla.to_device(queue, np.ascontiguousarray(a, dtype=np.int32)) for a in arrays]
