"""Shared fixtures: the device tier runs once per usable OpenCL device found.

``KVCL_TEST_DEVICES`` (comma-separated specs, e.g. ``"pocl,llvmpipe"``) restricts the list.
A device that cannot be used is skipped with the reason printed, never silently.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("default", max_examples=40, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("slow", max_examples=500, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("KVCL_HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover - hypothesis is a dev extra
    pass


def _device_specs() -> list[str]:
    try:
        import kvcl
        found = kvcl.devices()
    except Exception:  # no pyopencl / no ICD: the device tier is skipped below
        return []
    wanted = os.environ.get("KVCL_TEST_DEVICES")
    if wanted:
        from kvcl.runtime import find
        keep = []
        for spec in wanted.split(","):
            for index in find(spec):
                if index not in keep:
                    keep.append(index)
        return keep
    return [d.index for d in found]


DEVICE_SPECS = _device_specs()
_devices: dict = {}


def pytest_report_header(config):
    import kvcl
    try:
        lines = [f"kvcl device {d.index}: {d.platform} / {d.name} ({d.opencl_version})" for d in kvcl.devices()]
    except Exception as exc:  # pragma: no cover
        lines = [f"kvcl: no OpenCL devices ({exc})"]
    return lines or ["kvcl: no OpenCL devices found; the device tier will be skipped"]


@pytest.fixture(scope="session", params=DEVICE_SPECS or ["none"])
def device(request):
    """A :class:`kvcl.Device` for every OpenCL device found (the device tier)."""
    import kvcl
    spec = request.param
    if spec == "none":
        pytest.skip("no OpenCL device found (install kvcl[pocl])")
    if spec not in _devices:
        try:
            _devices[spec] = kvcl.Device(spec)
        except Exception as exc:
            _devices[spec] = exc
    dev = _devices[spec]
    if isinstance(dev, Exception):
        pytest.skip(f"device {spec} unusable: {dev}")
    return dev


@pytest.fixture
def queue(device):
    return device.queue


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
