"""What every launcher in :mod:`kvcl.ops` shares: the one launch path, the one read-back path
(:func:`read_host`, :func:`to_host`), queue resolution and device-array checks.

Every kernel launch in kvcl goes through :func:`enqueue` (or :func:`launch`, one launch). A
kernel object is shared (:func:`kvcl.runtime.get_kernel` memoizes it per context, device,
source, defines and name) and OpenCL keeps its argument values between enqueues, so setting the
arguments and enqueueing happen under that kernel's own lock; arguments that still hold the same
value are not set again. What is remembered of an argument holds no reference to a buffer: a
cache's device pools are released when the cache is collected. (:class:`kvcl.stepcalls.StepCalls`,
the models' hot path, keeps kernel objects of its own per layer instead, see there.) Numpy
scalars are set through ``clSetKernelArg`` itself (:func:`set_arg`).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import NamedTuple

import numpy as np
import pyopencl as cl

from ..errors import DtypeError, InvalidArgument, ShapeError
from ..validate import check_array, is_device_array


class Launch(NamedTuple):
    """One kernel launch made ready: :func:`enqueue` sets ``args`` and enqueues it.

    Launchers that a hot path calls per layer (the fused write, decode attention) can hand
    these out, so that a caller repeating a launch with one argument changed
    (:class:`kvcl.stepcalls.StepCalls`) skips the launch planning.
    """

    kernel: cl.Kernel
    global_size: tuple
    local_size: "tuple | None"
    args: tuple

    def with_args(self, changes: dict) -> "Launch":
        """The same launch with ``args[i]`` replaced by ``changes[i]``."""
        args = list(self.args)
        for i, value in changes.items():
            args[i] = value
        return self._replace(args=tuple(args))


# ---- what a kernel remembers of its arguments ------------------------------------------------

class _Alive:
    """Stored on a buffer (its only strong reference): a weak reference to it dies with the
    buffer. pyopencl buffers cannot be weakly referenced themselves, but they take attributes."""

    __slots__ = ("__weakref__",)


_ALIVE = "_kvcl_alive"
_Ref = weakref.ref
_UNKNOWN = object()   # remembered for arguments compared by nothing (local memory): always set


def _alive_ref(buffer) -> weakref.ref:
    token = getattr(buffer, _ALIVE, None)
    if token is None:
        token = buffer.__dict__.setdefault(_ALIVE, _Alive())   # one token even if two threads race
    return _Ref(token)


def _remember(value):
    """What the memo keeps of one argument value: a weak reference for a buffer, the value for
    a numpy scalar and None, :data:`_UNKNOWN` for anything else."""
    if isinstance(value, cl.MemoryObjectHolder):
        return _alive_ref(value)
    if value is None or isinstance(value, np.generic):
        return value
    return _UNKNOWN


def _unchanged(value, kept) -> bool:
    """Whether a kernel argument that was set to what ``kept`` remembers still holds ``value``.

    A buffer counts as the same while it is the same (living) object: a collected buffer's
    handle may be reused by a new one, which is then set again. Scalars count as the same when
    type and value are equal (and, for zeros, the sign).
    """
    if type(kept) is _Ref:
        token = kept()
        return token is not None and getattr(value, _ALIVE, None) is token
    if kept is None:
        return value is None
    return kept is not _UNKNOWN and same_scalar(value, kept)


def same_scalar(value, kept) -> bool:
    """Whether two kernel argument values are equal as arguments: same type and value (for
    zeros, the same sign)."""
    if type(value) is not type(kept) or value != kept:
        return False
    return bool(value) or not isinstance(value, np.floating) or \
        math.copysign(1.0, value) == math.copysign(1.0, kept)


class _KernelState:
    """One kernel's lock and what it remembers of the arguments it holds."""

    __slots__ = ("lock", "kept")

    def __init__(self):
        self.lock = threading.Lock()
        self.kept: "list | None" = None


_STATE = "_kvcl_launch_state"
_state_lock = threading.Lock()


def _state(kernel: cl.Kernel) -> _KernelState:
    """The kernel's :class:`_KernelState`, kept on the kernel object (it lives as long)."""
    state = getattr(kernel, _STATE, None)
    if state is None:
        with _state_lock:
            state = getattr(kernel, _STATE, None)
            if state is None:
                state = _KernelState()
                setattr(kernel, _STATE, state)
    return state


def kernel_lock(kernel: cl.Kernel) -> threading.Lock:
    """The lock :func:`enqueue` holds while it sets ``kernel``'s arguments and enqueues it."""
    return _state(kernel).lock


def _set_args(kernel: cl.Kernel, state: _KernelState, args: tuple) -> None:
    """``kernel.set_args(*args)``, skipping the arguments that still hold the same value
    (call with ``state.lock`` held).

    OpenCL keeps a kernel's arguments after an enqueue, and the engine calls the same kernel
    per layer and step with mostly the same buffers (pools, tables) and scalars; each
    ``clSetKernelArg`` costs ~4 us on PoCL, so a 27-argument launch spent ~110 us here.
    Measured (PoCL, the engine's write + attend of one decode step, 2 KV heads x 16): 1188 ->
    834 us per layer.
    """
    kept = state.kept
    if kept is None or len(kept) != len(args):
        kernel.set_args(*args)
        state.kept = [_remember(a) for a in args]
        return
    for i, value in enumerate(args):
        if not _unchanged(value, kept[i]):
            set_arg(kernel, i, value)
            kept[i] = _remember(value)


# ---- scalar arguments through the OpenCL library itself -------------------------------------
#
# pyopencl's Kernel.set_arg costs ~6.3 µs for a numpy scalar on PoCL (a buffer: ~0.1 µs);
# clSetKernelArg called through ctypes costs ~0.7 µs. Any ICD loader dispatches a kernel made by
# another one (the dispatch table is in the object), so the library pyopencl loaded, or the
# system's, will do; without one, pyopencl sets the argument.

_CL_SET_ARG: list = []   # [function or None], resolved once


def _cl_set_kernel_arg():
    if not _CL_SET_ARG:
        fn = None
        try:
            import ctypes
            import ctypes.util
            paths = []
            try:
                with open("/proc/self/maps") as maps:   # the library pyopencl loaded (Linux)
                    paths = sorted({line.split()[-1] for line in maps if "libOpenCL" in line})
            except OSError:
                pass
            for path in paths + [ctypes.util.find_library("OpenCL")]:
                if not path:
                    continue
                try:
                    fn = ctypes.CDLL(path).clSetKernelArg
                except (OSError, AttributeError):
                    continue
                fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_size_t, ctypes.c_char_p]
                fn.restype = ctypes.c_int
                break
        except Exception:   # pragma: no cover - no ctypes: pyopencl sets every argument
            fn = None
        _CL_SET_ARG.append(fn)
    return _CL_SET_ARG[0]


def set_arg(kernel: cl.Kernel, index: int, value) -> None:
    """``kernel.set_arg(index, value)``; a numpy scalar through clSetKernelArg directly (9x
    cheaper). An error there is raised by pyopencl's own call of the same."""
    if isinstance(value, np.generic):
        fn = _cl_set_kernel_arg()
        if fn is not None:
            raw = value.tobytes()
            if fn(kernel.int_ptr, index, len(raw), raw) == 0:
                return
    kernel.set_arg(index, value)


def _forget_args(state: _KernelState) -> None:
    state.kept = None   # a failed set leaves the kernel's arguments unknown


# Launches that follow each other through a buffer (decode attention's split-K partitions, read
# by the merge) are enqueued together: no other sequence on the same queue comes between them.
_sequence_locks: dict = {}   # queue handle -> lock


def sequence_lock(queue: cl.CommandQueue) -> threading.Lock:
    """The lock under which a sequence of launches is enqueued on ``queue`` (see :func:`enqueue`)."""
    key = queue.int_ptr
    lock = _sequence_locks.get(key)
    if lock is None:
        with _state_lock:
            lock = _sequence_locks.setdefault(key, threading.Lock())
    return lock


def _enqueue_one(queue, launch: Launch, wait_for) -> cl.Event:
    state = _state(launch.kernel)
    with state.lock:
        try:
            _set_args(launch.kernel, state, launch.args)
        except BaseException:
            _forget_args(state)
            raise
        return cl.enqueue_nd_range_kernel(queue, launch.kernel, launch.global_size, launch.local_size,
                                          wait_for=wait_for)


def enqueue(queue: cl.CommandQueue, launches, wait_for=None) -> cl.Event:
    """Enqueue ``launches`` in order (the first waits for ``wait_for``); the last one's event.

    Each kernel's arguments are set (the changed ones only) and it is enqueued under that
    kernel's lock; several launches are enqueued as one sequence on ``queue``.
    """
    launches = list(launches)
    if len(launches) == 1:
        return _enqueue_one(queue, launches[0], wait_for)
    event = None
    with sequence_lock(queue):
        for launch in launches:
            event = _enqueue_one(queue, launch, wait_for)
            wait_for = None   # an in-order queue runs the rest after the first
    return event


def launch(queue: cl.CommandQueue, kernel: cl.Kernel, global_size: tuple, local_size, args: tuple,
           wait_for=None) -> cl.Event:
    """Enqueue one kernel with ``args`` (:func:`enqueue` of one :class:`Launch`)."""
    return _enqueue_one(queue, Launch(kernel, tuple(global_size), local_size, tuple(args)), wait_for)


def remembered_buffers(kernel: cl.Kernel) -> int:
    """How many of ``kernel``'s remembered arguments are buffers still alive (for tests)."""
    kept = _state(kernel).kept or []
    return sum(1 for k in kept if type(k) is _Ref and k() is not None)


# ---- reading results back ---------------------------------------------------------------------

def read_host(queue: cl.CommandQueue, host: np.ndarray, buf: cl.Buffer, *, src_offset: int = 0) -> np.ndarray:
    """Copy ``buf`` (from byte ``src_offset``) into ``host`` and wait for that copy's event.

    Not a blocking read: Mesa 22's rusticl returns from a blocking read before the bytes land
    when another thread enqueues on the same queue meanwhile (two caches on one device's queue,
    in two threads); waiting on the event is honoured everywhere and costs the same (~45 µs a
    read on PoCL either way)."""
    cl.enqueue_copy(queue, host, buf, src_offset=src_offset, is_blocking=False).wait()
    return host


def to_host(arr) -> np.ndarray:
    """A C-contiguous device array's contents (``arr.get()``, through :func:`read_host`)."""
    host = np.empty(arr.shape, arr.dtype)
    if not host.size:   # a zero-size array has no buffer to copy from
        return host
    return read_host(arr.queue, host, arr.base_data, src_offset=arr.offset)


# ---- argument checks shared by the launchers ---------------------------------------------------

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
