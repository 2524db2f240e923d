"""Device plumbing shared by the oxibonsai mirrors.

Host-side conversion of the slices the Rust API takes, uploads, and byte-range copies between
host and device buffers; allocation with a size check is :meth:`kvcl.Device.alloc`. Every
value-changing computation stays in :mod:`kvcl.ops`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ..errors import DtypeError, ShapeError
from ..runtime import Device
from ..validate import check_array, check_int, is_device_array
from ..ops._launch import to_host


def upload(device: Device, host: np.ndarray) -> cla.Array:
    """A fresh device copy of a C-contiguous host array."""
    return cla.to_device(device.queue, np.ascontiguousarray(host))


def as_float32(name: str, x) -> np.ndarray:
    """``x`` (a sequence or numpy array of real numbers) as a C-contiguous float32 array.

    Device arrays are refused here: the Rust API takes host slices, and the mirrors that
    promise finite data must see the values on the host to check them.
    """
    if is_device_array(x):
        raise DtypeError(f"{name}: expected a sequence or numpy array of floats, got a "
                         "pyopencl.array.Array; pass arr.get()")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise DtypeError(f"{name}: expected a sequence or numpy array of floats ({exc})") from None
    if arr.dtype.kind not in "fiu":
        raise DtypeError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    with warnings.catch_warnings():  # float64 overflow becomes inf, as Rust's `as f32`
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.ascontiguousarray(arr, dtype=np.float32)


def as_row_block(name: str, x, rows: int, cols: int) -> tuple[np.ndarray | None, int]:
    """Accept a flat ``[rows * cols]`` or a ``[rows, cols]`` array.

    Returns ``(array [rows, cols] or None, actual length)``: ``None`` when a 1-D input has the
    wrong length, so the caller can raise its own error with the actual length.
    """
    arr = as_float32(name, x)
    if arr.ndim == 1:
        if arr.size != rows * cols:
            return None, int(arr.size)
        return arr.reshape(rows, cols), int(arr.size)
    check_array(name, arr, shape=(rows, cols))
    return arr, int(arr.size)


def device_block(name: str, x, shape: tuple, device: Device) -> cla.Array:
    """A float32 device array of ``shape`` from a host array/sequence or a device array.

    Host input may be flat (``prod(shape)`` values) or already of ``shape``; device input must
    be float32, C-contiguous, in ``device``'s context and hold ``prod(shape)`` values.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if is_device_array(x):
        check_array(name, x, dtype=np.float32, context=device.context)
        if not x.flags.c_contiguous:
            raise ShapeError(f"{name}: expected a C-contiguous array, got strides {x.strides}")
        if int(x.size) != size:
            raise ShapeError(f"{name}: expected {size} values (shape {shape}), got shape {tuple(x.shape)}")
        return x.reshape(*shape) if size else None
    arr = as_float32(name, x)
    if arr.ndim == 1 and arr.size == size:
        arr = arr.reshape(shape)
    check_array(name, arr, shape=shape)
    return upload(device, arr) if size else None


def write(device: Device, target: cla.Array, element_offset: int, host: np.ndarray) -> None:
    """Copy a host array into ``target``'s buffer at ``element_offset`` (elements of target)."""
    if host.size == 0:
        return
    itemsize = target.dtype.itemsize
    cl.enqueue_copy(device.queue, target.base_data, np.ascontiguousarray(host),
                    dst_offset=target.offset + element_offset * itemsize)


def read(device: Device, source: cla.Array, element_offset: int, count: int) -> np.ndarray:
    """``count`` elements of ``source`` from ``element_offset``, as a new host array."""
    out = np.empty(count, dtype=source.dtype)
    if count:
        cl.enqueue_copy(device.queue, out, source.base_data,
                        src_offset=source.offset + element_offset * source.dtype.itemsize,
                        is_blocking=True)
    return out


def read_all(source: cla.Array | None, shape: tuple, dtype) -> np.ndarray:
    """The whole array on the host (zero-size arrays have no buffer)."""
    if source is None or source.size == 0:
        return np.zeros(shape, dtype=dtype)
    return to_host(source)


def index(name: str, value, length: int) -> int:
    """A valid index ``0 <= value < length`` (kvcl's OutOfRangeError otherwise)."""
    return check_int(name, value, low=0, high=length)
