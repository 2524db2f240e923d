"""kvcl.oxibonsai INT8 and FP8 layers against the crate's own tests
(``tests/kv_cache_quant_tests.rs``, ``tests/fp8_kv_cache_tests.rs``) and kvcl's numpy reference."""

import numpy as np
import pytest

import kvcl
from kvcl.oxibonsai import (CapacityExceeded, Fp8KvCache, Fp8KvFormat, Fp8KvLayer, HeadOutOfRange,
                            LayerOutOfRange, PositionOutOfRange, QuantizedKvCache, QuantizedKvLayer,
                            QuantKvError, ShapeMismatch, dequantize_row_i8, quant_error_mae,
                            quantize_row_i8)
from kvcl.reference.quantize import (FLT_EPSILON, dequantize_int8_rows, fp8_decode, fp8_encode,
                                     quantize_int8_rows)


def ramp(n, step, offset):
    return (np.arange(n, dtype=np.float32) * np.float32(step) + np.float32(offset)).astype(np.float32)


def mae(a, b):
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---- row helpers (kv_cache_quant_tests.rs 1-5) --------------------------------------------------

def test_quantize_row_exact_range(device):
    q, scale = quantize_row_i8([127.0, -127.0, 0.0], device=device)
    assert abs(scale - 1.0) < 1e-5
    assert q.dtype == np.int8 and q.tolist() == [127, -127, 0]


def test_quantize_row_roundtrip_small_error(device):
    row = ramp(64, 0.1, -3.2)
    q, scale = quantize_row_i8(row, device=device)
    assert mae(row, dequantize_row_i8(q, scale, device=device)) < np.abs(row).max() * 0.005


def test_dequantize_row_zero_scale(device):
    q, scale = quantize_row_i8(np.zeros(8), device=device)
    assert scale == FLT_EPSILON
    deq = dequantize_row_i8(q, scale, device=device)
    assert deq.shape == (8,) and (np.abs(deq) < 1e-5).all()


def test_quant_error_mae_perfect(device):
    row = np.zeros(32, np.float32)
    q, scale = quantize_row_i8(row, device=device)
    assert quant_error_mae(row, q, scale, device=device) == 0.0


def test_quant_error_mae_bounded(device):
    row = ramp(128, 0.05, -3.2)
    q, scale = quantize_row_i8(row, device=device)
    assert quant_error_mae(row, q, scale, device=device) < np.abs(row).max() / 100.0


def test_row_helpers_match_the_reference_exactly(device, rng):
    # Exact halves after scaling: round half AWAY from zero (numpy's np.round would go to even).
    halves = np.array([127.0, 0.5, 1.5, -2.5, 2.5, -0.5], np.float32)
    q, scale = quantize_row_i8(halves, device=device)
    assert scale == 1.0 and q.tolist() == [127, 1, 2, -3, 3, -1]
    for row in [halves, rng.standard_normal(97).astype(np.float32) * 3, np.array([1e-30, -2e-30], np.float32),
                np.array([5.0], np.float32)]:
        q, scale = quantize_row_i8(row, device=device)
        want_q, want_s = quantize_int8_rows(row[None, :], 0)
        np.testing.assert_array_equal(q, want_q[0])
        assert np.float32(scale) == want_s[0]
        np.testing.assert_array_equal(dequantize_row_i8(q, scale, device=device),
                                      dequantize_int8_rows(want_q, want_s)[0])
        restored = dequantize_int8_rows(want_q, want_s)[0]
        errors = np.abs(row - restored).astype(np.float32)
        want_mae = np.float32(np.add.accumulate(errors, dtype=np.float32)[-1]) / np.float32(row.size)
        assert quant_error_mae(row, q, scale, device=device) == float(want_mae)
    assert quantize_row_i8([], device=device)[1] == FLT_EPSILON
    assert quant_error_mae([], [], 1.0, device=device) == 0.0
    assert quant_error_mae([1.0, 2.0, 3.0], [127], 1 / 127, device=device) == 0.0  # min of the lengths


def test_row_helpers_refuse_non_finite(device):
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(kvcl.NonFiniteError):
            quantize_row_i8([1.0, bad], device=device)
        with pytest.raises(kvcl.NonFiniteError):
            quant_error_mae([1.0, bad], [1, 2], 1.0, device=device)
        with pytest.raises(kvcl.NonFiniteError):
            dequantize_row_i8([1, 2], bad, device=device)
    with pytest.raises(kvcl.OutOfRangeError):
        dequantize_row_i8([300], 1.0, device=device)
    with pytest.raises(kvcl.DtypeError):
        dequantize_row_i8([1.5], 1.0, device=device)


# ---- QuantizedKvLayer (tests 6-14) -------------------------------------------------------------

def test_layer_new(device):
    layer = QuantizedKvLayer.new(32, 4, 64, device=device)
    assert (layer.capacity, layer.num_kv_heads, layer.head_dim, layer.len) == (32, 4, 64, 0)


def test_layer_push_one_token(device):
    layer = QuantizedKvLayer(8, 2, 16, device=device)
    layer.push(ramp(32, 0.1, 0.0), ramp(32, -0.1, 0.0))
    assert layer.len == 1 and len(layer) == 1


@pytest.mark.parametrize("which", ["key", "value"])
def test_layer_get_roundtrip(device, which):
    H, D = 4, 64
    layer = QuantizedKvLayer(16, H, D, device=device)
    data = ramp(H * D, 0.05, -6.4) if which == "key" else ramp(H * D, 0.07, -8.0)
    zeros = np.zeros(H * D, np.float32)
    layer.push(*((data, zeros) if which == "key" else (zeros, data)))
    for h in range(H):
        got = layer.get_key(0, h) if which == "key" else layer.get_value(0, h)
        assert got.shape == (D,)
        original = data[h * D:(h + 1) * D]
        assert mae(original, got) < np.abs(original).max() * 0.01


def test_layer_get_keys_at(device):
    H, D = 3, 8
    layer = QuantizedKvLayer(4, H, D, device=device)
    layer.push(ramp(H * D, 1.0, 1.0), np.zeros(H * D))
    assert layer.get_keys_at(0).shape == (H * D,)
    assert layer.get_values_at(0).shape == (H * D,)


def test_layer_capacity_error(device):
    layer = QuantizedKvLayer(2, 1, 4, device=device)
    layer.push([1.0] * 4, [2.0] * 4)
    layer.push([1.0] * 4, [2.0] * 4)
    with pytest.raises(QuantKvError.CapacityExceeded) as info:
        layer.push([1.0] * 4, [2.0] * 4)
    assert (info.value.capacity, info.value.pos) == (2, 2)
    assert str(info.value) == "capacity exceeded: capacity 2, tried to push token 2"


def test_layer_oob_error(device):
    layer = QuantizedKvLayer(4, 2, 8, device=device)
    with pytest.raises(PositionOutOfRange) as info:
        layer.get_key(0, 0)
    assert info.value.pos == 0 and info.value.args[0] == "token position 0 out of range"


def test_layer_memory_and_compression_ratio(device):
    layer = QuantizedKvLayer(64, 8, 128, device=device)
    assert layer.memory_bytes() < layer.fp32_memory_bytes()
    big = QuantizedKvLayer(512, 8, 128, device=device)
    C, H, D = 512, 8, 128
    assert big.memory_bytes() == 2 * C * H * D + 8 * C * H
    assert big.fp32_memory_bytes() == 8 * C * H * D
    assert 3.5 <= big.compression_ratio() <= 4.1
    assert big.compression_ratio() == float(np.float32(8 * C * H * D) / np.float32(2 * C * H * D + 8 * C * H))
    assert round(big.compression_ratio(), 3) == 3.879
    assert QuantizedKvLayer(0, 8, 128, device=device).compression_ratio() == 1.0


# ---- QuantizedKvCache (tests 15-20) -------------------------------------------------------------

def test_cache_new_and_push_step(device):
    cache = QuantizedKvCache.new(6, 32, 4, 64, device=device)
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (6, 4, 64)
    L, H, D = 4, 2, 16
    cache = QuantizedKvCache(L, 8, H, D, device=device)
    keys = [ramp(H * D, 0.01, l) for l in range(L)]
    values = [ramp(H * D, -0.01, -l) for l in range(L)]
    cache.push_step(keys, values)
    assert cache.seq_len() == 1
    assert QuantizedKvCache(0, 8, H, D, device=device).seq_len() == 0


def test_cache_total_memory_compressed(device):
    cache = QuantizedKvCache(12, 256, 8, 128, device=device)
    assert cache.total_memory_bytes() < cache.total_fp32_memory_bytes()
    assert 3.5 <= cache.compression_ratio() <= 4.1


def test_cache_get_across_layers(device):
    L, H, D = 3, 2, 8
    cache = QuantizedKvCache(L, 8, H, D, device=device)
    keys = [np.float32(l * 10) + np.arange(H * D, dtype=np.float32) for l in range(L)]
    cache.push_step(keys, [-k for k in keys])
    for l in range(L):
        for h in range(H):
            key, val = cache.get_key(l, 0, h), cache.get_value(l, 0, h)
            assert key.shape == val.shape == (D,)
            expected = l * 10.0 + h * D
            assert abs(key[0] - expected) < abs(expected) * 0.02 + 0.5
            assert abs(val[0] + key[0]) < abs(key[0]) * 0.04 + 0.5


def test_cache_layer_oob_error(device):
    cache = QuantizedKvCache(4, 8, 2, 16, device=device)
    with pytest.raises(LayerOutOfRange) as info:
        cache.get_key(4, 0, 0)
    assert (info.value.layer, info.value.num_layers) == (4, 4)
    assert str(info.value) == "layer 4 out of range (num_layers = 4)"


def test_cache_multiple_tokens(device):
    L, H, D, T = 2, 2, 16, 10
    cache = QuantizedKvCache(L, 32, H, D, device=device)
    for t in range(T):
        keys = [np.float32(t * 100 + l * 10) + np.arange(H * D, dtype=np.float32) for l in range(L)]
        cache.push_step(keys, [-k for k in keys])
    assert cache.seq_len() == T
    for t in range(T):
        for l in range(L):
            for h in range(H):
                key, val = cache.get_key(l, t, h), cache.get_value(l, t, h)
                assert key.shape == val.shape == (D,)
                if t > 0:
                    assert key[0] > 0 and val[0] < 0


# ---- against kvcl's numpy reference: stored bytes and reads ------------------------------------

def test_layer_stores_exactly_the_reference_bytes(device, rng):
    C, H, D = 5, 3, 37
    layer = QuantizedKvLayer(C, H, D, device=device)
    pushed_k, pushed_v = [], []
    for t in range(4):
        k = (rng.standard_normal((H, D)) * (t + 1)).astype(np.float32)
        v = np.round(rng.standard_normal((H, D)) * 8) / 2  # many exact halves after scaling
        v[1] = 0.0                                         # an all-zero row: FLT_EPSILON scale
        pushed_k.append(k), pushed_v.append(v.astype(np.float32))
        layer.push(k.reshape(-1) if t % 2 else k, v)       # flat (as Rust) or [H, D]
    stored = layer._stored()
    for name, rows in (("keys", pushed_k), ("values", pushed_v)):
        want_q, want_s = quantize_int8_rows(np.stack(rows), 0)
        np.testing.assert_array_equal(stored[name][:4], want_q)
        np.testing.assert_array_equal(stored[name[:-1] + "_scales"][:4], want_s)
        assert not stored[name][4:].any() and not stored[name[:-1] + "_scales"][4:].any()
    assert stored["value_scales"][0, 1] == FLT_EPSILON
    want_q, want_s = quantize_int8_rows(np.stack(pushed_k), 0)
    restored = dequantize_int8_rows(want_q, want_s)
    for t in range(4):
        np.testing.assert_array_equal(layer.get_keys_at(t), restored[t].reshape(-1))
        for h in range(H):
            np.testing.assert_array_equal(layer.get_key(t, h), restored[t, h])
    want_q, want_s = quantize_int8_rows(np.stack(pushed_v), 0)
    np.testing.assert_array_equal(layer.get_values_at(3), dequantize_int8_rows(want_q, want_s)[3].reshape(-1))
    np.testing.assert_array_equal(layer.get_value(2, 2), dequantize_int8_rows(want_q, want_s)[2, 2])


# ---- error precedence, error classes, atomicity ------------------------------------------------

def test_error_classes_and_messages():
    cases = [
        (ShapeMismatch(32, 31), kvcl.ShapeError, ValueError, "key/value shape mismatch: expected 32, got 31"),
        (CapacityExceeded(2, 2), kvcl.CapacityError, ValueError, "capacity exceeded: capacity 2, tried to push token 2"),
        (PositionOutOfRange(7), kvcl.OutOfRangeError, IndexError, "token position 7 out of range"),
        (HeadOutOfRange(3, 2), kvcl.OutOfRangeError, IndexError, "head index 3 out of range (num_kv_heads = 2)"),
        (LayerOutOfRange(4, 4), kvcl.OutOfRangeError, IndexError, "layer 4 out of range (num_layers = 4)"),
    ]
    for err, kvcl_class, builtin, message in cases:
        assert isinstance(err, QuantKvError) and isinstance(err, kvcl_class) and isinstance(err, builtin)
        assert isinstance(err, kvcl.KvclError) and str(err) == message
    assert QuantKvError.ShapeMismatch is ShapeMismatch and QuantKvError.HeadOutOfRange is HeadOutOfRange


def test_push_error_precedence_and_nothing_written(device):
    H, D = 2, 4
    layer = QuantizedKvLayer(1, H, D, device=device)
    ok = np.ones(H * D, np.float32)
    nan = ok.copy()
    nan[3] = np.nan
    empty = layer._snapshot()
    for keys, values, error in [
        (np.ones(7), np.ones(9), ShapeMismatch),   # keys first ...
        (ok, nan, kvcl.NonFiniteError),            # finiteness after Rust's checks
        (ok, [1.0, np.inf] * 4, kvcl.NonFiniteError),
        (ok, np.ones((4, 2)), kvcl.ShapeError),    # a 2-D input must be [H, D]
    ]:
        with pytest.raises(error):
            layer.push(keys, values)
        assert layer._snapshot() == empty
    with pytest.raises(ShapeMismatch) as info:
        layer.push(np.ones(7), np.ones(9))
    assert (info.value.expected, info.value.actual) == (8, 7)
    with pytest.raises(ShapeMismatch) as info:
        layer.push(ok, np.ones(9))                 # ... then values
    assert info.value.actual == 9
    layer.push(ok, ok)
    full = layer._snapshot()
    with pytest.raises(ShapeMismatch):             # shapes before capacity
        layer.push(ok, np.ones(9))
    with pytest.raises(CapacityExceeded):          # capacity before finiteness
        layer.push(nan, nan)
    assert layer._snapshot() == full
    with pytest.raises(PositionOutOfRange):        # position before head
        layer.get_key(1, 5)
    with pytest.raises(HeadOutOfRange) as info:
        layer.get_value(0, 5)
    assert (info.value.head, info.value.num_heads) == (5, 2)
    with pytest.raises(PositionOutOfRange):
        layer.get_key(-1, 0)
    with pytest.raises(kvcl.DtypeError):
        layer.get_key(0.0, 0)


def test_push_step_is_atomic(device):
    L, H, D = 3, 2, 4
    cache = QuantizedKvCache(L, 2, H, D, device=device)
    ok = [np.full(H * D, l + 1.0, np.float32) for l in range(L)]
    cache.push_step(ok, ok)
    before = cache._snapshot()
    nan = [k.copy() for k in ok]
    nan[2][0] = np.nan
    short = [k.copy() for k in ok]
    short[1] = short[1][:-1]
    for keys, values, error in [
        (ok[:2], ok, LayerOutOfRange),             # Rust: layer = the given count
        (ok, ok + ok[:1], LayerOutOfRange),
        (ok, short, ShapeMismatch),                # Rust would already have pushed layer 0
        (nan, ok, kvcl.NonFiniteError),            # ... and layers 0 and 1 here
        ("abc", ok, kvcl.DtypeError),
    ]:
        with pytest.raises(error):
            cache.push_step(keys, values)
        assert cache._snapshot() == before and cache.seq_len() == 1
    with pytest.raises(LayerOutOfRange) as info:
        cache.push_step(ok[:2], ok)
    assert (info.value.layer, info.value.num_layers) == (2, 3)
    cache.push_step(ok, ok)
    with pytest.raises(CapacityExceeded) as info:
        cache.push_step(ok, ok)
    assert (info.value.capacity, info.value.pos) == (2, 2)


# ---- FP8 (fp8_kv_cache_tests.rs 1-11) -----------------------------------------------------------

def test_fp8_e4m3_roundtrip_small_error(device):
    layer = Fp8KvLayer.with_capacity(1, 64, 4, Fp8KvFormat.E4M3, device=device)
    key = ramp(64, 0.1, -3.2)
    layer.push(key, np.zeros(64))
    max_abs = np.abs(key).max()
    assert np.abs(key - layer.get_key(0)).max() < (max_abs / 448.0) * 448.0 * 0.05


def test_fp8_e5m2_roundtrip_small_error(device):
    layer = Fp8KvLayer.with_capacity(1, 64, 4, Fp8KvFormat.E5M2, device=device)
    key = ramp(64, 0.15, -4.8)
    layer.push(key, np.zeros(64))
    assert np.abs(key - layer.get_key(0)).max() < np.abs(key).max() * 0.30 + 1e-5


@pytest.mark.parametrize("which", ["key", "value"])
def test_fp8_e4m3_push_get_roundtrip(device, which):
    H, D = 4, 64
    layer = Fp8KvLayer.with_capacity(H, D, 16, Fp8KvFormat.E4M3, device=device)
    data = ramp(H * D, 0.05, -6.4) if which == "key" else ramp(H * D, 0.07, -8.0)
    zeros = np.zeros(H * D, np.float32)
    layer.push(*((data, zeros) if which == "key" else (zeros, data)))
    assert layer.len == 1
    got = layer.get_key(0) if which == "key" else layer.get_value(0)
    assert got.shape == (H * D,)
    for h in range(H):
        original = data[h * D:(h + 1) * D]
        assert mae(original, got[h * D:(h + 1) * D]) < np.abs(original).max() * 0.05


def test_fp8_compression_ratio_vs_fp32(device):
    # The crate's test passes (512, 8, 128) as (heads, head_dim, capacity).
    layer = Fp8KvLayer.with_capacity(512, 8, 128, Fp8KvFormat.E4M3, device=device)
    assert layer.memory_bytes() * 2 < layer.memory_bytes_fp32_equivalent()


def test_fp8_capacity_overflow_errors(device):
    H, D = 2, 4
    layer = Fp8KvLayer.with_capacity(H, D, 1, Fp8KvFormat.E4M3, device=device)
    layer.push(np.arange(H * D), -np.arange(H * D))
    with pytest.raises(CapacityExceeded) as info:
        layer.push(np.arange(H * D), -np.arange(H * D))
    assert (info.value.capacity, info.value.pos) == (1, 1)


def test_fp8_clear_resets_len(device):
    layer = Fp8KvLayer.with_capacity(2, 8, 8, Fp8KvFormat.E4M3, device=device)
    for _ in range(3):
        layer.push(np.arange(16), np.zeros(16))
    assert layer.len == 3 and not layer.is_empty()
    layer.clear()
    assert layer.len == 0 and layer.is_empty()


def test_fp8_get_keys_at_multiple_positions(device):
    H, D, T = 2, 16, 5
    layer = Fp8KvLayer.with_capacity(H, D, T, Fp8KvFormat.E4M3, device=device)
    pushed = [ramp(H * D, 0.1, (t + 1) * 2.0) for t in range(T)]
    for keys in pushed:
        layer.push(keys, np.zeros(H * D))
    assert layer.len == T
    got = layer.get_keys_at([0, 2, 4])
    assert isinstance(got, list) and len(got) == 3
    for pos, row in zip([0, 2, 4], got):
        assert row.shape == (H * D,)
        assert mae(pushed[pos], row) < np.abs(pushed[pos]).max() * 0.02
    assert len(layer.get_values_at([1, 1])) == 2


def test_fp8_e5m2_get_value_roundtrip(device):
    H, D = 2, 32
    layer = Fp8KvLayer.with_capacity(H, D, 4, Fp8KvFormat.E5M2, device=device)
    values = ramp(H * D, 5.0, -80.0)
    layer.push(np.zeros(H * D), values)
    got = layer.get_value(0)
    for h in range(H):
        original = values[h * D:(h + 1) * D]
        assert mae(original, got[h * D:(h + 1) * D]) < np.abs(original).max() * 0.15


def test_fp8_cache_multi_layer_basic(device):
    L, H, D, C = 4, 2, 16, 8
    cache = Fp8KvCache.new(L, H, D, C, Fp8KvFormat.E4M3, device=device)
    assert cache.num_layers() == L and len(cache.layers) == L
    keys = ramp(H * D, 0.5, 0.0)
    for l in range(L):
        cache.layer_mut(l).push(keys, -keys)
    assert all(cache.layer(l).len == 1 for l in range(L))
    assert cache.total_memory_bytes() == L * (C * H * D * 2 + C * H * 4 * 2)


def test_fp8_cache_clear_all(device):
    cache = Fp8KvCache(3, 1, 8, 4, Fp8KvFormat.E5M2, device=device)
    for l in range(3):
        for _ in range(2):
            cache.layer_mut(l).push(np.arange(8), np.zeros(8))
        assert cache.layer(l).len == 2
    cache.clear_all()
    assert all(cache.layer(l).len == 0 and cache.layer(l).is_empty() for l in range(3))


# ---- FP8 against kvcl's numpy reference --------------------------------------------------------

@pytest.mark.parametrize("fmt", [Fp8KvFormat.E4M3, Fp8KvFormat.E5M2], ids=lambda f: f.name)
def test_fp8_stores_exactly_the_reference_bytes(device, rng, fmt):
    H, D = 3, 19
    layer = Fp8KvLayer(H, D, 4, fmt, device=device)
    rows = []
    for t in range(3):
        k = (rng.standard_normal((H, D)) * 10 ** (t - 1)).astype(np.float32)
        k[0, :3] = [1e-7, -1e-6, 0.0]     # subnormal range after scaling
        if t == 2:
            k[2] = 0.0                     # all-zero row: FLT_EPSILON scale
        rows.append(k)
        layer.push(k, k[::-1].copy())
    stored = layer._stored()
    for t, k in enumerate(rows):
        for data, scales, x in (("keys", "key_scales", k), ("values", "value_scales", k[::-1])):
            scale = np.maximum(np.abs(x).max(axis=1) / np.float32(fmt.max_value), np.float32(FLT_EPSILON))
            scale = scale.astype(np.float32)
            np.testing.assert_array_equal(stored[scales][t], scale)
            want_bytes = fp8_encode((x / scale[:, None]).astype(np.float32), fmt.value)
            np.testing.assert_array_equal(stored[data][t], want_bytes)
            want = (fp8_decode(want_bytes, fmt.value) * scale[:, None]).astype(np.float32).reshape(-1)
            got = layer.get_key(t) if data == "keys" else layer.get_value(t)
            np.testing.assert_array_equal(got, want)
    assert stored["key_scales"][2, 2] == FLT_EPSILON


def test_fp8_e5m2_saturates_where_the_crate_returns_inf(device):
    # Find a row maximum whose scaled value lands above 57344 by float rounding: the crate's
    # E5M2 encoder returns +Inf there; kvcl's saturates.
    candidates = np.float32(1.0) + np.arange(1, 20000, dtype=np.float32) * np.float32(2.0**-20)
    scaled = candidates / (candidates / np.float32(57344.0)).astype(np.float32)
    over = candidates[scaled.astype(np.float32) > np.float32(57344.0)]
    assert over.size, "no such value in the search range"
    x = float(over[0])
    layer = Fp8KvLayer(1, 2, 1, Fp8KvFormat.E5M2, device=device)
    layer.push([x, 0.5], [0.0, 0.0])
    got = layer.get_key(0)
    assert np.isfinite(got).all() and abs(got[0] - x) <= x * 2**-3


def test_fp8_bad_input_raises_and_changes_nothing(device):
    layer = Fp8KvLayer(2, 4, 2, "e4m3", device=device)
    assert layer.format is Fp8KvFormat.E4M3 and Fp8KvFormat.E5M2.kv_dtype == "fp8_e5m2"
    layer.push(np.ones(8), np.ones(8))
    before = layer._snapshot()
    bad = np.ones(8)
    bad[5] = np.inf
    for call, error in [
        (lambda: layer.push(np.ones(7), np.ones(8)), ShapeMismatch),
        (lambda: layer.push(np.ones(8), np.ones(9)), ShapeMismatch),
        (lambda: layer.push(np.ones(8), bad), kvcl.NonFiniteError),
        (lambda: layer.get_key(1), PositionOutOfRange),          # Rust returns the zeroed slot
        (lambda: layer.get_value(2), PositionOutOfRange),        # Rust panics
        (lambda: layer.get_keys_at([0, 1]), PositionOutOfRange),
        (lambda: layer.get_values_at(3), kvcl.DtypeError),
    ]:
        with pytest.raises(error):
            call()
        assert layer._snapshot() == before
    layer.push(np.ones(8), np.ones(8))
    with pytest.raises(CapacityExceeded):
        layer.push(bad, bad)                                      # capacity before finiteness
    cache = Fp8KvCache(2, 1, 1, 1, Fp8KvFormat.E4M3, device=device)
    with pytest.raises(kvcl.OutOfRangeError):
        cache.layer(2)                                            # Rust panics
    with pytest.raises(kvcl.InvalidArgument):
        Fp8KvLayer(1, 1, 1, "e3m4", device=device)
