"""A deep snapshot of any kvcl object: host fields and the bytes of every device buffer.

Two snapshots compare equal exactly when nothing observable changed, so "the cache is
byte-identical after a refused call" is ``state_of(obj)`` before == after.
"""

from __future__ import annotations

import enum
import threading
import types

import numpy as np
import pyopencl as cl
import pyopencl.tools as cl_tools

import kvcl

_OPAQUE = (cl.Context, cl.CommandQueue, cl.Kernel, cl.Program, cl.Device, cl.Platform, cl.Event,
           kvcl.Device, cl_tools.MemoryPool, type(threading.Lock()), type(threading.RLock()),
           types.FunctionType, types.MethodType, types.ModuleType, type)


def _buffer_bytes(buf: cl.Buffer) -> bytes:
    queue = cl.CommandQueue(buf.context)
    host = np.empty(buf.size, np.uint8)
    cl.enqueue_copy(queue, host, buf)
    queue.finish()
    return host.tobytes()


def state_of(obj, _seen: "set[int] | None" = None):
    seen = set() if _seen is None else _seen
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, enum.Enum):
        return repr(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, _OPAQUE):
        return "<opaque>"
    if hasattr(obj, "base_data") and hasattr(obj, "get") and hasattr(obj, "queue"):   # pyopencl Array
        if obj.queue is not None:
            obj.queue.finish()
        return ("cl.Array", obj.dtype.str, obj.shape, obj.get().tobytes())
    if isinstance(obj, cl.Buffer):
        return ("cl.Buffer", _buffer_bytes(obj))
    if id(obj) in seen:
        return "<seen>"
    seen.add(id(obj))
    if isinstance(obj, dict):
        return {repr(k): state_of(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else list(obj)
        return (type(obj).__name__, [state_of(v, seen) for v in items])
    fields = {}
    if hasattr(obj, "__dict__"):
        fields.update(vars(obj))
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            fields[slot] = getattr(obj, slot)
    return (type(obj).__name__, {k: state_of(v, seen) for k, v in sorted(fields.items())})
