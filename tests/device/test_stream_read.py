import numpy as np
import pyopencl.array as cla
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcl
from kvcl.ops.stream_read import empty_partial, stream_read
from kvcl.reference.stream_read import stream_read as reference


@pytest.mark.parametrize("n", [16, 16 * 1001, 1 << 20])
def test_stream_read_reads_every_element_once(device, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    src = cla.to_device(device.queue, x)
    partial = empty_partial(device.queue)
    stream_read(src, partial)
    assert abs(float(partial.get().astype(np.float64).sum()) - reference(x)) <= 1e-4 * np.abs(x).sum()


def test_stream_read_refuses_ragged_length(device):
    with pytest.raises(kvcl.ShapeError, match="src: expected a length that is a multiple of 16, got 24"):
        stream_read(cla.zeros(device.queue, 24, np.float32), empty_partial(device.queue))


@settings(deadline=None)
@given(vectors=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_property_stream_read_matches_reference(device, vectors, seed):
    x = np.random.default_rng(seed).standard_normal(16 * vectors).astype(np.float32)
    partial = empty_partial(device.queue)
    stream_read(cla.to_device(device.queue, x), partial)
    assert abs(float(partial.get().astype(np.float64).sum()) - reference(x)) <= 1e-4 * np.abs(x).sum()
