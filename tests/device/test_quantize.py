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
         ("fp8_e4m3", 0), ("fp8_e5m2", 0), ("int4", 0)]
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
    sentinel = np.full(shape + (dt.row_elems(head_dim) * dt.storage.itemsize,), 0x5A, np.uint8).view(dt.storage)
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
    data = cla.to_device(q, stored.reshape(2, -1, dt.row_elems(64)))  # any leading shape: rows are flattened
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
    data = cla.empty(q, (3, dt.row_elems(128)), dt.storage)
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
    dt = kvcl.kv_dtype(name)
    head_dim += head_dim % dt.codes_per_elem   # int4: an even head_dim
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


# ---- fp8 with a per-row scale (fp8_row_scale=True; oxibonsai's Fp8KvLayer) --------------------

FP8_NAMES = ["fp8_e4m3", "fp8_e5m2"]


def scaled_fp8_rows(rng, head_dim: int) -> np.ndarray:
    """hard_rows plus rows that stress the row scale: tiny (scale floor, denormals), huge
    (near FLT_MAX), one spike among tiny values, and E5M2 quotients that round past 57344."""
    d = head_dim
    c = np.float32(1.0) + np.arange(1, 20000, dtype=np.float32) * np.float32(2.0**-20)
    over = c[(c / (c / np.float32(57344.0)).astype(np.float32)).astype(np.float32) > np.float32(57344.0)]
    extra = [
        np.full(d, 1e-38), np.resize([1e-45, -1e-42, 0.0], d),                 # absmax far below the floor
        np.resize([3.4e38, -3.0e38, 1.0, -1e-30], d), np.full(d, -np.finfo(np.float32).max),  # huge
        np.resize([1e-20, -1e-20, 5e3], d),                                      # one spike
        np.resize([over[0], 0.5, -over[0]], d), np.resize([over[-1], over[0] / 3], d),  # e5m2 saturation
        np.resize([448 * 1.5, 448 * 0.75, -448 * 0.25, 1.0], d),                 # power-of-two scale
    ]
    return np.vstack([hard_rows(rng, d), np.stack(extra)]).astype(np.float32)


def run_scaled(queue, x, name, *, total_rows, offset, leading=None):
    """fp8_row_scale quantize on the device into sentinel-filled views; (device, reference)."""
    head_dim = x.shape[1]
    shape = leading or (total_rows,)
    sentinel = np.full(shape + (head_dim,), 0x5A, np.uint8)
    big = cla.to_device(queue, np.stack([sentinel, sentinel]))
    big_scales = cla.to_device(queue, np.full((2,) + shape, 7, np.float32))
    out, scales = big[1], big_scales[1]
    quantize_rows(cla.to_device(queue, x), out, scales=scales, kv_dtype=name, out_row_offset=offset,
                  fp8_row_scale=True).wait()
    with np.errstate(all="ignore"):
        expected = ref.quantize_rows(x, sentinel, scales=np.full(shape, 7, np.float32), kv_dtype=name,
                                     out_row_offset=offset, fp8_row_scale=True)
    assert big[0].get().tobytes() == sentinel.tobytes(), "nothing before the view is touched"
    assert big_scales[0].get().tolist() == np.full(shape, 7.0).tolist(), "nor before the scales"
    return (out.get(), scales.get()), expected


@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("head_dim", [128, 4, 300, 1])
def test_fp8_row_scale_bytes_and_decode_equal_reference(device, rng, name, head_dim):
    q = device.queue
    x = scaled_fp8_rows(rng, head_dim)
    (data, scales), (want, want_scales) = run_scaled(q, x, name, total_rows=len(x) + 5, offset=3)
    assert_same_bytes(data, want, f"{name} data")
    assert_same_bytes(scales, want_scales, f"{name} scales")
    out = cla.empty(q, x.shape, np.float32)
    dequantize_rows(cla.to_device(q, data), out, scales=cla.to_device(q, scales), kv_dtype=name,
                    row_offset=3, num_rows=len(x), fp8_row_scale=True).wait()
    with np.errstate(all="ignore"):
        back = ref.dequantize_rows(want, scales=want_scales, kv_dtype=name, row_offset=3,
                                   num_rows=len(x), fp8_row_scale=True)
    assert_same_bytes(out.get(), back, f"{name} decode")
    # the oxibonsai formula, spelled out
    fmt = name.split("_")[1]
    s = np.maximum(np.abs(x).max(axis=1) / np.float32(448.0 if fmt == "e4m3" else 57344.0), ref.FLT_EPSILON)
    assert_same_bytes(scales[3:3 + len(x)], s.astype(np.float32), "scales vs formula")
    assert np.isfinite(out.get()).all()


@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_row_scale_zero_rows_and_saturation(device, name):
    q = device.queue
    x = np.zeros((3, 64), np.float32)
    x[1, 0] = -0.0
    data, scales = cla.empty(q, (3, 64), np.uint8), cla.empty(q, (3,), np.float32)
    quantize_rows(cla.to_device(q, x), data, scales=scales, kv_dtype=name, fp8_row_scale=True).wait()
    assert scales.get().tolist() == [float(ref.FLT_EPSILON)] * 3 and not data.get()[[0, 2]].any()
    out = cla.empty(q, (3, 64), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype=name, fp8_row_scale=True).wait()
    assert np.all(out.get() == 0)
    if name == "fp8_e5m2":   # a quotient that rounds past 57344 saturates (the crate gives Inf)
        c = np.float32(1.0) + np.arange(1, 20000, dtype=np.float32) * np.float32(2.0**-20)
        over = c[(c / (c / np.float32(57344.0)).astype(np.float32)).astype(np.float32) > np.float32(57344.0)]
        row = cla.to_device(q, np.array([[over[0], 0.5]], np.float32))
        d2, s2 = cla.empty(q, (1, 2), np.uint8), cla.empty(q, (1,), np.float32)
        quantize_rows(row, d2, scales=s2, kv_dtype=name, fp8_row_scale=True).wait()
        assert d2.get()[0, 0] == 0x7B


@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_row_scale_nan_is_ignored_by_the_absmax(device, name):
    q = device.queue
    x = np.array([[np.nan, 2.0, -448.0, 1.0], [0.5, np.nan, 0.25, 0.0]], np.float32)
    data, scales = cla.empty(q, (2, 4), np.uint8), cla.empty(q, (2,), np.float32)
    quantize_rows(cla.to_device(q, x), data, scales=scales, kv_dtype=name, fp8_row_scale=True).wait()
    with np.errstate(all="ignore"):
        want, want_scales = ref.quantize_fp8_rows_scaled(x, name.split("_")[1])
    assert_same_bytes(data.get(), want, "data")
    assert_same_bytes(scales.get(), want_scales, "scales")


@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_row_scale_pool_layout_and_empty_head_dim(device, rng, name):
    q = device.queue
    x = (rng.standard_normal((16, 64)) * 100).astype(np.float32)
    pool = cla.zeros(q, (3, 2, 16, 64), np.uint8)
    scales = cla.zeros(q, (3, 2, 16), np.float32)
    quantize_rows(cla.to_device(q, x), pool, scales=scales, kv_dtype=name, out_row_offset=48,
                  fp8_row_scale=True).wait()
    want, want_scales = ref.quantize_rows(x, np.zeros((3, 2, 16, 64), np.uint8), kv_dtype=name,
                                          scales=np.zeros((3, 2, 16), np.float32), out_row_offset=48,
                                          fp8_row_scale=True)
    assert_same_bytes(pool.get(), want, "pool")
    assert_same_bytes(scales.get(), want_scales, "scales")
    # head_dim 0: no data, but each row still gets its FLT_EPSILON scale (as the reference)
    empty_rows = cla.zeros(q, (4, 0), np.uint8)
    s = cla.zeros(q, (4,), np.float32)
    quantize_rows(cla.empty(q, (2, 0), np.float32), empty_rows, scales=s, kv_dtype=name,
                  out_row_offset=1, fp8_row_scale=True).wait()
    assert s.get().tolist() == [0.0, float(ref.FLT_EPSILON), float(ref.FLT_EPSILON), 0.0]


@given(num_rows=st.integers(1, 40), head_dim=st.integers(1, 520), name=st.sampled_from(FP8_NAMES),
       extra=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_property_fp8_row_scale_matches_reference(device, num_rows, head_dim, name, extra, seed):
    r = np.random.default_rng(seed)
    x = (r.standard_normal((num_rows, head_dim)) * np.exp2(r.uniform(-60, 60, (num_rows, 1)))).astype(np.float32)
    offset = int(r.integers(0, extra + 1))
    (data, scales), (want, want_scales) = run_scaled(device.queue, x, name, total_rows=num_rows + extra,
                                                     offset=offset)
    assert_same_bytes(data, want, "data")
    assert_same_bytes(scales, want_scales, "scales")
    out = cla.empty(device.queue, (num_rows, head_dim), np.float32)
    dequantize_rows(cla.to_device(device.queue, data), out, scales=cla.to_device(device.queue, scales),
                    kv_dtype=name, row_offset=offset, num_rows=num_rows, fp8_row_scale=True).wait()
    with np.errstate(all="ignore"):
        back = ref.dequantize_rows(want, scales=want_scales, kv_dtype=name, row_offset=offset,
                                   num_rows=num_rows, fp8_row_scale=True)
    assert_same_bytes(out.get(), back, "decode")


def test_fp8_row_scale_bad_input_is_refused_before_anything_is_written(device):
    q = device.queue
    x = cla.to_device(q, np.ones((2, 8), np.float32))
    data = cla.to_device(q, np.full((4, 8), 9, np.uint8))
    scales = cla.to_device(q, np.full(4, 2.0, np.float32))
    int8_data = cla.to_device(q, np.full((4, 8), 9, np.int8))
    out = cla.empty(q, (4, 8), np.float32)

    def unchanged():
        assert data.get().tolist() == [[9] * 8] * 4 and scales.get().tolist() == [2.0] * 4
        assert int8_data.get().tolist() == [[9] * 8] * 4

    for call in (lambda **kw: quantize_rows(x, data, **kw), lambda **kw: dequantize_rows(data, out, **kw)):
        with pytest.raises(kvcl.InvalidArgument, match=r"scales: fp8_row_scale=True stores one float32 scale per row"):
            call(kv_dtype="fp8_e4m3", fp8_row_scale=True)
        with pytest.raises(kvcl.DtypeError, match="scales: expected dtype float32, got float16"):
            call(kv_dtype="fp8_e5m2", fp8_row_scale=True, scales=cla.to_device(q, np.ones(4, np.float16)))
        with pytest.raises(kvcl.DtypeError, match="scales: expected dtype float32, got uint16"):
            call(kv_dtype="fp8_e5m2", fp8_row_scale=True, scales=cla.to_device(q, np.ones(4, np.uint16)))
        with pytest.raises(kvcl.ShapeError, match="scales: expected shape"):
            call(kv_dtype="fp8_e4m3", fp8_row_scale=True, scales=cla.to_device(q, np.ones(3, np.float32)))
        with pytest.raises(kvcl.InvalidArgument, match=r"fp8_row_scale: expected True or False, got 'yes'"):
            call(kv_dtype="fp8_e4m3", fp8_row_scale="yes", scales=scales)
        with pytest.raises(kvcl.InvalidArgument, match=r"scales: fp8_e4m3 rows have no scale.*fp8_row_scale=True"):
            call(kv_dtype="fp8_e4m3", scales=scales)
    for kind in ("int8", "fp16", "fp32"):
        with pytest.raises(kvcl.InvalidArgument, match=f"fp8_row_scale: only for kv_dtype fp8_e4m3 or fp8_e5m2, got {kind}"):
            quantize_rows(x, int8_data, scales=scales, kv_dtype=kind, fp8_row_scale=True)
        with pytest.raises(kvcl.InvalidArgument, match=f"fp8_row_scale: only for kv_dtype fp8_e4m3 or fp8_e5m2, got {kind}"):
            dequantize_rows(int8_data, out, scales=scales, kv_dtype=kind, fp8_row_scale=True)
    with pytest.raises(kvcl.DtypeError, match="scales: expected a pyopencl.array.Array"):
        quantize_rows(x, data, scales=np.ones(4, np.float32), kv_dtype="fp8_e4m3", fp8_row_scale=True)
    q.finish()
    unchanged()


# ---- int4: the packing and its refusals -----------------------------

def test_int4_packs_two_codes_per_byte_low_nibble_first(device):
    """By hand, head_dim 4 (rotation order 4, 1/sqrt(4) = 1/2 exact): x = H y / 2 for
    y = (0, 15, 3.5, 7.25), so the kernel's rotation gives y back, min 0 and max 15: scale 1,
    minimum 0, codes (0, 15, 4, 7) (3.5 rounds half away), bytes (0 | 15 << 4, 4 | 7 << 4)."""
    q = device.queue
    x = cla.to_device(q, np.array([[12.875, -9.375, 2.125, -5.625]], np.float32))
    data, scales = cla.empty(q, (1, 2), np.uint8), cla.empty(q, (1,), np.float32)
    quantize_rows(x, data, scales=scales, kv_dtype="int4").wait()
    assert scales.get().view(np.uint32).tolist() == [0x3C00]          # fp16 1.0 | fp16 0.0 << 16
    assert data.get().tolist() == [[0 | 15 << 4, 4 | 7 << 4]]
    out = cla.empty(q, (1, 4), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype="int4").wait()
    assert out.get().tolist() == [[13.0, -9.0, 2.0, -6.0]]           # H (0, 15, 4, 7) / 2


def test_int4_ramp_error_is_at_most_half_a_step(device):
    """In the rotated basis every value is within half a step of its code (plus the minimum's
    float16 rounding); the rotation is orthonormal, so the row's error norm is the same."""
    q = device.queue
    ramp = np.stack([np.linspace(-1, 1, 128) * (h + 1) * 3.7 for h in range(8)]).astype(np.float32)
    data, scales = cla.empty(q, (8, 64), np.uint8), cla.empty(q, (8,), np.float32)
    quantize_rows(cla.to_device(q, ramp), data, scales=scales, kv_dtype="int4").wait()
    out = cla.empty(q, (8, 128), np.float32)
    dequantize_rows(data, out, scales=scales, kv_dtype="int4").wait()
    sc, lo = ref.int4_params(scales.get())
    y, got = ref.hadamard_rows(ramp), ref.hadamard_rows(out.get())
    bound = sc / 2 * (1 + 1e-3) + np.maximum(lo - y.min(axis=1), 0) + 1e-5 * np.abs(y).max(axis=1)
    assert np.all(np.abs(got - y).max(axis=1) <= bound)
    err = np.linalg.norm(out.get() - ramp, axis=1)
    assert np.all(err <= np.linalg.norm(got - y, axis=1) * (1 + 1e-4) + 1e-5)


def test_int4_refusals_name_the_argument_and_write_nothing(device):
    q = device.queue
    data = cla.to_device(q, np.full((2, 4), 9, np.uint8))
    scales = cla.to_device(q, np.full(2, 2.0, np.float32))

    def unchanged():
        assert data.get().tolist() == [[9] * 4] * 2 and scales.get().tolist() == [2.0] * 2

    with pytest.raises(kvcl.ShapeError, match="x: int4 packs two values per byte; head_dim must be even, got 7"):
        quantize_rows(cla.to_device(q, np.ones((2, 7), np.float32)), data, scales=scales, kv_dtype="int4")
    with pytest.raises(kvcl.ShapeError, match=r"out: expected shape \(\.\.\., 4\), got \(2, 8\)"):
        quantize_rows(cla.to_device(q, np.ones((2, 8), np.float32)), cla.empty(q, (2, 8), np.uint8),
                      scales=scales, kv_dtype="int4")
    with pytest.raises(kvcl.InvalidArgument, match=r"int8_mode: int4 has one scale convention \(0\), got 1"):
        quantize_rows(cla.to_device(q, np.ones((2, 8), np.float32)), data, scales=scales, kv_dtype="int4",
                      int8_mode=1)
    with pytest.raises(kvcl.InvalidArgument, match="scales: int4 stores one scale per row"):
        quantize_rows(cla.to_device(q, np.ones((2, 8), np.float32)), data, kv_dtype="int4")
    unchanged()
