"""What every launcher in :mod:`kvcl.ops` shares: queue resolution and device-array checks."""

from __future__ import annotations

import threading

import pyopencl as cl

from ..errors import DtypeError, InvalidArgument, ShapeError
from ..validate import check_array, is_device_array

# Kernel objects are memoized and shared (kvcl.runtime.get_kernel): setting their arguments
# and enqueueing must happen atomically when several threads launch the same kernel.
launch_lock = threading.RLock()


def require_device(name: str, arr) -> None:
    """Refuse anything but a ``pyopencl.array.Array``, saying how to make one."""
    if not is_device_array(arr):
        raise DtypeError(
            f"{name}: expected a pyopencl.array.Array, got {type(arr).__name__}; "
            "upload it with pyopencl.array.to_device(queue, x)"
        )


def resolve_queue(queue, **arrays) -> cl.CommandQueue:
    """``queue`` or the first named array's queue; every named array must be a device array."""
    for name, arr in arrays.items():
        require_device(name, arr)
    if queue is not None:
        return queue
    for arr in arrays.values():
        if arr.queue is not None:
            return arr.queue
    raise InvalidArgument(
        "queue: none given and no array argument has one; pass queue=... "
        "or create the arrays with a queue"
    )


def device_array(name: str, arr, **checks):
    """:func:`kvcl.validate.check_array` for arguments that must be C-contiguous device arrays."""
    require_device(name, arr)
    check_array(name, arr, **checks)
    if not arr.flags.c_contiguous:
        raise ShapeError(f"{name}: expected a C-contiguous array, got strides {arr.strides}")
    return arr


def element_base(arr) -> int:
    """The array's start inside its buffer, in elements."""
    assert arr.offset % arr.dtype.itemsize == 0, "pyopencl views start on an element boundary"
    return arr.offset // arr.dtype.itemsize
