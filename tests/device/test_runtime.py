"""The device runtime: selection rules, memoized builds, and build failures with their log."""

import shutil

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import kvcl
from kvcl import runtime


def test_devices_lists_capabilities(device):
    infos = kvcl.devices()
    assert infos, "the device fixture found a device, so devices() must list it"
    for info in infos:
        assert info.compute_units >= 1 and info.max_work_group_size >= 1
        assert info.local_mem_bytes > 0 and info.global_mem_bytes > 0
        assert isinstance(info.fp16, bool) and isinstance(info.subgroups, bool)


def test_select_by_index_and_by_name(device):
    info = next(d for d in kvcl.devices() if d.name == device.info.name)
    by_index = kvcl.Device(info.index)
    assert by_index.device.int_ptr == device.device.int_ptr
    by_name = kvcl.Device(info.name[:6].upper())  # case-insensitive substring
    assert by_name.info.name == info.name or info.name[:6].lower() in by_name.info.platform.lower() + by_name.info.name.lower()


def test_env_variable_selects(monkeypatch, device):
    info = next(d for d in kvcl.devices() if d.name == device.info.name)
    monkeypatch.setenv("KVCL_DEVICE", info.index)
    assert kvcl.Device().device.int_ptr == device.device.int_ptr


def test_unknown_device_is_a_clear_error(device):
    with pytest.raises(kvcl.NoDeviceError, match="no platform or device name, vendor or version contains it; available:"):
        kvcl.Device("no-such-device-anywhere")
    with pytest.raises(kvcl.NoDeviceError, match="no such platform:device index"):
        kvcl.Device("97:3")


def test_no_device_error_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(runtime, "_all_devices", lambda: [])
    with pytest.raises(kvcl.NoDeviceError, match=r"pip install 'kvcl\[pocl\]'"):
        runtime._select(None)


def test_programs_and_kernels_are_memoized(device, tmp_path, monkeypatch):
    src = tmp_path / "common.h"
    shutil.copy(runtime.kernel_dir() / "common.h", src)
    (tmp_path / "twice.cl").write_text(
        '#include "common.h"\n__kernel void twice(__global float *x) { size_t i = get_global_id(0); x[i] = SCALE * x[i]; }\n')
    monkeypatch.setattr(runtime, "kernel_dir", lambda: tmp_path)
    k1 = runtime.get_kernel(device.context, "twice.cl", "twice", {"SCALE": 2.0})
    k2 = runtime.get_kernel(device.context, "twice.cl", "twice", {"SCALE": 2.0})
    k3 = runtime.get_kernel(device.context, "twice.cl", "twice", {"SCALE": 3.0})
    assert k1 is k2 and k1 is not k3
    x = cla.to_device(device.queue, np.arange(8, dtype=np.float32))
    k3(device.queue, (8,), None, x.data)
    np.testing.assert_array_equal(x.get(), 3 * np.arange(8, dtype=np.float32))


def test_build_failure_carries_the_build_log(device, tmp_path, monkeypatch):
    (tmp_path / "common.h").write_text("")
    (tmp_path / "broken.cl").write_text("__kernel void broken(__global float *x) { x[0] = undeclared_name; }\n")
    monkeypatch.setattr(runtime, "kernel_dir", lambda: tmp_path)
    with pytest.raises(kvcl.CompileError) as info:
        runtime.get_kernel(device.context, "broken.cl", "broken", {"X": 1})
    assert "undeclared_name" in info.value.build_log
    assert "broken.cl" in str(info.value) and "-DX=1" in str(info.value)


def test_kernel_dir_from_checkout_holds_every_family():
    d = runtime.kernel_dir()
    assert (d / "common.h").is_file()


def test_pocl_is_found_by_its_short_name():
    found = kvcl.devices()
    if not any("pocl" in (d.opencl_version + d.platform).lower() for d in found):
        pytest.skip("no PoCL device here")
    assert kvcl.Device("PoCL").info.opencl_version.lower().find("pocl") >= 0
    assert runtime.find("pocl")


def test_usability_names_what_is_missing(device, monkeypatch):
    assert runtime.usability(device.device) == []

    class Old:
        version = "OpenCL 1.1 Mesa"
        compiler_available = False
        local_mem_size = 4096
        max_work_group_size = 16
    reasons = runtime.usability(Old())
    assert len(reasons) == 4
    assert "OpenCL 1.1 < 1.2" in reasons[0] and "compiler" in reasons[1]
    monkeypatch.setattr(runtime, "usability", lambda d: ["OpenCL 1.1 < 1.2 (kvcl builds with -cl-std=CL1.2)"])
    with pytest.raises(kvcl.NoDeviceError, match="cannot run kvcl: OpenCL 1.1 < 1.2"):
        kvcl.Device(device=device.device)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "fp8_e4m3", "int4"])
def test_the_engines_kernels_build_without_compiler_warnings(device, dtype, monkeypatch):
    """A cold build of every program an engine step uses (write, attend, prefill and decode,
    split-K at a long context) leaves no warning in the device compiler's log. kvcl hides
    successful-build chatter from users (KVCL_SHOW_BUILD_LOG shows it), so a warning that a
    kernel change introduced would otherwise go unseen.

    Cold: kvcl's memo is emptied for the test, and a define no kernel reads makes the build
    options new, so no driver cache (PoCL keys its cache on the preprocessed source and the
    options, and keeps the log of the build that filled it) answers with an old log."""
    import uuid

    from kvcl.engine import PagedKVCache
    monkeypatch.setattr(runtime, "_programs", {})
    monkeypatch.setattr(runtime, "_kernels", {})
    nonce = uuid.uuid4().hex[:12]
    real_options = runtime.build_options
    monkeypatch.setattr(runtime, "build_options",
                        lambda defines: real_options(defines) + [f"-DKVCL_COLD_BUILD_{nonce}=1"])
    cache = PagedKVCache(1, 2, 64, num_blocks=80, block_size=16, dtype=dtype, device=device)
    rng = np.random.default_rng(0)
    seq = cache.add_sequence()
    for n in (40, 1, 1000, 1):   # prefill, decode, a long chunk, decode past 1000 tokens
        step = cache.plan([seq], [n])
        k, v = (rng.standard_normal((n, 2, 64)).astype(np.float32) for _ in range(2))
        cache.write(0, step, k, v)
        cache.attend(0, step, rng.standard_normal((n, 8, 64)).astype(np.float32))
    built = runtime._programs
    assert {key[2] for key in built} >= {"decode_attention.cl"}, sorted(built)
    noisy = {}
    for key, program in built.items():
        for dev in program.devices:
            log = program.get_build_info(dev, cl.program_build_info.LOG)
            if "warning" in log.lower():
                noisy[(key[2], key[3])] = log.strip()[:400]
    assert not noisy, noisy


def test_host_shared_memory_is_the_buffers(device):
    """Where ``host_shared`` (PoCL's CPU devices), the host array of ``shared_array`` is what a
    device command reads and writes, through both queues; elsewhere it is False and kvcl keeps
    to copies (rusticl's llvmpipe is a CPU, yet not PoCL)."""
    is_pocl_cpu = all(runtime._is_pocl(d) and d.type & cl.device_type.CPU for d in device.context.devices)
    assert device.host_shared == is_pocl_cpu
    if not device.host_shared:
        return
    host, buf = device.shared_array((3, 5), np.float32, what="a test array")
    assert host.shape == (3, 5) and host.dtype == np.float32 and host.ctypes.data % 4096 == 0
    assert not host.any()
    for queue in (q for q in (device.queue, device.inline_queue) if q is not None):
        host[...] = np.arange(15, dtype=np.float32).reshape(3, 5) + queue.int_ptr % 7
        seen = np.empty_like(host)
        cl.enqueue_copy(queue, seen, buf, is_blocking=True)       # the device reads the host's writes
        np.testing.assert_array_equal(seen, host)
        cl.enqueue_fill_buffer(queue, buf, np.float32(2.5), 0, host.nbytes).wait()
        assert (host == 2.5).all()                                   # the host sees the device's
    with pytest.raises(kvcl.DeviceMemoryError, match="a huge array"):
        device.shared_array((device.info.max_alloc_bytes // 4 + 1,), np.float32, what="a huge array")
