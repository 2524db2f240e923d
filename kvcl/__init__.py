"""kvcl — a portable paged, quantized LLM KV-cache runtime in OpenCL.

Layers (an arrow only points down): ``kernels/*.cl`` → :mod:`kvcl.runtime` →
:mod:`kvcl.reference` (numpy twins of every kernel) → :mod:`kvcl.ops` (typed launchers) →
:mod:`kvcl.paging` (host bookkeeping, no OpenCL) → the cache engine → the API mirrors →
:mod:`kvcl.onnx` → :mod:`kvcl.cli`.
"""

from .dtypes import KV_DTYPES, KvDtype, kv_dtype
from .errors import (CapacityError, CompileError, DeviceMemoryError, DeviceMismatchError,
                     DtypeError, InvalidArgument, KvclError, NoDeviceError, NonFiniteError,
                     OutOfBlocks, OutOfRangeError, ShapeError)
from .runtime import Device, DeviceInfo, default_device, devices
from .engine import PagedKVCache, Step

__version__ = "0.1.0"

__all__ = [
    "CapacityError", "CompileError", "Device", "DeviceInfo", "DeviceMemoryError",
    "DeviceMismatchError", "DtypeError", "InvalidArgument", "KV_DTYPES", "KvDtype", "KvclError",
    "NoDeviceError", "NonFiniteError", "OutOfBlocks", "OutOfRangeError", "PagedKVCache", "ShapeError", "Step",
    "default_device", "devices", "kv_dtype",
]
