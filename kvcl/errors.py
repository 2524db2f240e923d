"""kvcl's exception classes.

Each subclasses the built-in a caller would naturally catch (``ValueError`` for a
wrong shape, ``IndexError`` for an index out of range, ...), so ``except ValueError``
keeps working while ``except kvcl.KvclError`` catches everything kvcl raises on purpose.
"""

from __future__ import annotations


class KvclError(Exception):
    """Base class of every error kvcl raises deliberately."""


class InvalidArgument(KvclError, ValueError):
    """An argument has a value outside what the call accepts (an unknown name, a bad option)."""


class ShapeError(KvclError, ValueError):
    """An array argument has the wrong shape."""


class DtypeError(KvclError, TypeError):
    """An array argument has the wrong element type, or an argument the wrong kind."""


class NonFiniteError(KvclError, ValueError):
    """An input that must be finite holds NaN or Inf."""


class OutOfRangeError(KvclError, IndexError):
    """An index (layer, head, position, block, sequence) is outside its valid range."""


class CapacityError(KvclError, ValueError):
    """A write would go past a fixed capacity."""


class OutOfBlocks(KvclError, MemoryError):
    """The block pool cannot satisfy a request; nothing was changed.

    Running out of blocks is a normal outcome for a serving engine (it preempts or waits),
    not misuse, so this is raised before any state changes.
    """

    def __init__(self, requested: int, available: int):
        self.requested = requested
        self.available = available
        super().__init__(f"out of KV blocks: requested {requested}, {available} free")


class DeviceMemoryError(KvclError, MemoryError):
    """An allocation is larger than the device can hold.

    Raised by :meth:`kvcl.Device.check_alloc` before anything is allocated (and by
    :meth:`kvcl.Device.alloc` if the device then fails to allocate). ``what`` names the buffer
    or the argument that sized it; ``requested`` and ``available`` are bytes; ``limit`` says
    which of the device's limits was passed: :attr:`ONE_BUFFER` (``CL_DEVICE_MAX_MEM_ALLOC_SIZE``)
    or :attr:`GLOBAL` (``CL_DEVICE_GLOBAL_MEM_SIZE``).
    """

    #: the largest single buffer (``CL_DEVICE_MAX_MEM_ALLOC_SIZE``)
    ONE_BUFFER = "at most in one buffer (max_mem_alloc_size)"
    #: all buffers together (``CL_DEVICE_GLOBAL_MEM_SIZE``)
    GLOBAL = "of global memory (global_mem_size)"
    #: the device refused an allocation that passed both checks (memory in use elsewhere)
    FAILED = "of global memory (global_mem_size), and allocating it failed"

    def __init__(self, what: str, requested: int, available: int, limit: str = GLOBAL):
        self.what = what
        self.requested = requested
        self.available = available
        self.limit = limit
        super().__init__(f"{what} needs {requested:,} bytes but the device has {available:,} bytes {limit}")


class DeviceMismatchError(KvclError, ValueError):
    """An array lives in another OpenCL context than the object it is passed to."""


class NoDeviceError(KvclError, RuntimeError):
    """No usable OpenCL device was found (or the requested one does not exist)."""


class CompileError(KvclError, RuntimeError):
    """An OpenCL program failed to build; ``build_log`` holds the compiler's full output."""

    def __init__(self, source_name: str, options: list[str], build_log: str):
        self.source_name = source_name
        self.options = list(options)
        self.build_log = build_log
        super().__init__(
            f"OpenCL build of {source_name} failed (options: {' '.join(options)})\n"
            f"--- build log ---\n{build_log}"
        )
