"""The OpenCL device runtime: device choice, contexts and queues, memoized program builds.

Device choice, in order:

1. ``KVCL_DEVICE``: ``"P:D"`` (platform and device index, as in ``kvcl devices``) or a
   case-insensitive substring of the platform or device name (``"pocl"``, ``"nvidia"``, ``"llvmpipe"``);
   (vendor and version strings count too: ``"pocl"`` finds PoCL, whose platform is called
   "Portable Computing Language");
2. ``PYOPENCL_CTX`` (pyopencl's own convention, ``"P:D"`` or ``"P"``);
3. the first GPU of any platform, else the first CPU, else any device.

Kernels come from ``kvcl/kernels`` inside an installed wheel or ``kernels/`` of a source
checkout, and are specialised with ``-D`` defines. A program is built once per
(context, device, file, defines) and its kernel objects are reused.

The inline companion (PoCL): PoCL's ``pthread`` device runs each command on its worker
threads, and handing a command to them and its completion back costs 35-70 µs per blocking
call on the development VMs, far more than a decode step of a short sequence takes to compute.
PoCL's ``basic`` device runs commands on the calling thread (launch + blocking read: ~2 µs).
Unless ``POCL_DEVICES`` is set by the user (or ``KVCL_INLINE=0``), kvcl asks PoCL for both
before the first platform query; the ``basic`` device is not listed as a device of its own but
joins its ``pthread`` twin's context as :attr:`Device.inline_queue`, sharing every buffer (both
are the host's memory), and the cache engine sends steps too small to pay for the handoff there.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .errors import CompileError, DeviceMemoryError, NoDeviceError

# Ask PoCL for its in-thread ``basic`` device beside the default ``pthread`` one (see the module
# docstring). PoCL reads this once, when the first platform query loads it.
_INLINE_ENV = (os.environ.get("KVCL_INLINE", "1") != "0" and "POCL_DEVICES" not in os.environ)
if _INLINE_ENV:
    os.environ["POCL_DEVICES"] = "pthread basic"

_NO_DEVICE_HELP = (
    "no OpenCL device found. Install the embedded CPU device with "
    "`pip install 'kvcl[pocl]'` (PoCL), or a vendor driver with its ICD "
    "(see `kvcl devices` and the 'Devices' docs page)"
)


def kernel_dir() -> Path:
    """The folder holding the ``.cl`` sources: packaged copy first, then the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "common.h").is_file():
            return candidate
    raise FileNotFoundError(f"kvcl kernel sources not found next to {here}")


def _all_devices() -> list[tuple[int, int, cl.Platform, cl.Device]]:
    found = []
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader reports "no platforms" as an error
        platforms = []
    for pi, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        devices = [d for d in devices if not _is_companion(d)]
        for di, device in enumerate(devices):
            found.append((pi, di, platform, device))
    return found


def _is_pocl(device: cl.Device) -> bool:
    return "pocl" in device.version.lower() or "portable computing language" in device.platform.name.lower()


def _is_companion(device: cl.Device) -> bool:
    """PoCL's ``basic`` device when kvcl asked for it (a companion, not a device of its own)."""
    return _INLINE_ENV and _is_pocl(device) and device.name.strip().lower().startswith("basic")


def _companion_of(device: cl.Device) -> "cl.Device | None":
    """The in-thread ``basic`` twin of a PoCL ``pthread`` device, when kvcl asked PoCL for one."""
    if not (_INLINE_ENV and _is_pocl(device) and device.name.strip().lower().startswith("pthread")):
        return None
    twin = "basic" + device.name.strip()[len("pthread"):]
    try:
        for d in device.platform.get_devices():
            if d.name.strip() == twin and d.global_mem_size == device.global_mem_size:
                return d
    except cl.Error:  # pragma: no cover
        pass
    return None


@dataclass(frozen=True)
class DeviceInfo:
    """What ``kvcl.devices()`` reports for one OpenCL device."""

    index: str  # "P:D"
    platform: str
    name: str
    vendor: str
    type: str
    opencl_version: str
    compute_units: int
    global_mem_bytes: int
    max_alloc_bytes: int
    local_mem_bytes: int
    max_work_group_size: int
    fp16: bool
    fp64: bool
    subgroups: bool
    unusable: tuple = ()   # why kvcl cannot run here (empty: it can)

    def as_row(self) -> dict:
        return self.__dict__.copy()


def _device_type_name(device: cl.Device) -> str:
    t = device.type
    for flag, name in ((cl.device_type.GPU, "GPU"), (cl.device_type.CPU, "CPU"), (cl.device_type.ACCELERATOR, "ACCEL")):
        if t & flag:
            return name
    return "OTHER"


def describe(device: cl.Device, index: str = "?") -> DeviceInfo:
    ext = device.extensions.split()
    return DeviceInfo(
        index=index,
        platform=device.platform.name.strip(),
        name=device.name.strip(),
        vendor=device.vendor.strip(),
        type=_device_type_name(device),
        opencl_version=device.version.strip(),
        compute_units=device.max_compute_units,
        global_mem_bytes=device.global_mem_size,
        max_alloc_bytes=device.max_mem_alloc_size,
        local_mem_bytes=device.local_mem_size,
        max_work_group_size=device.max_work_group_size,
        fp16="cl_khr_fp16" in ext,
        fp64="cl_khr_fp64" in ext,
        subgroups="cl_khr_subgroups" in ext or "cl_intel_subgroups" in ext,
        unusable=tuple(usability(device)),
    )


def _opencl_version(text: str) -> tuple[int, int]:
    """(major, minor) from an OpenCL version string such as ``"OpenCL 3.0 PoCL ..."``."""
    try:
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def work_items_are_threads(device: cl.Device) -> bool:
    """True where a work-item is one iteration of a thread's loop (CPU runtimes such as PoCL).

    Such devices want each work-item to stream contiguous memory and to avoid barriers; the
    kernels have a variant for them. GPUs, and llvmpipe (rusticl's CPU device, which runs
    work-items as SIMD lanes, like a GPU), want neighbouring work-items on neighbouring data.
    Measured on llvmpipe: the per-thread decode variant 9x slower than the cooperative one, a
    contiguous-chunk streaming read 0.5 GB/s.
    """
    return bool(device.type & cl.device_type.CPU) and "llvmpipe" not in device.name.lower()


MIN_LOCAL_MEM = 16 * 1024   # the smallest local-memory tile plan of the kernels
MIN_WORK_GROUP = 32


def usability(device: cl.Device) -> list[str]:
    """Why kvcl cannot run on ``device`` (an empty list: it can).

    kvcl needs OpenCL C 1.2 (``-cl-std=CL1.2``), an online compiler, and the small local-memory
    and work-group sizes its launch planners fall back to. fp16 arithmetic, fp64 and subgroups
    are never required: fp16 storage uses ``vload_half``/``vstore_half`` (core OpenCL), and
    reductions use local memory.
    """
    reasons = []
    if _opencl_version(device.version) < (1, 2):
        reasons.append(f"OpenCL {device.version.split()[1] if len(device.version.split()) > 1 else '?'} "
                       "< 1.2 (kvcl builds with -cl-std=CL1.2)")
    try:
        if not device.compiler_available:
            reasons.append("no online OpenCL C compiler")
    except cl.Error:  # pragma: no cover - drivers that cannot answer
        pass
    if device.local_mem_size < MIN_LOCAL_MEM:
        reasons.append(f"local memory {device.local_mem_size} B < {MIN_LOCAL_MEM} B")
    if device.max_work_group_size < MIN_WORK_GROUP:
        reasons.append(f"max work-group size {device.max_work_group_size} < {MIN_WORK_GROUP}")
    return reasons


def devices() -> list[DeviceInfo]:
    """Every OpenCL device visible to this process, with its capabilities."""
    return [describe(d, f"{pi}:{di}") for pi, di, _, d in _all_devices()]


def _names(platform: cl.Platform, device: cl.Device) -> str:
    """Everything a name spec is matched against: platform and device names, vendors, versions
    (PoCL calls its platform "Portable Computing Language" and says "PoCL" only in versions)."""
    return " ".join((platform.name, platform.vendor, platform.version, device.name, device.vendor,
                     device.version)).lower()


def matches(spec: str, platform: cl.Platform, device: cl.Device) -> bool:
    """True if ``spec`` (case-insensitive) occurs in the platform's or device's names."""
    return spec.strip().lower() in _names(platform, device)


def find(spec: str) -> list[str]:
    """``"P:D"`` indices of every device whose names contain ``spec`` (or whose index is it)."""
    spec = spec.strip()
    return [f"{pi}:{di}" for pi, di, platform, device in _all_devices()
            if spec == f"{pi}:{di}" or matches(spec, platform, device)]


def _select(spec: str | None) -> cl.Device:
    found = _all_devices()
    if not found:
        raise NoDeviceError(_NO_DEVICE_HELP)
    if spec:
        spec = spec.strip()
        parts = spec.split(":")
        if all(p.isdigit() for p in parts) and len(parts) in (1, 2):
            pi = int(parts[0])
            di = int(parts[1]) if len(parts) == 2 else 0
            for p_i, d_i, _, d in found:
                if (p_i, d_i) == (pi, di):
                    return d
            raise NoDeviceError(
                f"device {spec!r}: no such platform:device index; available: "
                + ", ".join(f"{p}:{d} ({dev.name.strip()})" for p, d, _, dev in found)
            )
        for _, _, platform, d in found:
            if matches(spec, platform, d):
                return d
        raise NoDeviceError(
            f"device {spec!r}: no platform or device name, vendor or version contains it; available: "
            + ", ".join(f"{p}:{d} {plat.name.strip()} / {dev.name.strip()}" for p, d, plat, dev in found)
        )
    usable = [d for _, _, _, d in found if not usability(d)]
    for wanted in (cl.device_type.GPU, cl.device_type.CPU):
        for d in usable:
            if d.type & wanted:
                return d
    if usable:
        return usable[0]
    raise NoDeviceError(
        "no OpenCL device kvcl can run on: "
        + "; ".join(f"{p}:{i} {d.name.strip()}: {', '.join(usability(d))}" for p, i, _, d in found)
        + ". " + _NO_DEVICE_HELP.replace("no OpenCL device found. ", ""))


class Device:
    """One OpenCL device with its context and in-order queue.

    Parameters
    ----------
    spec : str, optional
        ``"P:D"`` or a name substring; by default the ``KVCL_DEVICE`` / ``PYOPENCL_CTX`` rules.

    Attributes
    ----------
    queue : pyopencl.CommandQueue
        The device's in-order queue.
    inline_queue : pyopencl.CommandQueue or None
        A queue of PoCL's in-thread ``basic`` twin in the same context (the buffers are shared),
        for work smaller than a handoff to the worker threads costs; None elsewhere. Programs are
        built for it only when a kernel is first asked for there.

    Examples
    --------
    >>> dev = kvcl.Device()          # doctest: +SKIP
    >>> dev.info.name                # doctest: +SKIP
    'cpu-...'
    """

    def __init__(self, spec: str | None = None, *, device: cl.Device | None = None):
        if device is None:
            if spec is None:
                spec = os.environ.get("KVCL_DEVICE") or os.environ.get("PYOPENCL_CTX") or None
            device = _select(spec)
        problems = usability(device)
        if problems:
            raise NoDeviceError(f"device {device.name.strip()!r} cannot run kvcl: {'; '.join(problems)}")
        self.device = device
        twin = _companion_of(device)
        self.context = cl.Context([device] if twin is None else [device, twin])
        self.queue = cl.CommandQueue(self.context, device)
        self.inline_queue = None if twin is None else cl.CommandQueue(self.context, twin)

    @cached_property
    def info(self) -> DeviceInfo:
        return describe(self.device)

    @cached_property
    def host_shared(self) -> bool:
        """Whether a buffer made over page-aligned host memory (``USE_HOST_PTR``) is that memory
        for every device of the context, so that the host reads and writes it directly between
        finished commands, with no map, copy or command (:meth:`shared_array`). True only on
        PoCL's CPU devices (kernels run in this process's memory) where a round trip through
        both queues shows it: the host writes, a device copies, the host reads the copy."""
        devices = self.context.devices
        if not all(_is_pocl(d) and d.type & cl.device_type.CPU for d in devices):
            return False
        try:
            (a, abuf), (b, bbuf) = self._shared(64), self._shared(64)
            for i, queue in enumerate(q for q in (self.queue, self.inline_queue) if q is not None):
                a[:] = i + 7
                cl.enqueue_copy(queue, bbuf, abuf).wait()
                if not np.array_equal(b, a):
                    return False
            return True
        except cl.Error:  # pragma: no cover - a driver that refuses host memory
            return False

    def _shared(self, nbytes: int) -> "tuple[np.ndarray, cl.Buffer]":
        page = 4096
        raw = np.zeros(nbytes + page, np.uint8)
        host = raw[(-raw.ctypes.data) % page:][:nbytes]
        return host, cl.Buffer(self.context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=host)

    def shared_array(self, shape, dtype, *, what: str) -> "tuple[np.ndarray, cl.Buffer]":
        """``(host array, buffer)``: a zeroed ``shape`` / ``dtype`` array in page-aligned host
        memory and a buffer over it (``USE_HOST_PTR``, after :meth:`check_alloc`), for staging a
        call's inputs and outputs where :attr:`host_shared`: the host fills or reads the array
        itself, a kernel the buffer, with nothing copied between them. The buffer holds the
        memory alive; the array must be used only between finished commands that touch it."""
        dtype = np.dtype(dtype)
        nbytes = max(64, int(math.prod(shape)) * dtype.itemsize)
        self.check_alloc(what, nbytes)
        host, buf = self._shared(nbytes)
        return host[:int(math.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape), buf

    # ---- allocation: every size-checked device buffer of kvcl goes through these two ------------

    def check_alloc(self, what: str, nbytes: int, *, total: "int | None" = None) -> None:
        """Refuse, before anything is allocated, what the device cannot hold.

        Parameters
        ----------
        what : str
            The buffer(s), or the argument that sized them, as the message should name them.
        nbytes : int
            Bytes of the largest single buffer: at most the device's ``max_mem_alloc_size``.
        total : int, optional
            Bytes of all the buffers together (default ``nbytes``): at most its ``global_mem_size``.

        Raises
        ------
        kvcl.DeviceMemoryError
            Naming ``what``, the bytes requested and the limit passed.
        """
        info = self.info    # both limits read once per Device (describe() queries the driver)
        if nbytes > info.max_alloc_bytes:
            raise DeviceMemoryError(what, int(nbytes), info.max_alloc_bytes, DeviceMemoryError.ONE_BUFFER)
        total = nbytes if total is None else total
        if total > info.global_mem_bytes:
            raise DeviceMemoryError(what, int(total), info.global_mem_bytes, DeviceMemoryError.GLOBAL)

    def alloc(self, shape, dtype, *, what: str, zero: bool = False) -> cla.Array:
        """A device array of ``shape`` and ``dtype`` on :attr:`queue`, after :meth:`check_alloc`.

        ``zero``: filled with zero bytes (queued on :attr:`queue`); else uninitialised. An
        allocation the device refuses anyway raises :class:`kvcl.DeviceMemoryError` too.

        Examples
        --------
        >>> pool = dev.alloc((64, 2, 16, 128), np.float32, what="the K pool", zero=True)  # doctest: +SKIP
        """
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        self.check_alloc(what, nbytes)
        try:
            arr = cla.empty(self.queue, shape, dtype)
            if zero and nbytes:
                arr.fill(0)
        except cl.MemoryError as exc:  # pragma: no cover - depends on the device and its load
            raise DeviceMemoryError(what, nbytes, self.info.global_mem_bytes, DeviceMemoryError.FAILED) from exc
        return arr

    def kernel(self, source: str, name: str, defines: dict | None = None) -> cl.Kernel:
        """A kernel object from ``kernels/<source>`` built with ``defines`` (memoized)."""
        return get_kernel(self.context, source, name, defines)

    def __repr__(self) -> str:
        return f"<kvcl.Device {self.info.platform} / {self.info.name}>"


_default: Device | None = None
_default_lock = threading.Lock()


def default_device() -> Device:
    """The process-wide default :class:`Device`, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Device()
        return _default


def resolve_device(device: "Device | str | None") -> Device:
    """Accept a :class:`Device`, a device spec string, or ``None`` for the default."""
    if device is None:
        return default_device()
    if isinstance(device, Device):
        return device
    if isinstance(device, str):
        return Device(device)
    raise TypeError(f"device: expected a kvcl.Device, a device spec string or None, got {type(device).__name__}")


# ---- program builds -------------------------------------------------------------------------

_programs: dict[tuple, cl.Program] = {}
_kernels: dict[tuple, cl.Kernel] = {}
_build_lock = threading.Lock()


def build_options(defines: dict | None) -> list[str]:
    # Correctly rounded division keeps x / scale bit-identical to the numpy reference.
    opts = [f"-I{kernel_dir()}", "-cl-std=CL1.2", "-cl-fp32-correctly-rounded-divide-sqrt"]
    for key in sorted(defines or {}):
        value = defines[key]
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float):
            value = repr(value) + "f"
        opts.append(f"-D{key}={value}")
    return opts


def get_program(context: cl.Context, source: str, defines: dict | None = None,
                device: "cl.Device | None" = None) -> cl.Program:
    """Build ``kernels/<source>`` for ``device`` of ``context`` (default: its first) once per
    set of defines."""
    device = device or context.devices[0]
    key = (context.int_ptr, device.int_ptr, source, tuple(sorted((defines or {}).items())))
    with _build_lock:
        program = _programs.get(key)
        if program is not None:
            return program
        path = kernel_dir() / source
        text = path.read_text()
        options = build_options(defines)
        try:
            with warnings.catch_warnings():
                # compiler chatter (a non-empty log on success) only when asked for, below
                warnings.simplefilter("ignore", cl.CompilerWarning)
                program = cl.Program(context, text).build(options=options, devices=[device])
        except cl.RuntimeError as exc:  # pyopencl folds the build log into the message
            raise CompileError(source, options, str(exc)) from None
        if os.environ.get("KVCL_SHOW_BUILD_LOG"):
            for dev in (device,):
                log = program.get_build_info(dev, cl.program_build_info.LOG)
                if log.strip():
                    print(f"[kvcl] build log {source} {options}:\n{log}")
        _programs[key] = program
        return program


def get_kernel(context: cl.Context, source: str, name: str, defines: dict | None = None,
               device: "cl.Device | None" = None) -> cl.Kernel:
    """A reusable ``cl.Kernel`` for ``device`` of ``context`` (default: its first), memoized per
    context, device, source, defines and name.

    Kernel objects carry their argument state, so callers must set all arguments and
    enqueue under one lock if several threads share them (the cache engine does).
    """
    device = device or context.devices[0]
    key = (context.int_ptr, device.int_ptr, source, tuple(sorted((defines or {}).items())), name)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = cl.Kernel(get_program(context, source, defines, device), name)
        with _build_lock:
            kernel = _kernels.setdefault(key, kernel)
    return kernel
