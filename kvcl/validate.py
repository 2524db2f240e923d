"""The one validation helper used at every public boundary.

Each check names the argument, what was expected and what was given, and raises one of
kvcl's exception classes (see :mod:`kvcl.errors`). Checks run before anything is written.
No pyopencl import here: device arrays are recognised by duck typing (``.context``), so
host bookkeeping can use these checks too.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from .errors import (
    DeviceMismatchError,
    DtypeError,
    NonFiniteError,
    OutOfRangeError,
    ShapeError,
)


def is_device_array(x: Any) -> bool:
    """True for a ``pyopencl.array.Array`` (anything with ``.context`` and ``.base_data``).

    ``base_data``, not ``data``: on a view with an offset, pyopencl's ``.data`` raises.
    """
    return (not isinstance(x, np.ndarray) and hasattr(x, "context") and hasattr(x, "base_data")
            and hasattr(x, "shape"))


def _fmt_shape(shape: Sequence) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_array(name: str, x: Any, *, shape: "Sequence[int | None] | None" = None,
                ndim: int | None = None, dtype: Any = None, context: Any = None,
                finite: bool = False, allow_device: bool = True) -> Any:
    """Check an array argument and return it (numpy arrays are not copied or converted).

    Parameters
    ----------
    name : str
        The argument's name, used in the error message.
    x : numpy.ndarray or pyopencl.array.Array
    shape : sequence of int or None, optional
        The expected shape; ``None`` entries match any size.
    ndim : int, optional
        The expected number of dimensions (implied by ``shape``).
    dtype : numpy dtype-like or tuple of them, optional
    context : pyopencl.Context, optional
        For device arrays: the context they must belong to.
    finite : bool
        Refuse NaN and Inf (host arrays only; device arrays are checked by the kernels).
    """
    if not (isinstance(x, np.ndarray) or (allow_device and is_device_array(x))):
        kinds = "a numpy array or a pyopencl.array.Array" if allow_device else "a numpy array"
        raise DtypeError(f"{name}: expected {kinds}, got {type(x).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and len(x.shape) != ndim:
        want = _fmt_shape(shape) if shape is not None else f"{ndim} dimensions"
        raise ShapeError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if shape is not None:
        for want, got in zip(shape, x.shape):
            if want is not None and want != got:
                raise ShapeError(f"{name}: expected shape {_fmt_shape(shape)}, got {tuple(x.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        allowed = tuple(np.dtype(d) for d in allowed)
        if np.dtype(x.dtype) not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise DtypeError(f"{name}: expected dtype {want}, got {np.dtype(x.dtype)}")
    if context is not None and is_device_array(x) and x.context != context:
        raise DeviceMismatchError(
            f"{name}: the array lives in another OpenCL context than this cache/device; "
            "copy it with arr.get() or create it on the cache's queue"
        )
    if finite and isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.size:
        if not np.isfinite(x).all():   # the common case in one pass; the index only on failure
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise NonFiniteError(f"{name}: expected finite values, got {x[idx]} at index {idx}")
    return x


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Check an integer argument with ``low <= value < high`` (either bound optional)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral,)):
        raise DtypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise OutOfRangeError(f"{name}: expected >= {low}, got {value}")
    if high is not None and value >= high:
        raise OutOfRangeError(f"{name}: expected < {high}, got {value}")
    return value


def check_positive(name: str, value: Any) -> int:
    return check_int(name, value, low=1)


def check_float(name: str, value: Any, *, finite: bool = True) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise DtypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if finite and not np.isfinite(value):
        raise NonFiniteError(f"{name}: expected a finite float, got {value}")
    return value


def check_int4_range(name: str, x: Any) -> None:
    """int4 stores a row's rotated minimum as float16: refuse a numpy row whose rotated values
    pass ±65504 (device arrays are checked by the kernels: the row is skipped, the status set).

    Cheap bound first: ``|y_i| <= sqrt(P) * max|x|`` (P the rotation order), so only rows above
    ``65504 / sqrt(P)`` are rotated to be checked exactly.
    """
    if not isinstance(x, np.ndarray) or not x.size:
        return
    from .reference.quantize import INT4_MAXABS, hadamard_block, int4_out_of_range
    d = x.shape[-1]
    limit = float(INT4_MAXABS) / np.sqrt(hadamard_block(d))
    if float(np.abs(x).max()) <= limit:
        return
    rows = x.reshape(-1, d)
    suspects = np.flatnonzero(np.abs(rows).max(axis=1) > limit)
    bad = suspects[int4_out_of_range(rows[suspects])]
    if len(bad):
        idx = tuple(int(i) for i in np.unravel_index(bad[0], x.shape[:-1]))
        raise OutOfRangeError(f"{name}: int4 stores each row rotated with a float16 minimum; row {idx} "
                              f"has a rotated value beyond ±65504 (max |x| {float(np.abs(rows[bad[0]]).max()):.6g})")

