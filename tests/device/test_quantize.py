"""kernels/quantize.cl against kvcl.reference.quantize: stored bytes equal, decode exact."""

import numpy as np
import pyopencl.array as cla
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvcl
from kvcl.dtypes import INT8_MODE_AWAY, INT8_MODE_EVEN
from kvcl.ops.quantize import dequantize_rows, quantize_rows
from kvcl.reference import quantize as ref

# (kv dtype, int8 mode): every storage format, int8 in both rounding conventions
CASES = [("fp32", 0), ("fp16", 0), ("int8", INT8_MODE_AWAY), ("int8", INT8_MODE_EVEN),
         ("fp8_e4m3", 0), ("fp8_e5m2", 0)]
CASE_IDS = [f"{name}-mode{mode}" if name == "int8" else name for name, mode in CASES]


def scale_dtype(mode):
    return np.uint16 if mode == INT8_MODE_EVEN else np.float32


def hard_rows(rng, head_dim: int) -> np.ndarray:
    """Rows that hit every rounding edge of every format, then random wide-range rows."""
    d = head_dim
    rows = [np.zeros(d)]                                                     # all-zero row
    ties = np.resize(np.array([127, -127, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -3.5, 0]), d)
    rows.append(ties)                                                        # absmax 127: scale 1, x/scale = k + 0.5
    rows.append(np.resize([448, 464, 480, 500, -1e6, 1e30, 57344, 61440, 65520, -7e4], d))  # past fp8/fp16 max
    sub = np.arange(d) % 16
    rows.append(sub * 2.0**-10)                                              # e4m3 subnormals and their ties
    rows.append(-(sub * 2.0**-17))                                           # e5m2 subnormals and their ties
    rows.append(np.resize([1e-40, -3e-39, 1e-45, 2.0**-126, 0.0], d))        # float32 denormals
    rows.append(np.resize([1.0, 1.0 + 2.0**-4, 1.0 + 3 * 2.0**-5, 2.0**-14 * 1.5, 65504, 2049], d))  # fp8/fp16 ties
    rows.append(np.full(d, 1e-9))                                            # int8: absmax below the scale floors
    wide = rng.standard_normal((12, d)) * np.exp2(rng.uniform(-30, 30, (12, 1)))
    spiky = rng.standard_normal((4, d)) * np.exp2(rng.uniform(-12, 12, (4, d)))  # wide range inside a row
    return np.vstack([np.stack(rows), wide, spiky]).astype(np.float32)


def run_quantize(queue, x, name, mode, *, total_rows, offset, leading=None):
    """Quantize on the device into sentinel-filled storage; return (data, scales) as numpy."""
    dt = kvcl.kv_dtype(name)
    head_dim = x.shape[1]
    shape = leading or (total_rows,)
    sentinel = np.full(shape + (head_dim * dt.storage.itemsize,), 0x5A, np.uint8).view(dt.storage)
    # out is a view at an offset inside a bigger buffer, to exercise the base offsets
    big = cla.to_device(queue, np.stack([sentinel, sentinel]))
    out = big[1]
    scales = None
    if dt.has_scale:
        big_scales = cla.to_device(queue, np.full((2,) + shape, 7, scale_dtype(mode)))
        scales = big_scales[1]
    quantize_rows(cla.to_device(queue, x), out, scales=scales, kv_dtype=name, int8_mode=mode,
                  out_row_offset=offset).wait()
    expected = ref.quantize_rows(x, sentinel, kv_dtype=name, int8_mode=mode, out_row_offset=offset,
                                 scales=None if scales is None else np.full(shape, 7, scale_dtype(mode)))
    assert big[0].get().tobytes() == sentinel.tobytes(), "nothing before the view is touched"
    return (out.get(), None if scales is None else scales.get()), expected


def assert_same_bytes(got, want, what):
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.tobytes() != want.tobytes():
        a, b = got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)
        first = int(np.flatnonzero(a != b)[0]) // got.dtype.itemsize
        raise AssertionError(f"{what}: element {first} differs: {got.reshape(-1)[first]!r} != {want.reshape(-1)[first]!r}")


@pytest.mark.parametrize("name,mode", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("head_dim", [128, 4, 300])
def test_stored_bytes_equal_reference(device, rng, name, mode, head_dim):
    x = hard_rows(rng, head_dim)
    with np.errstate(all="ignore"):
        (data, scales), (want_data, want_scales) = run_quantize(
            device.queue, x, name, mode, total_rows=len(x) + 5, offset=3)
    assert_same_bytes(data, want_data, f"{name} data")
    if want_scales is not None:
        assert_same_bytes(scales, want_scales, f"{name} scales")


@pytest.mark.parametrize("name,mode", CASES, ids=CASE_IDS)
def test_decode_is_exact(device, rng, name, mode):
    dt = kvcl.kv_dtype(name)
    q = device.queue
    x = hard_rows(rng, 64)
    with np.errstate(all="ignore"):
        stored, stored_scales = ref.encode_kv(x, name, int8_mode=mode)
    data = cla.to_device(q, stored.reshape(2, -1, 64))  # any leading shape: rows are flattened
    scales = None if stored_scales is None else cla.to_device(q, stored_scales.reshape(2, -1))
    out = cla.empty(q, (7, 64), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype=dt, int8_mode=mode, row_offset=5, num_rows=7).wait()
    with np.errstate(all="ignore"):
        want = ref.dequantize_rows(stored, scales=stored_scales, kv_dtype=name, int8_mode=mode,
                                   row_offset=5, num_rows=7)
    assert_same_bytes(out.get(), want, f"{name} decode")


def test_002_source_row(device):
    q = device.queue
    x = cla.to_device(q, np.array([[127.0, -127.0, 0.0]], np.float32))
    data, scales = cla.empty(q, (1, 3), np.int8), cla.empty(q, (1,), np.float32)
    quantize_rows(x, data, scales=scales, kv_dtype="int8").wait()
    assert scales.get().tolist() == [1.0] and data.get().tolist() == [[127, -127, 0]]
    out = cla.empty(q, (1, 3), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype="int8").wait()
    assert out.get().tolist() == [[127.0, -127.0, 0.0]]


@pytest.mark.parametrize("name,mode", CASES, ids=CASE_IDS)
def test_zero_rows_dequantize_to_exactly_zero(device, name, mode):
    q = device.queue
    dt = kvcl.kv_dtype(name)
    x = cla.zeros(q, (3, 128), np.float32)
    data = cla.empty(q, (3, 128), dt.storage)
    scales = cla.empty(q, (3,), scale_dtype(mode)) if dt.has_scale else None
    quantize_rows(x, data, scales=scales, kv_dtype=name, int8_mode=mode).wait()
    out = cla.empty(q, (3, 128), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype=name, int8_mode=mode).wait()
    back = out.get()
    assert np.all(back == 0) and not np.signbit(back).any()


@pytest.mark.parametrize("mode", [INT8_MODE_AWAY, INT8_MODE_EVEN])
def test_ramp_rows_mae_below_half_a_percent_of_max(device, mode):
    q = device.queue
    heads, head_dim = 8, 128
    ramp = np.stack([np.linspace(-1, 1, head_dim) * (h + 1) * 3.7 for h in range(heads)]).astype(np.float32)
    data = cla.empty(q, (heads, head_dim), np.int8)
    scales = cla.empty(q, (heads,), scale_dtype(mode))
    quantize_rows(cla.to_device(q, ramp), data, scales=scales, kv_dtype="int8", int8_mode=mode).wait()
    out = cla.empty(q, (heads, head_dim), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype="int8", int8_mode=mode).wait()
    mae = np.abs(out.get() - ramp).mean(axis=1)
    assert np.all(mae < 0.005 * np.abs(ramp).max(axis=1)), mae


def test_pool_layout_with_scales_per_token_head(device, rng):
    """A 4-D pool [blocks, heads, block_size, D] and scales [blocks, heads, block_size]."""
    q = device.queue
    x = rng.standard_normal((16, 64)).astype(np.float32)
    pool = cla.zeros(q, (3, 2, 16, 64), np.int8)
    scales = cla.zeros(q, (3, 2, 16), np.float32)
    quantize_rows(cla.to_device(q, x), pool, scales=scales, kv_dtype="int8", out_row_offset=32 + 16).wait()
    want, want_scales = ref.quantize_rows(x, np.zeros((3, 2, 16, 64), np.int8), kv_dtype="int8",
                                          scales=np.zeros((3, 2, 16), np.float32), out_row_offset=48)
    assert_same_bytes(pool.get(), want, "pool")
    assert_same_bytes(scales.get(), want_scales, "scales")
    assert np.any(pool.get()[1, 1]) and not np.any(pool.get()[1, 0])  # block 1, head 1 only


@given(num_rows=st.integers(1, 40), head_dim=st.integers(1, 520), case=st.sampled_from(CASES),
       extra=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_property_random_shapes_match_reference(device, num_rows, head_dim, case, extra, seed):
    name, mode = case
    r = np.random.default_rng(seed)
    x = (r.standard_normal((num_rows, head_dim)) * np.exp2(r.uniform(-20, 20, (num_rows, 1)))).astype(np.float32)
    offset = int(r.integers(0, extra + 1))
    with np.errstate(all="ignore"):
        (data, scales), (want, want_scales) = run_quantize(
            device.queue, x, name, mode, total_rows=num_rows + extra, offset=offset)
    assert_same_bytes(data, want, "data")
    if want_scales is not None:
        assert_same_bytes(scales, want_scales, "scales")
    out = cla.empty(device.queue, (num_rows, head_dim), np.float32)
    dt = kvcl.kv_dtype(name)
    dequantize_rows(cla.to_device(device.queue, data), out, kv_dtype=name, int8_mode=mode,
                    scales=None if scales is None else cla.to_device(device.queue, scales),
                    row_offset=offset, num_rows=num_rows).wait()
    with np.errstate(all="ignore"):
        back = ref.dequantize_rows(want, scales=want_scales, kv_dtype=dt, int8_mode=mode,
                                   row_offset=offset, num_rows=num_rows)
    assert_same_bytes(out.get(), back, "decode")


# ---- bad input: a clear error naming the argument, and nothing written ------------------------

def test_bad_input_is_refused_before_anything_is_written(device):
    q = device.queue
    x = cla.to_device(q, np.ones((2, 8), np.float32))
    data = cla.to_device(q, np.full((4, 8), 9, np.int8))
    scales = cla.to_device(q, np.full(4, 2.0, np.float32))

    def unchanged():
        assert data.get().tolist() == [[9] * 8] * 4 and scales.get().tolist() == [2.0] * 4

    with pytest.raises(kvcl.OutOfRangeError, match="out_row_offset: expected < 3, got 3"):
        quantize_rows(x, data, scales=scales, kv_dtype="int8", out_row_offset=3)
    with pytest.raises(kvcl.InvalidArgument, match="scales: int8 stores one scale per row"):
        quantize_rows(x, data, kv_dtype="int8")
    with pytest.raises(kvcl.DtypeError, match="out: expected dtype uint8, got int8"):
        quantize_rows(x, data, kv_dtype="fp8_e4m3")
    with pytest.raises(kvcl.DtypeError, match="scales: expected dtype uint16 or float16, got float32"):
        quantize_rows(x, data, scales=scales, kv_dtype="int8", int8_mode=1)
    with pytest.raises(kvcl.ShapeError, match=r"out: expected shape \(\.\.\., 8\), got \(4, 4\)"):
        quantize_rows(x, cla.empty(q, (4, 4), np.int8), scales=scales, kv_dtype="int8")
    with pytest.raises(kvcl.DtypeError, match="x: expected a pyopencl.array.Array, got ndarray"):
        quantize_rows(np.ones((2, 8), np.float32), data, scales=scales, kv_dtype="int8")
    with pytest.raises(kvcl.DtypeError, match="x: expected dtype float32, got float64"):
        quantize_rows(cla.to_device(q, np.ones((2, 8))), data, scales=scales, kv_dtype="int8")
    with pytest.raises(kvcl.OutOfRangeError, match="int8_mode: expected < 2, got 2"):
        quantize_rows(x, data, scales=scales, kv_dtype="int8", int8_mode=2)
    with pytest.raises(kvcl.InvalidArgument, match="dtype: expected one of"):
        quantize_rows(x, data, kv_dtype="bf16")
    out = cla.empty(q, (2, 8), np.float32)
    with pytest.raises(kvcl.OutOfRangeError, match="num_rows: expected < 4, got 4"):
        dequantize_rows(data, out, scales=scales, kv_dtype="int8", row_offset=1, num_rows=4)
    with pytest.raises(kvcl.ShapeError, match=r"out: expected shape \(4, 8\), got \(2, 8\)"):
        dequantize_rows(data, out, scales=scales, kv_dtype="int8")
    unchanged()


def test_empty_input_is_a_no_op(device):
    q = device.queue
    data = cla.to_device(q, np.full((2, 8), 3, np.uint8))
    quantize_rows(cla.empty(q, (0, 8), np.float32), data, kv_dtype="fp8_e5m2", out_row_offset=2).wait()
    dequantize_rows(data, cla.empty(q, (0, 8), np.float32), kv_dtype="fp8_e5m2", row_offset=2).wait()
    assert data.get().tolist() == [[3] * 8] * 2
